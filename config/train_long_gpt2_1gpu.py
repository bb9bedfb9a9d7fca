# One-card twin of train_long_gpt2.py: OpenAI's GPT-2 (124M) fine-tuned to a 4096-token context on
# OpenWebText, on one 24 GB GPU (an RTX 4090; an 80 GB card holds it too), by position
# interpolation (docs/attention.md section 6) at a low learning rate.
# $ python train.py config/train_long_gpt2_1gpu.py
# $ python eval_long.py --ckpt=out-long-gpt2-1gpu --context=4096 --extend=interpolate --mark=1024 --device=cuda
# Sized by bench_vram.py's training budget (docs/results.md; measured at 2048 and 4096 tokens, extrapolated):
# 4 sequences of 4096 tokens are predicted to need ~17.5 GiB without checkpointing, 8 with it
# ~24.2 GiB (over), so checkpointing buys no power-of-two batch here and stays off (faster);
# .ci/gpu measures the peak. The same 524,288 tokens per step as the 8-GPU recipe,
# through gradient accumulation, so one step takes ~8x longer.

out_dir = 'out-long-gpt2-1gpu'
init_from = 'gpt2'  # OpenAI's weights from Hugging Face: no pretraining run needed
dataset = 'openwebtext'
attention = 'causal'
wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-long-4096-1gpu'

block_size = 4096  # 4x GPT-2's 1024
extend_method = 'interpolate'  # position interpolation (Chen et al. 2023)

# 4 batch size * 4096 block size * 32 gradaccum = 524,288 tokens per step, as on 8 GPUs
batch_size = 4
gradient_accumulation_steps = 32
grad_checkpoint = False  # True: ~12.9 GiB predicted at batch 4 (each block recomputed)

learning_rate = 6e-5  # a tenth of pretraining's peak: adapt, do not start over
max_iters = 1000  # Chen et al. extend LLaMA with 1000 steps
lr_decay_iters = 1000
min_lr = 6e-6
warmup_iters = 50
weight_decay = 1e-1

eval_interval = 250
eval_iters = 100
log_interval = 10
