# Vanilla twin of inattn_long_gpt2.py: grow the context of the GPT-2 (124M) model of train_gpt2.py 4x,
# 1024 -> 4096, by position interpolation (docs/attention.md section 6), and fine-tune briefly on OpenWebText at a low
# learning rate.
# GPU-sized: 1000 steps of 0.5M tokens, 0.5B tokens (pretraining saw 300B).
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_long_gpt2.py
# $ python eval_long.py --ckpt=out-gpt2,out-long-gpt2 --context=4096 --extend=interpolate --mark=1024 --device=cuda
# Every setting is that of inattn_long_gpt2.py except `attention` and the folders.

out_dir = 'out-long-gpt2'
init_from = 'out-gpt2'  # the checkpoint of config/train_gpt2.py; a new run (iteration 0) from its weights
init_hint = 'torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py'  # named if the checkpoint is missing
dataset = 'openwebtext'
attention = 'causal'
wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-long-4096'

block_size = 4096  # 4x the checkpoint's 1024
extend_method = 'interpolate'  # position interpolation (Chen et al. 2023); 'copy' tiles the 1024 learned rows

# 4 batch size * 4096 block size * 4 gradaccum * 8 GPUs = 524,288 tokens per step, as in pretraining
batch_size = 4
gradient_accumulation_steps = 4 * 8

learning_rate = 6e-5  # a tenth of pretraining's peak: adapt, do not start over
max_iters = 1000  # Chen et al. extend LLaMA with 1000 steps
lr_decay_iters = 1000
min_lr = 6e-6
warmup_iters = 50
weight_decay = 1e-1

eval_interval = 250
eval_iters = 100
log_interval = 10
