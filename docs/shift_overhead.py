"""
What does the token shift (GPTConfig.inattn_shift) cost a decoding step? Its extra work is k
C x C products per token, once, at block m: a fraction of a percent of a GPT-2 step, smaller
than the run-to-run spread of a CPU timing (bench_vram.py's decode cells, one process each,
differed by 20% between processes on this project's machine). So this script times the two models
side by side in one process: InAttention at GPT-2 small shape with inattn_shift=0 and =K, random
weights from one seed, each prefilled with the same T random tokens; then it alternates
rounds of a few greedy decode steps of one and of the other, and prints the median time per step
of each and their ratio, with the spread of the per-round ratios.

    python docs/shift_overhead.py 8192 1          # T, K; 2 threads: about 2 minutes at 8192
    python docs/shift_overhead.py 32768 1 --threads=2 --rounds=20
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402

STEPS = 4  # decode steps per round and model


def build(T, shift, rounds):
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention='inattention', inattn_shift=shift, block_size=T + 1024))
    model.eval()
    cache = model.new_cache(capacity=T + 2 + STEPS * rounds)
    return model, cache


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('T', type=int)
    p.add_argument('K', type=int)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=30)
    a = p.parse_args(argv)
    if a.T < 1 or a.K < 1 or a.rounds < 2:
        p.error('T and K must be at least 1, --rounds at least 2 (the first round warms up)')
    torch.set_num_threads(a.threads)
    x = torch.randint(50257, (1, a.T), generator=torch.Generator().manual_seed(1))
    runs = {}
    with torch.no_grad():
        for shift in (0, a.K):
            model, cache = build(a.T, shift, a.rounds)
            t0 = time.perf_counter()
            logits = model.prefill(x, cache, 1024)
            print(f'inattn_shift={shift}: prefilled {a.T} tokens in {time.perf_counter() - t0:.0f} s',
                  flush=True)
            runs[shift] = [model, cache, logits[:, -1:].argmax(-1), []]
        for _ in range(a.rounds):
            for run in runs.values():  # one round of each, in turn
                model, cache, idx, times = run
                t0 = time.perf_counter()
                for _ in range(STEPS):
                    logits, _ = model(idx, cache=cache)
                    idx = logits.argmax(-1)
                times.append((time.perf_counter() - t0) / STEPS)
                run[2] = idx
    base, shifted = runs[0][3][1:], runs[a.K][3][1:]  # the first round warms up
    ratios = sorted(s / b for s, b in zip(shifted, base))
    q = len(ratios) // 4
    print(f'T = {a.T}, {a.threads} threads, {len(base)} rounds of {STEPS} steps each')
    print(f'inattn_shift=0: {1 / statistics.median(base):.2f} tok/s (median step)')
    print(f'inattn_shift={a.K}: {1 / statistics.median(shifted):.2f} tok/s (median step)')
    print(f'step time, shift / no shift: median {statistics.median(ratios):.3f}, '
          f'middle half {ratios[q]:.3f} to {ratios[-q - 1]:.3f}')


if __name__ == '__main__':
    main()
