# GPT-2 (124M) with InAttention on OpenWebText: train_gpt2.py's recipe with one flag changed
# $ torchrun --standalone --nproc_per_node=8 train.py config/inattn_gpt2.py

out_dir = 'out-inattn-gpt2'
wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-inattn'

# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens per step
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1

attention = 'inattention'  # the one change: keys and values from the initial states
