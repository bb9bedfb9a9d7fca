# MQAR, multi-query associative recall (docs/attention.md section 10): 8 key-value pairs, then
# each key asked again at a random place of a 64-token sequence; the loss counts recall only.
# 2 layers, 64 wide, as Zoology's smallest models: on one CPU thread vanilla attention leaves the
# "one of the values seen" plateau near step 6,000 (8 minutes) and recalls 99.7% by step 10,000
# (docs/results.md). The data (prepare_data.py mqar: 100,000 training sequences) is prepared on
# first use.
#   python eval_long.py --ckpt=out-mqar --mode=mqar    # recall accuracy on the 3,000 val sequences
# Twins that change only the attention: inattn_mqar.py, lightning_mqar.py, infini_mqar.py.

out_dir = 'out-mqar'
eval_interval = 500
eval_iters = 20
log_interval = 500
always_save_checkpoint = True

wandb_log = False
wandb_project = 'mqar'
wandb_run_name = 'mqar-causal'

dataset = 'mqar_T64_N8_V256'  # seq_len 64, 8 pairs, vocabulary 256
gradient_accumulation_steps = 1
batch_size = 64
block_size = 64  # = the sequence length: train.py draws whole sequences

n_layer = 2
n_head = 2
n_embd = 64
dropout = 0.0

learning_rate = 1e-2  # the sweep (docs/results.md): 1e-3 and 3e-3 stay on the plateau far longer
max_iters = 20000
lr_decay_iters = 20000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False  # small and on a CPU: compiling costs more than it saves
