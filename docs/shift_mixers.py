"""
Would the token shift that gives InAttention recall (docs/attention.md section 11) also help
Lightning and Infini-attention on MQAR? Zoology and Based found that a short convolution before a
linear-attention mixer is what lets it solve associative recall. This experiment adds the same
shift, x_t + W x_{t-1} with one learned C x C matrix (normal(0.02) init), to the input of every
attention layer of ATTENTION, and trains the MQAR recipe (config/*_mqar.py: 2 x 64, T = 64, 8
pairs, batch 64, lr 1e-2, warmup 100, cosine over 20,000 steps) for STEPS steps, with and without
the shift, the same seed and batches. It prints the recall loss every 500 steps and the accuracy on
the validation sequences. Not a config flag: the shift here is a subclass made for this test,
trained without a cache (the model classes' decoding is not used).

    python prepare_data.py mqar --seq_len 64 --pairs 8 --vocab 256
    python docs/shift_mixers.py lightning 3000   # likewise infini (16-token segments, its config's)

One thread: about 5 minutes per 3,000-step run for Lightning on this project's CPU machine.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_py  # noqa: E402
import prepare_data  # noqa: E402
from checkpoint import data_folder  # noqa: E402
from configurator import die  # noqa: E402
from eval_long import mqar_recall  # noqa: E402

if len(sys.argv) != 3 or sys.argv[1] not in ('lightning', 'infini') or not sys.argv[2].isdigit():
    die("usage: python docs/shift_mixers.py lightning|infini STEPS, e.g. lightning 3000")
attention, steps = sys.argv[1], int(sys.argv[2])
data_dir = data_folder('mqar_T64_N8_V256')
try:
    train_x, train_y = prepare_data.read_mqar(data_dir, 'train', 64)
    val_x, val_y = prepare_data.read_mqar(data_dir, 'val', 64)
except prepare_data.PrepareError as e:
    die(f"{e} (python prepare_data.py mqar --seq_len 64 --pairs 8 --vocab 256)")


def shifted(cls):
    """cls with its attention input x_t replaced by x_t + W x_{t-1} (x_{-1} = 0): training only."""
    class Shifted(cls):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            self.shift = nn.Linear(config.n_embd, config.n_embd, bias=False)

        def forward(self, x, s, cache=None):
            assert cache is None, "this experiment trains and scores without a cache"
            previous = F.pad(x, (0, 0, 1, 0))[:, :-1]  # (B, T, C): x_{t-1}
            return super().forward(x + self.shift(previous), s, cache)
    return Shifted


def lr_at(it, learning_rate=1e-2, min_lr=1e-4, warmup=100, decay=20000):
    """train.py's schedule: linear warmup, then cosine decay to min_lr at `decay` steps."""
    if it < warmup:
        return learning_rate * (it + 1) / (warmup + 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay - warmup)))
    return min_lr + coeff * (learning_rate - min_lr)


def train(shift):
    plain = model_py.ATTENTIONS[attention]
    model_py.ATTENTIONS[attention] = shifted(plain) if shift else plain
    torch.manual_seed(1337)
    config = model_py.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64,
                                bias=False, attention=attention, infini_segment=16)
    model = model_py.GPT(config)
    model_py.ATTENTIONS[attention] = plain
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')
    rng = np.random.default_rng(1337)  # the same batches with and without the shift
    for it in range(steps + 1):
        if it % 500 == 0:
            model.eval()
            accuracy, loss = mqar_recall(model, val_x[:640], val_y[:640], 64)
            print(f"{attention}, shift={shift}: step {it}: recall loss {loss:.3f}", flush=True)
            model.train()
        if it == steps:
            break
        ix = rng.integers(0, len(train_x), 64)
        x = torch.from_numpy(train_x[ix].astype(np.int64))
        y = torch.from_numpy(train_y[ix].astype(np.int64))
        for group in optimizer.param_groups:
            group['lr'] = lr_at(it) * group.get('lr_scale', 1.0)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    accuracy, loss = mqar_recall(model, val_x, val_y, 64)
    print(f"{attention}, shift={shift}: accuracy {100 * accuracy:.2f}% (loss {loss:.4f}) on "
          f"{len(val_x)} validation sequences after {steps} steps", flush=True)


for shift in (False, True):
    train(shift)
