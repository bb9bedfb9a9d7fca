# the miniature character-level Shakespeare model of train_shakespeare_char.py with Infini-attention:
# every setting is the same except the attention settings below (and out_dir)

out_dir = 'out-infini-shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt-infini'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
attention = 'infini'  # softmax inside a segment, a compressive memory across segments
infini_segment = 16  # 16 segments per 256-token training sequence (4 at the CPU recipe's block_size=64)

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
