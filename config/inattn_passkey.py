# Passkey retrieval (docs/attention.md section 5): a small character-level InAttention model trained from scratch on
# Shakespeare mixed with passkey samples (prepare_data.py shakespeare_char_passkey: 80% of the tokens are in
# samples of 103..256 characters, filler + needle + question + key, with training keys only), then
#   python eval_long.py --ckpt=out-inattn-passkey --mode=passkey --extend=interpolate   # lengths 256, 512, 1024
# train_passkey.py is the vanilla twin: every setting the same except `attention` (and out_dir).
# 4000 steps take ~22 CPU-minutes (one thread). Measured: vanilla retrieves the key (100% exact match at middle
# and end depth, 46% at the start); InAttention does not (0%, also with --max_iters=8000 --lr_decay_iters=8000).

out_dir = 'out-inattn-passkey'
eval_interval = 500
eval_iters = 20
log_interval = 50
always_save_checkpoint = True

dataset = 'shakespeare_char_passkey'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 256  # = prepare_data.PASSKEY_LEN, the longest training sample

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
attention = 'inattention'

learning_rate = 1e-3
max_iters = 4000
lr_decay_iters = 4000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False  # small and on a CPU: compiling costs more than it saves
