"""
Why a model trained at block 64 does a little worse at the end of its window (README, Recall:
"The end of the window"). The key and value at position p are read only by the queries at p and
after, so the last rows of the position table are trained least in their role as keys. The test:
train the baby recipe (4 x 128, windows of 64, batch 12, 2,000 steps, lr 1e-3) with every batch
placed at positions o .. o + 63, o drawn from 0..max_offset, in a table of 128 rows; then score
the validation split by position at offsets 0 and 64. If the cause is the rows, with max_offset=64
the rise leaves positions 56-63 (now read by many later queries) and moves to 120-127.

    python prepare_data.py shakespeare_char
    python docs/end_of_window.py inattention 0     # the plain recipe: the rise at 56-63
    python docs/end_of_window.py inattention 64    # random offsets; likewise causal 0, causal 64

One thread, about 3.5 minutes each on this project's CPU machine.
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import data_folder  # noqa: E402
from configurator import die  # noqa: E402
from eval_long import loss_by_position  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

if len(sys.argv) != 3 or not sys.argv[2].isdigit() or int(sys.argv[2]) > 64:
    die("usage: python docs/end_of_window.py ATTENTION MAX_OFFSET (0..64), e.g. inattention 64")
attention = sys.argv[1]
max_offset = int(sys.argv[2])
data_dir = data_folder('shakespeare_char')
if not os.path.isfile(os.path.join(data_dir, 'val.bin')):
    die(f"no {data_dir}/val.bin: run python prepare_data.py shakespeare_char first")
train_data = np.memmap(os.path.join(data_dir, 'train.bin'), dtype=np.uint16, mode='r')
val_data = np.array(np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.uint16, mode='r'))

block_size = 64
batch_size = 12
max_iters = 2000
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4

torch.manual_seed(1337)
rng = np.random.default_rng(1337)
config = GPTConfig(block_size=128, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                   bias=False, attention=attention)
try:
    model = GPT(config)
except ValueError as e:  # an unknown attention
    die(str(e))
optimizer = model.configure_optimizers(0.1, learning_rate, (0.9, 0.99), 'cpu')


def get_lr(it):
    """train.py's schedule: linear warmup, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (max_iters - warmup_iters)))
    return min_lr + coeff * (learning_rate - min_lr)


for it in range(max_iters):
    ix = rng.integers(0, len(train_data) - block_size - 1, batch_size)
    x = torch.stack([torch.from_numpy(train_data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(train_data[i + 1:i + 1 + block_size].astype(np.int64))
                     for i in ix])
    cache = model.new_cache()  # an empty decoding state that starts counting positions at o
    cache.pos = int(rng.integers(0, max_offset + 1))
    for group in optimizer.param_groups:
        group['lr'] = get_lr(it)
    _, loss = model(x, y, cache=cache)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if it % 500 == 0:
        print(f"iter {it}: loss {loss.item():.4f}", flush=True)

model.eval()
print(f"{attention}, trained at offsets 0..{max_offset}: val loss by position in the window of 64,"
      f" buckets of 8")
for offset in (0, 64):
    per_position = loss_by_position(model, val_data, block_size, 8, 0, 64, offset=offset)
    b = [per_position[i:i + 8].mean().item() for i in range(0, block_size, 8)]
    print(f"read at positions {offset}..{offset + 63}: " + ' '.join(f'{v:.4f}' for v in b)
          + f" | last 8 minus the 8 before: {b[7] - b[6]:+.4f}", flush=True)
