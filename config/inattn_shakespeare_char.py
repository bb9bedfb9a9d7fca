# the miniature character-level Shakespeare model of train_shakespeare_char.py with InAttention:
# every setting is the same except `attention` (and out_dir), so the two runs are a one-flag ablation

out_dir = 'out-inattn-shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt-inattn'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
attention = 'inattention'  # the one change: keys and values from the initial states

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
