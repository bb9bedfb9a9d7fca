# Grow the context of the short-context InAttention Shakespeare model 4x, 64 -> 256, and fine-tune it briefly at
# a lower learning rate (docs/attention.md section 6). It starts from the checkpoint of the core command
# (~2 min on 2 CPUs):
#   python train.py config/inattn_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
# then (~5 min on 2 CPU cores):
#   python train.py config/inattn_long.py
#   python eval_long.py --ckpt=out-inattn-shakespeare-char,out-inattn-long --context=256 --extend=interpolate --mark=64
# The model's shape comes from the checkpoint. train_long.py is the vanilla twin (only `attention` and the
# folders differ); --extend_method=copy --out_dir=out-inattn-long-copy tiles the 64 learned rows instead.

out_dir = 'out-inattn-long'
init_from = 'out-inattn-shakespeare-char'  # a new run (iteration 0) from these weights
init_hint = 'python train.py config/inattn_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0'  # named if the checkpoint is missing
dataset = 'shakespeare_char'
attention = 'inattention'

block_size = 256  # 4x the checkpoint's 64: the position table grows to 256 rows
extend_method = 'interpolate'  # position interpolation (Chen et al. 2023): new row m = old table at m * 63/255

gradient_accumulation_steps = 1
batch_size = 12
dropout = 0.0

learning_rate = 3e-4  # a third of the short model's peak: adapt, do not start over
max_iters = 600
lr_decay_iters = 600
min_lr = 3e-5
warmup_iters = 20
beta2 = 0.99

eval_interval = 600  # at the start (the extended model, not yet fine-tuned) and at the end
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # the checkpoint is written at the end

compile = False  # small and on a CPU: compiling costs more than it saves
