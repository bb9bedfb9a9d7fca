# the miniature character-level Shakespeare model of train_shakespeare_char.py with Lightning attention:
# every setting is the same except `attention` (and out_dir); the class brings its own positions

out_dir = 'out-lightning-shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt-lightning'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
attention = 'lightning'  # linear attention with a fixed per-head decay, trained in blocks

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
