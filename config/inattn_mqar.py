# MQAR with InAttention: keys and values from the initial states, so no induction heads
# (docs/attention.md section 9).
# A twin of train_mqar.py: every setting the same except the attention (and out_dir). Then
#   python eval_long.py --ckpt=out-mqar,out-inattn-mqar --mode=mqar

out_dir = 'out-inattn-mqar'
eval_interval = 500
eval_iters = 20
log_interval = 500
always_save_checkpoint = True

wandb_log = False
wandb_project = 'mqar'
wandb_run_name = 'mqar-inattention'

dataset = 'mqar_T64_N8_V256'  # seq_len 64, 8 pairs, vocabulary 256
gradient_accumulation_steps = 1
batch_size = 64
block_size = 64  # = the sequence length: train.py draws whole sequences

n_layer = 2
n_head = 2
n_embd = 64
dropout = 0.0
attention = 'inattention'

learning_rate = 1e-2  # the sweep (docs/results.md): 1e-3 and 3e-3 stay on the plateau far longer
max_iters = 20000
lr_decay_iters = 20000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False  # small and on a CPU: compiling costs more than it saves
