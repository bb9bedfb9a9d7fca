# One-card twin of inattn_long_gpt2.py: the GPT-2 (124M) InAttention model grown to a 4096-token
# context on OpenWebText, on one 24 GB GPU (an RTX 4090; an 80 GB card holds it too).
# It needs the checkpoint that only the 8-GPU pretraining makes (OpenAI's GPT-2 is no InAttention
# model): out-inattn-gpt2, from
#   torchrun --standalone --nproc_per_node=8 train.py config/inattn_gpt2.py
# $ python train.py config/inattn_long_gpt2_1gpu.py
# $ python eval_long.py --ckpt=out-inattn-gpt2,out-inattn-long-gpt2-1gpu --context=4096 --extend=interpolate --mark=1024 --device=cuda
# Sized by bench_vram.py's training budget (README, "Training memory on one card"): a micro-batch of
# 8 sequences of 4096 tokens with activation checkpointing is a first sizing for 24 GB, not yet
# confirmed at 4096 tokens (the table was measured up to 1024; .ci/gpu measures the peak); the
# same 524,288 tokens per step as the 8-GPU recipe.

out_dir = 'out-inattn-long-gpt2-1gpu'
init_from = 'out-inattn-gpt2'  # the checkpoint of config/inattn_gpt2.py (8 GPUs)
init_hint = 'torchrun --standalone --nproc_per_node=8 train.py config/inattn_gpt2.py'  # named if the checkpoint is missing
dataset = 'openwebtext'
attention = 'inattention'
wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-inattn-long-4096-1gpu'

block_size = 4096  # 4x the checkpoint's 1024
extend_method = 'interpolate'  # position interpolation (Chen et al. 2023)

# 8 batch size * 4096 block size * 16 gradaccum = 524,288 tokens per step, as on 8 GPUs
batch_size = 8
gradient_accumulation_steps = 16
grad_checkpoint = True  # each block recomputed in backward: the activations of one block at a time

learning_rate = 6e-5  # a tenth of pretraining's peak: adapt, do not start over
max_iters = 1000  # Chen et al. extend LLaMA with 1000 steps
lr_decay_iters = 1000
min_lr = 6e-6
warmup_iters = 50
weight_decay = 1e-1

eval_interval = 250
eval_iters = 100
log_interval = 10
