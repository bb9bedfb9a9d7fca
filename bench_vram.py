"""
Memory and speed of every attention variant against context length T:

  state    decoding-state bytes after a T-token prompt: measured (cache.nbytes()) beside the formula
  prefill  peak memory of reading a T-token prompt and producing the first new token (no weights)
  decode   decode tokens/s at context T with the cache, against the machine's limits for it: the
           bytes and FLOPs a step needs (formulas), the read bandwidth and GEMM throughput (measured
           in the cell); without the cache (the context recomputed; skipped above T = 8192 unless
           --uncached); prefill tokens/s
  train    peak memory and tokens/s of one forward+backward step (gradients included)
  budget   the longest context whose inference fits in --budget: prefill peak vs T, extrapolated

$ python bench_vram.py --preset tiny --contexts 256,1024 --mode state,prefill,decode,train
$ python bench_vram.py --preset gpt2 --variants causal,inattention --contexts 8192,32768 \
      --mode decode --threads 2
$ python bench_vram.py --preset gpt2 --contexts 1024,4096,32768 --mode state,prefill --plot vram.png

Every cell (variant, T, inference or training) runs in a fresh process with a memory limit and a
timeout, so an out-of-memory or hung cell is reported as OOM / timeout and the rest go on. Weights
are random: memory and speed do not depend on what the model learned.

Memory on CUDA: torch.cuda.max_memory_allocated above what was allocated before the step. On CPU
the same quantity is counted by Tracker: the bytes of tensor storages created during the step and
still alive, peak over the step (fused kernels' internal scratch buffers are not tensors and are not
seen). A second, coarser figure: the peak RSS of the cell's process (ru_maxrss) above its RSS when
the step starts, model built and warmed up (the peak count is reset then); it includes allocator
slack and freed memory not yet returned.
"""

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import re
import resource
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from model import ATTENTIONS, GPT, CausalSelfAttention, GPTConfig, InAttention, InfiniAttention

PRESETS = {
    'tiny': dict(n_layer=2, n_head=2, n_embd=64, vocab_size=65),
    'small': dict(n_layer=4, n_head=4, n_embd=128, vocab_size=65),
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304),
}
MODES = ('state', 'prefill', 'decode', 'train')
DECODE_STEPS = 16  # timed decode steps after one warm-up step
UNCACHED_MAX_T = 8192  # above it the uncached decode (minutes a token) is skipped; --uncached: not
PROBE_BYTES = 2 * 2**30  # the bandwidth probe sums a tensor this large: far beyond any cache


def variants():
    """Every registered attention class, plus the ablation rows: name -> GPTConfig overrides."""
    out = {}
    for name, cls in ATTENTIONS.items():
        # GPT-2's two attentions need its learned position table; later classes carry position
        # themselves (a decay, RoPE inside segments) and have no length limit, unless they say so
        # in a `pos_emb` attribute
        gpt2 = cls in (CausalSelfAttention, InAttention)
        pos_emb = getattr(cls, 'pos_emb', 'learned' if gpt2 else 'none')
        out[name] = dict(attention=name, pos_emb=pos_emb)
        if name == 'causal':  # the quadratic baseline: the T x T attention matrix in memory
            out['causal-materialised'] = dict(out[name], sdpa=False)
        if name == 'inattention':  # the two decoding caches: initial states s (default) or K/V
            out[name]['inattn_cache'] = 's'
            out['inattention-kv'] = dict(out[name], inattn_cache='kv')
            for form in ('gemm', 'stream'):  # the absorbed step's two forms ('inattention': 'auto')
                out[f'inattention-{form}'] = dict(out[name], inattn_decode=form)
        if cls.reads_s:  # over one causal block (docs/attention.md section 9): 3d per token
            out[f'{name}-p1'] = dict(out[name], inattn_prefix=1)
            for k in (1, 3):  # the token shift (section 11): d per token, plus k·d in all
                out[f'{name}-s{k}'] = dict(out[name], inattn_shift=k)
    return out


# -------------------------------------------------------------------------------------------------
# Measuring memory

class Tracker(TorchDispatchMode):
    """CPU analogue of torch.cuda.max_memory_allocated: sees every aten op's outputs, counts each
    storage that the op created (a view or an in-place result shares an input's storage and adds
    nothing) and subtracts it when the storage is freed. Storages that existed before the tracker
    started are never counted."""

    def __init__(self):
        super().__init__()
        self.current, self.peak, self.size = 0, 0, {}  # size: storage id -> bytes counted for it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage()._cdata for t in flat if torch.is_tensor(t)}
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            # _cdata: address of the C++ StorageImpl, its identity
            key, n = storage._cdata, storage.nbytes()
            if key in self.size:  # seen before; only a resize_ changes its bytes
                self.current += n - self.size[key]
                self.size[key] = n
            elif key not in inputs:  # new: alive until its Python object (kept by C++) dies
                self.size[key] = n
                self.current += n
                weakref.finalize(storage, self.free, key)
            self.peak = max(self.peak, self.current)
        return out

    def free(self, key):
        self.current -= self.size.pop(key)


class CudaPeak:
    """The same interface on CUDA, from the caching allocator's own statistics."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self.base


def max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def limit_address_space(nbytes):
    """Cap this process's virtual memory at its current size + nbytes: a bigger allocation then
    fails at once with an error (reported as OOM) instead of swapping or waking the OOM killer."""
    with open('/proc/self/statm') as f:
        vm_size = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + nbytes, resource.RLIM_INFINITY))


# -------------------------------------------------------------------------------------------------
# One cell, in its own process

def measure(spec):
    """Build the model of one cell; yield (mode, numbers) for each mode as soon as measured."""
    torch.manual_seed(0)
    if spec['threads']:
        torch.set_num_threads(spec['threads'])
    device, dtype, T = spec['device'], getattr(torch, spec['dtype']), spec['T']
    cuda = device == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    train = spec['kind'] == 'train'
    # training as train.py does it: fp32 weights, the matmuls autocast to dtype (when not fp32)
    model = GPT(GPTConfig(**spec['config'])).to(device, torch.float32 if train else dtype)
    autocast = torch.autocast(device, dtype, enabled=train and dtype != torch.float32)
    tensors = list(model.parameters()) + list(model.buffers())  # tied weights once
    weights = sum(t.nbytes for t in tensors)
    yield 'weights', weights
    yield 'params', sum(t.numel() for t in model.parameters())
    B = spec['batch']
    x, y = (torch.randint(model.config.vocab_size, (B, T), device=device) for _ in range(2))

    def step(x, y):  # one training step
        model.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
    # warm up on 16 tokens: the first call of a kernel maps its code and starts threads, which the
    # RSS figure and the timings should not include (two chunks of 8 where the prompt is chunked:
    # both attention paths)
    model.train(train)
    if train:
        step(x[:1, :16], y[:1, :16])
    else:
        cache = model.new_cache()
        model.prefill(x[:, :16], cache, spec['chunk'] and 8)
        with torch.no_grad():
            model(x[:, :1], cache=cache)
    if not cuda:
        limit_address_space(spec['mem_limit'])
    with open('/proc/self/clear_refs', 'w') as f:  # Linux: restart the peak-RSS count from now
        f.write('5')
    rss0, meter = max_rss(), (CudaPeak if cuda else Tracker)
    if train:  # without activation checkpointing, then with it (every block recomputed)
        numbers = {}
        for ckpt in (False, True):
            model.config.grad_checkpoint = ckpt
            with meter() as m:  # the measured step is also the warm-up of the timed one
                step(x, y)
            sync(); t0 = time.perf_counter()
            step(x, y)
            sync(); dt = time.perf_counter() - t0
            suffix = '_ckpt' if ckpt else ''
            numbers.update({f'peak_bytes{suffix}': m.peak, f'tok_s{suffix}': B * T / dt})
            if not ckpt:  # the process's peak RSS cannot be reset between the two
                numbers['rss_bytes'] = max_rss() - rss0
        numbers['ckpt_ratio'] = numbers['peak_bytes_ckpt'] / numbers['peak_bytes']
        yield 'train', numbers
        return
    if {'state', 'prefill'} & set(spec['modes']):
        cache = model.new_cache(capacity=T)  # the prompt's length is known: no room to spare
        with meter() as m:
            model.prefill(x, cache, spec['chunk']).argmax(-1)  # prefill and the first new token
        if 'prefill' in spec['modes']:
            yield 'prefill', dict(peak_bytes=m.peak, rss_bytes=max_rss() - rss0)
        if 'state' in spec['modes']:
            yield 'state', dict(state_bytes=cache.nbytes(),
                                formula_bytes=model.decode_state_bytes(T, dtype, B),
                                allocated_bytes=cache.allocated_nbytes())
        del cache
    if 'decode' in spec['modes']:  # timed without the tracker, which costs Python time per op
        cache = model.new_cache(capacity=T + 1 + DECODE_STEPS)  # room for all: never regrown
        sync(); t0 = time.perf_counter()
        logits = model.prefill(x, cache, spec['chunk'])
        sync(); t_prefill = time.perf_counter() - t0
        with torch.no_grad():
            logits, _ = model(logits.argmax(-1), cache=cache)  # warm-up step
            sync(); t0 = time.perf_counter()
            for _ in range(DECODE_STEPS):
                logits, _ = model(logits.argmax(-1), cache=cache)  # greedy: (B, 1, V) -> (B, 1)
            sync(); t_step = (time.perf_counter() - t0) / DECODE_STEPS
            del cache
            t_recompute = float('inf')
            for _ in range(3 if spec['uncached'] else 0):  # no cache: all recomputed (best of 3)
                sync(); t0 = time.perf_counter()
                model(x)
                sync(); t_recompute = min(t_recompute, time.perf_counter() - t0)
        middle = T + 1 + DECODE_STEPS // 2  # the context in the middle of the timed steps
        n_bytes, flops = decode_cost(model, middle, dtype, B, device)
        bandwidth, gemm, linear = probe_limits(model.config, T, B, dtype, device, sync)
        t_limit = max(n_bytes / bandwidth, flops / gemm)
        uncached = spec['uncached']
        yield 'decode', dict(decode_tok_s=B / t_step, prefill_tok_s=B * T / t_prefill,
                             recompute_tok_s=B / t_recompute if uncached else None,
                             cache_speedup=t_recompute / t_step if uncached else None,
                             step_bytes=n_bytes, step_flops=flops,
                             bandwidth=bandwidth, gemm_flops=gemm, linear_bandwidth=linear,
                             bound='memory' if n_bytes / bandwidth >= flops / gemm else 'compute',
                             limit_tok_s=B / t_limit, limit_fraction=t_limit / t_step)


def decode_cost(model, T, dtype, B, device):
    """Formulas for one decode step of B sequences at context T: (bytes read, FLOPs). Weights: every
    parameter read once per step (the position table: one row, not counted), 2 FLOPs per matrix
    weight per sequence. The state, per sequence and per block (each block asked for its class,
    as decode_state_bytes does: a causal prefix block of InAttention is costed as causal), with
    H heads, d = n_embd, hd = d / H, e bytes per number:
      causal, inattention-kv  reads K and V: 2·T·d·e;  FLOPs 4·T·d (q·k and p·v: 2·T·hd per head)
      inattention (absorbed)  reads s once per pass: passes·T·d·e (gemm 2, stream 1; 'auto':
                              InAttention.decode_form);  FLOPs 4·H·T·d: every head scores and sums
                              all d numbers of s_j. The token shift's k·d inputs: read once a step
      lightning               reads and rewrites its H·hd² fp32 state;  FLOPs ~6·H·hd²
      infini                  reads its state: M, z, K/V of the unfinished segment (n = T mod N)
                              FLOPs 4·H·hd² (memory read; fold, amortised) + 4·(n + 1)·d
    Every block's reads count as reads from memory: a state that stays in cache is read faster."""
    cfg = model.config
    H, d = cfg.n_head, cfg.n_embd
    hd, e = d // H, dtype.itemsize
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and 'wpe' not in name]
    vectors = [p for p in model.parameters() if p.dim() < 2]  # biases, norm gains, gates
    n_bytes = sum(p.numel() for p in matrices + vectors) * e
    flops = 2 * B * sum(p.numel() for p in matrices)  # wte is lm_head: counted once
    for block in model.transformer.h:
        attn = type(block.attn)
        if attn is InAttention and cfg.inattn_cache == 's':
            form = InAttention.decode_form(cfg.inattn_decode, T, device)
            passes = 1 if form == 'stream' else 2
            n_bytes += B * passes * T * d * e
            flops += B * 4 * H * T * d
        elif attn in (CausalSelfAttention, InAttention):
            n_bytes += B * 2 * T * d * e
            flops += B * 4 * T * d
        elif attn is InfiniAttention:
            n_bytes += B * attn.state_bytes(cfg, T, dtype)
            flops += B * (4 * H * hd * hd + 4 * (T % cfg.infini_segment + 1) * d)
        else:  # lightning: the fixed-size state, read and rewritten
            n_bytes += B * 2 * attn.state_bytes(cfg, T, dtype)
            flops += B * 6 * H * hd * hd
    n_bytes += B * cfg.inattn_shift * d * e  # the token shift's last k inputs
    return n_bytes, flops


# Datasheet limits of some GPUs: memory bandwidth (bytes/s) and dense bf16 tensor FLOP/s (no
# sparsity; fp32 accumulation, what torch's bf16 matmuls use)
GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: GPU memory bandwidth 3.35 TB/s; BF16
    # Tensor Core 1,979 TFLOPS "with sparsity", dense is half: 989.4
    'H100-SXM': dict(bandwidth=3.35e12, flops=989.4e12),
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: 2,039 GB/s; BF16 Tensor Core
    # 312 TFLOPS (624 with sparsity)
    'A100-80GB-SXM': dict(bandwidth=2.039e12, flops=312e12),
    # NVIDIA Ada GPU Architecture whitepaper, Appendix A, GeForce RTX 4090: memory bandwidth
    # 1008 GB/s; "Peak BF16 Tensor TFLOPS with FP32 Accumulate" 165.2 (330.4 with sparsity)
    'RTX-4090': dict(bandwidth=1.008e12, flops=165.2e12),
}
PREDICT_BATCHES = (1, 16)


def predict_tok_s(model, T, dtype, B, gpu, device='cpu'):
    """Tokens/s a decode step of B sequences at context T would reach on a GPU of GPUS if it ran at
    the datasheet's limits: B / max(bytes / bandwidth, FLOPs / peak), the bytes and FLOPs from
    decode_cost (the same formulas as the measured cells' limit). An upper bound: no kernel
    launch latency, no partial use of the bandwidth."""
    n_bytes, flops = decode_cost(model, T, dtype, B, device)
    return B / max(n_bytes / GPUS[gpu]['bandwidth'], flops / GPUS[gpu]['flops'])


def probe_limits(config, T, B, dtype, device, sync):
    """The machine's limits, measured in this process with its threads: read bandwidth (bytes/s,
    best of 6 sums over a PROBE_BYTES tensor) and GEMM throughput (FLOP/s, best of 6 products
    (B, H, d) @ (B, d, T): the absorbed decode's scores of one layer, the heads as rows). Also, not
    a limit but a diagnosis: the bandwidth at which F.linear reads a weight matrix the size of
    lm_head for B rows, as every linear layer of a decode step does."""
    big = torch.ones(PROBE_BYTES // dtype.itemsize, dtype=dtype, device=device)
    s = torch.randn(B, T, config.n_embd, dtype=dtype, device=device)
    q = torch.randn(B, config.n_head, config.n_embd, dtype=dtype, device=device)
    w = torch.randn(config.vocab_size, config.n_embd, dtype=dtype, device=device)
    x = torch.randn(B, config.n_embd, dtype=dtype, device=device)
    best = {}
    for name, op in [('sum', lambda: big.sum()), ('gemm', lambda: q @ s.transpose(1, 2)),
                     ('linear', lambda: F.linear(x, w))]:
        best[name] = float('inf')
        for _ in range(6):
            sync(); t0 = time.perf_counter()
            op()
            sync(); best[name] = min(best[name], time.perf_counter() - t0)
    return (big.nbytes / best['sum'], 2 * B * config.n_head * config.n_embd * T / best['gemm'],
            w.nbytes / best['linear'])


def is_oom(e):
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or bool(
        re.search(r"not enough memory|can't allocate memory|out of memory", str(e), re.I))


def cell_main(spec, conn):
    """Child process: send each result as it comes, then 'done' or the failure."""
    try:
        for mode, numbers in measure(spec):
            conn.send((mode, numbers))
        conn.send(('done', None))
    except BaseException as e:  # MemoryError included: report it, the parent goes on
        first_line = str(e).splitlines()[0] if str(e) else ''
        conn.send(('OOM' if is_oom(e) else 'error', f"{type(e).__name__}: {first_line}"))


def run_cell(spec, timeout):
    """Run one cell in a fresh process; return ({mode: numbers}, status, message)."""
    ctx = mp.get_context('forkserver')  # fresh processes forked from a server with torch imported
    ctx.set_forkserver_preload(['torch', 'torch._dynamo'])  # TorchDispatchMode imports dynamo
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=cell_main, args=(spec, send), daemon=True)
    p.start()
    send.close()
    results, status, message = {}, None, ''
    deadline = time.monotonic() + timeout
    while status is None:
        if not recv.poll(max(0.0, deadline - time.monotonic())):
            p.kill()
            status, message = 'timeout', f"no result within --timeout {timeout:g} s"
            break
        try:
            key, value = recv.recv()
        except EOFError:  # died without a word: a signal (e.g. the kernel's OOM killer) or a crash
            p.join()
            status, message = 'error', f"the cell's process died (exit code {p.exitcode})"
            break
        if key in ('done', 'OOM', 'error'):
            status, message = ('ok' if key == 'done' else key), value or ''
        else:
            results[key] = value
    p.join()
    recv.close()
    return results, status, message


# -------------------------------------------------------------------------------------------------
# The benchmark: cells, tables, files

def parse_bytes(s):
    """'24GiB' -> 24 * 1024**3, '500MB' -> 500 * 1000**2, '1000' -> 1000."""
    m = re.fullmatch(r'\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*', s, re.I)
    if not m or m.group(1).count('.') > 1:
        raise argparse.ArgumentTypeError(f"cannot read {s!r} as a size; write e.g. 24GiB, 500MB or "
                                         f"1000000")
    power = '_KMGT'.index(m.group(2).upper()) if m.group(2) else 0
    scale = (1024 if m.group(3) else 1000) ** power
    return int(float(m.group(1)) * scale)


def fmt_bytes(n):
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if abs(n) < 1024 or unit == 'GiB':
            return f"{n:.0f} {unit}" if unit == 'B' else f"{n:.1f} {unit}"
        n /= 1024


def fmt_rate(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_or_skipped(fmt):
    """A formatter that writes 'skipped' for a figure not measured (None)."""
    return lambda x: 'skipped' if x is None else fmt(x)


# per mode: (column title, key in the numbers, formatter)
COLUMNS = {
    'state': [('measured', 'state_bytes', fmt_bytes), ('formula', 'formula_bytes', fmt_bytes),
              ('allocated', 'allocated_bytes', fmt_bytes)],
    'prefill': [('peak', 'peak_bytes', fmt_bytes), ('RSS', 'rss_bytes', fmt_bytes)],
    'decode': [('decode tok/s', 'decode_tok_s', fmt_rate), ('limit tok/s', 'limit_tok_s', fmt_rate),
               ('% of limit', 'limit_fraction', lambda x: f"{100 * x:.0f}%"),
               ('bound', 'bound', str),
               ('MB/step', 'step_bytes', lambda x: f"{x / 1e6:.4g}"),
               ('GFLOP/step', 'step_flops', lambda x: f"{x / 1e9:.3g}"),
               ('probe GB/s', 'bandwidth', lambda x: f"{x / 1e9:.1f}"),
               ('probe GFLOP/s', 'gemm_flops', lambda x: f"{x / 1e9:.1f}"),
               ('linear GB/s', 'linear_bandwidth', lambda x: f"{x / 1e9:.1f}"),
               ('uncached tok/s', 'recompute_tok_s', fmt_or_skipped(fmt_rate)),
               ('cache speed-up', 'cache_speedup', fmt_or_skipped(lambda x: f"{x:.1f}x")),
               ('prefill tok/s', 'prefill_tok_s', fmt_rate)],
    'train': [('peak', 'peak_bytes', fmt_bytes), ('peak ckpt', 'peak_bytes_ckpt', fmt_bytes),
              ('ckpt/plain', 'ckpt_ratio', lambda x: f"{x:.2f}"), ('tok/s', 'tok_s', fmt_rate),
              ('tok/s ckpt', 'tok_s_ckpt', fmt_rate)],
}
TITLES = {
    'state': "decoding state after a T-token prompt: measured cache.nbytes() | "
             "model.decode_state_bytes(T) | cache.allocated_nbytes() (with the rooms' spare space)",
    'prefill': "prefill + first token: peak memory above the weights | peak RSS above the RSS "
               "before the prefill",
    'decode': f"decode tokens/s with the cache ({DECODE_STEPS} steps after the prompt) | the "
              f"machine's limit for it, the slower of bytes/bandwidth and FLOPs/GEMM throughput | "
              f"the fraction reached | which binds | bytes and FLOPs per step (formulas) | "
              f"bandwidth and GEMM throughput (probes) | the bandwidth F.linear reads an "
              f"lm_head-sized weight at, for the batch (a probe, not a limit) | tokens/s without "
              f"the cache (the whole "
              f"context recomputed per token; skipped above T = {UNCACHED_MAX_T} unless "
              f"--uncached) | cached/uncached | prefill tokens/s",
    'train': "one forward+backward step, fp32 weights, autocast to --dtype when not fp32: peak "
             "memory above the weights (gradients included) | the same with activation "
             "checkpointing (grad_checkpoint: each block recomputed in backward) | their ratio | "
             "tokens/s without and with it",
}


def decode_table(names, contexts, cells, predicted=None, gpu=None):
    """One row per variant and context: the decode columns side by side would be too wide.
    predicted: {(variant, T): {batch: tok/s on gpu}}, shown beside the measured columns; the
    measured ones are left out when there is none (--predict_only)."""
    cols = [] if predicted and not cells else COLUMNS['decode']
    pred_head = [f"{gpu} predicted tok/s, batch {b}" for b in PREDICT_BATCHES] if predicted else []
    head = ['variant', 'T'] + (['batch'] if cols else []) + [c[0] for c in cols] + pred_head
    title = TITLES['decode'] if cols else ''
    if predicted:
        title += (' | ' if cols else '') + PREDICT_TITLE.format(gpu=gpu, **GPUS[gpu])
    lines = [f"\n### decode: {title}\n", '| ' + ' | '.join(head) + ' |',
             '|---|' + '---:|' * (len(head) - 1)]
    for v in names:
        for T in contexts:
            c = cells.get((v, T, 'decode'), {})
            row = [v, str(T)] + ([str(c.get('batch', ''))] if cols else [])
            row += [c['status'] if c.get('status') != 'ok' else f(c[key]) for _, key, f in cols]
            row += [fmt_rate(predicted[(v, T)][b]) for b in PREDICT_BATCHES] if predicted else []
            lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


PREDICT_TITLE = ("predicted, not measured: the tok/s of {gpu} at its datasheet limits "
                 "({bandwidth:.4g} B/s, {flops:.4g} dense bf16 FLOP/s), batch / max(bytes / "
                 "bandwidth, FLOPs / peak) per step, bf16 weights and state, the same formulas as "
                 "the limit column ('auto' absorbed decode: gemm, as on a GPU)")


def predictions(preset, names, contexts, gpu):
    """{(variant, T): {batch: predicted tok/s}}: arithmetic on the shapes alone, so the model is
    built on the meta device (no memory, any T); the decode step in the middle of the timed ones."""
    configs, out = variants(), {}
    for v in names:
        with torch.device('meta'):
            model = GPT(GPTConfig(**PRESETS[preset], block_size=max(contexts) + DECODE_STEPS + 1,
                                  **configs[v]))
        for T in contexts:
            middle = T + 1 + DECODE_STEPS // 2
            out[(v, T)] = {b: predict_tok_s(model, middle, torch.bfloat16, b, gpu, 'cuda')
                           for b in PREDICT_BATCHES}
    return out


def markdown_table(mode, names, contexts, cells):
    cols = COLUMNS[mode]
    head = ['T'] + (['batch'] if mode == 'train' else [])
    head += [f"{v}: {c[0]}" for v in names for c in cols]
    lines = [f"\n### {mode}: {TITLES[mode]}\n", '| ' + ' | '.join(head) + ' |',
             '|' + '---:|' * len(head)]
    for T in contexts:
        row = [str(T)]
        if mode == 'train':
            row.append(str(cells[(names[0], T, mode)]['batch']))
        for v in names:
            c = cells.get((v, T, mode), {})
            row += [c['status'] if c.get('status') != 'ok' else f(c[key]) for _, key, f in cols]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def fit_line(pts):
    """Least squares line m(T) = a + b·T through the points [(T, m)] -> (a, b) (np.polyfit); one
    point: the line through the origin."""
    T, m = np.array(pts, dtype=float).T
    if len(pts) == 1:
        return 0.0, m[0] / T[0]
    b, a = np.polyfit(T, m, 1)
    return float(a), float(b)


def budget_table(names, contexts, cells, weights, budget):
    """Least-squares line peak(T) = a + b·T through the measured prefill peaks, solved for
    weights + a + b·T = budget. An extrapolation: it is exact only where memory really is linear in
    T (not the T×T baseline)."""
    lines = [f"\n### budget: longest context whose inference fits in {fmt_bytes(budget)} "
             f"(weights + prefill peak), extrapolated linearly from the measured points\n",
             '| variant | weights | per token | fixed | measured points | '
             'longest T (extrapolated) |',
             '|---|---:|---:|---:|---:|---:|']
    fits = {}
    for v in names:
        pts = [(T, cells[(v, T, 'prefill')]['peak_bytes']) for T in contexts
               if cells.get((v, T, 'prefill'), {}).get('status') == 'ok']
        if not pts or v not in weights:
            lines.append(f"| {v} | | | | 0 | no measurement |")
            continue
        a, b = fit_line(pts)
        longest = math.floor((budget - weights[v] - a) / b) if b > 0 else None
        fits[v] = dict(bytes_per_token=b, fixed_bytes=a, weights_bytes=weights[v],
                       longest_T=longest, points=len(pts))
        lines.append(f"| {v} | {fmt_bytes(weights[v])} | {fmt_bytes(b)} | {fmt_bytes(a)} | "
                     f"{len(pts)} | {fmt_longest(longest)} |")
    return '\n'.join(lines), fits


def fmt_longest(longest):
    if longest is None:
        return 'no growth measured'
    return 'weights alone do not fit' if longest < 1 else f"{longest:,}"


TRAIN_BUDGETS = (24 * 2**30, 80 * 2**30)  # a 24 GB card (RTX 4090) and an 80 GB one (A100, H100)


def train_peak(n_params, a, b, T, batch=1):
    """Memory of training at context T: weights (fp32, 4 bytes per parameter) and AdamW's two fp32
    moments (8 bytes) counted, plus the measured step's peak at batch 1 fitted as a + b·T
    (gradients, fp32: 4 bytes per parameter, are in a, with autocast's weight copies; the
    activations in b·T, which grow with the batch)."""
    return 12 * n_params + a + batch * b * T


def train_budget(n_params, a, b, budget):
    """The longest T whose training step at batch 1 fits in budget (train_peak(T) <= budget).
    None: no growth in T measured."""
    return math.floor((budget - train_peak(n_params, a, 0.0, 0)) / b) if b > 0 else None


def train_budget_table(names, contexts, cells, params):
    """Per variant: the measured training peaks (batch 1) without and with activation
    checkpointing, fitted by a line in T, and the longest block_size that trains in each budget."""
    gib = ' and '.join(f"{n / 2**30:g} GiB" for n in TRAIN_BUDGETS)
    head = ['variant', 'params', 'weights + AdamW (counted)', 'gradients (counted)',
            'fixed (fit)', 'per token (fit)', 'per token ckpt (fit)', 'points']
    head += [f"longest T in {n / 2**30:g} GiB{ckpt}" for n in TRAIN_BUDGETS
             for ckpt in ('', ' ckpt')]
    lines = [f"\n### training budget: longest block_size that trains at batch 1 in {gib}, "
             f"extrapolated linearly from the measured step peaks: fp32 weights (4 B/param) and "
             f"AdamW's two moments (8 B/param) counted, plus the measured peak of one step "
             f"(gradients 4 B/param, autocast's weight copies, activations) as fixed + per "
             f"token·T\n", '| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
    fits = {}
    for v in names:
        ok = [T for T in contexts if cells.get((v, T, 'train'), {}).get('status') == 'ok'
              and cells[(v, T, 'train')]['batch'] == 1]
        if not ok or v not in params:
            lines.append(f"| {v} | | | | | | | 0 |" + ' |' * len(TRAIN_BUDGETS) * 2)
            continue
        P = params[v]
        fit = {k: fit_line([(T, cells[(v, T, 'train')][k]) for T in ok])
               for k in ('peak_bytes', 'peak_bytes_ckpt')}
        longest = {(n, k): train_budget(P, *fit[k], n) for n in TRAIN_BUDGETS for k in fit}
        fits[v] = dict(params=P, fit=fit, points=len(ok),
                       longest_T={f"{n}{'_ckpt' if 'ckpt' in k else ''}": x
                                  for (n, k), x in longest.items()})
        row = [v, f"{P / 1e6:.1f}M", fmt_bytes(12 * P), fmt_bytes(4 * P),
               fmt_bytes(fit['peak_bytes'][0]), fmt_bytes(fit['peak_bytes'][1]),
               fmt_bytes(fit['peak_bytes_ckpt'][1]), str(len(ok))]
        row += [fmt_longest(longest[(n, k)]) for n in TRAIN_BUDGETS
                for k in ('peak_bytes', 'peak_bytes_ckpt')]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines), fits


def write_atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, 'w', newline='') as f:
        write(f)
    os.replace(tmp, path)


def plot(path, names, contexts, cells):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [('prefill', 'peak_bytes', 'prefill peak memory (weights excluded)'),
              ('state', 'state_bytes', 'decoding state (measured)')]
    for ax, (mode, key, title) in zip(axes, panels):
        for v in names:
            pts = [(T, cells[(v, T, mode)][key] / 2**20) for T in contexts
                   if cells.get((v, T, mode), {}).get('status') == 'ok']
            failed = [f"{cells[(v, T, mode)]['status']} at {T}" for T in contexts
                      if cells.get((v, T, mode), {}).get('status', 'ok') != 'ok']
            if pts:
                label = v + (f" ({', '.join(failed)})" if failed else '')
                ax.plot(*zip(*pts), marker='o', label=label)
        ax.set(xscale='log', yscale='log', xlabel='context T (tokens)', ylabel='MiB', title=title)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format='png', dpi=120)
    os.replace(tmp, path)


def parse_args(argv=None):
    names = list(variants())
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--preset', choices=PRESETS, default='tiny')
    p.add_argument('--variants', default=','.join(names),
                   help=f"comma-separated among: {', '.join(names)}")
    p.add_argument('--contexts', default='1024,4096', help="comma-separated prompt lengths T")
    p.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'],
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    p.add_argument('--mode', default='state,prefill',
                   help=f"comma-separated among: {', '.join(MODES)}")
    p.add_argument('--budget', type=parse_bytes, default='24GiB',
                   help="memory to fit inference in (budget table)")
    p.add_argument('--mem_limit', type=parse_bytes, help="CPU: a cell allocating more is OOM "
                   "(default: the smaller of --budget and 3/4 of the memory available now)")
    p.add_argument('--timeout', type=float, default=3600,
                   help="seconds per cell (model build included)")
    p.add_argument('--prefill_chunk', type=int, default=1024, help="prompt chunk of InAttention's "
                   "'s' cache (linear-memory prefill); 0 = whole prompt")
    p.add_argument('--baseline_chunk', type=int, default=0, help="prompt chunk of every other "
                   "variant (default 0: the whole prompt at once, as a normal model does)")
    p.add_argument('--tokens_per_step', type=int, default=0, help="train: batch = "
                   "tokens_per_step // T, the same tokens per step at every T (default: batch 1)")
    p.add_argument('--batch', type=int, default=1,
                   help="state, prefill, decode: sequences at once")
    p.add_argument('--uncached', action='store_true', help=f"decode: time the uncached path "
                   f"above T = {UNCACHED_MAX_T} too (minutes per token)")
    p.add_argument('--threads', type=int, help="CPU threads per cell (default: 1 for tiny and "
                   "small, whose matmuls are too small to gain from threads, torch's default of "
                   "one per core for gpt2)")
    p.add_argument('--predict', choices=GPUS, help="decode: beside each cell, the tok/s its "
                   "step's bytes and FLOPs predict on this GPU at batch 1 and 16")
    p.add_argument('--predict_only', action='store_true', help="with --predict: print the "
                   "predicted table alone, nothing measured (seconds at any size)")
    p.add_argument('--json')
    p.add_argument('--csv')
    p.add_argument('--plot', help="PNG of prefill peak and state bytes vs T (needs matplotlib)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    args.mode = [m.strip() for m in args.mode.split(',') if m.strip()]
    bad = [v for v in args.variants if v not in names] + [m for m in args.mode if m not in MODES]
    if bad:
        p.error(f"unknown variant or mode {', '.join(bad)}; variants: {', '.join(names)}; "
                f"modes: {', '.join(MODES)}")
    try:
        args.contexts = sorted({int(t) for t in args.contexts.split(',')})
    except ValueError:
        p.error(f"--contexts {args.contexts!r}: write comma-separated integers, e.g. 1024,4096")
    if min(args.contexts) <= 0 or args.timeout <= 0:
        p.error("contexts and --timeout must be positive")
    if args.prefill_chunk < 0 or args.baseline_chunk < 0:
        p.error("--prefill_chunk and --baseline_chunk must be >= 0")
    if args.batch <= 0:
        p.error(f"--batch {args.batch}: it must be at least 1")
    if 'train' in args.mode and 0 < args.tokens_per_step < max(args.contexts):
        p.error(f"--tokens_per_step {args.tokens_per_step} is below the longest context "
                f"{max(args.contexts)}: raise it to at least that")
    if (args.predict or args.predict_only) and args.mode != ['decode']:
        p.error("--predict and --predict_only go with --mode decode alone")
    if args.predict_only and not args.predict:
        p.error("--predict_only needs --predict NAME, e.g. --predict H100-SXM")
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    for path in (args.json, args.csv, args.plot):  # fail now, not after hours of measuring
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"cannot write {path}: its folder does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    args.threads = args.threads if args.threads is not None else (0 if args.preset == 'gpt2' else 1)
    args.dtype = args.dtype or ('bfloat16' if args.device == 'cuda' else 'float32')
    if args.mem_limit is None:
        with open('/proc/meminfo') as f:
            available = int(re.search(r'MemAvailable:\s+(\d+) kB', f.read()).group(1)) * 1024
        args.mem_limit = min(args.budget, available * 3 // 4)
    return args


def main(argv=None):
    args = parse_args(argv)
    configs = variants()
    block_size = max(args.contexts) + DECODE_STEPS + 1  # learned positions: prompt and decoding
    specs, inference = [], [m for m in args.mode if m != 'train']
    for T in args.contexts:
        for v in args.variants:
            cfg = dict(PRESETS[args.preset], block_size=block_size, dropout=0.0, **configs[v])
            linear_prefill = cfg['attention'] == 'inattention' and cfg.get('inattn_cache') == 's'
            chunk = (args.prefill_chunk if linear_prefill else args.baseline_chunk) or None
            base = dict(variant=v, T=T, config=cfg, device=args.device, dtype=args.dtype,
                        chunk=chunk, mem_limit=args.mem_limit, threads=args.threads)
            if inference:
                specs.append(dict(base, kind='inference', modes=inference, batch=args.batch,
                                  uncached=args.uncached or T <= UNCACHED_MAX_T))
            if 'train' in args.mode:
                batch = max(1, args.tokens_per_step // T)
                specs.append(dict(base, kind='train', modes=['train'], batch=batch))

    if args.predict_only:
        specs = []
    predicted = args.predict and predictions(args.preset, args.variants, args.contexts,
                                             args.predict)
    cuda = args.device == 'cuda'
    meter = 'torch.cuda.max_memory_allocated' if cuda else 'live tensor storages (Tracker)'
    limit = '.' if cuda else f", memory limit {fmt_bytes(args.mem_limit)}."
    print(f"# bench_vram: preset {args.preset}, {args.dtype} on {args.device}, contexts "
          f"{args.contexts}\n\nMemory: {meter} above the weights; RSS: the cell's peak resident "
          f"set above its RSS when the step starts (model built).\nPrefill chunk: "
          f"{args.prefill_chunk or 'whole prompt'} for InAttention's 's' cache, "
          f"{args.baseline_chunk or 'whole prompt'} for the others. Each cell: its own process, "
          f"timeout {args.timeout:g} s{limit}")
    cells, weights, params, failures = {}, {}, {}, []
    bar = tqdm(specs, desc='cells', unit='cell', disable=None)  # a bar on a terminal only
    for spec in bar:
        bar.set_postfix_str(f"{spec['variant']} T={spec['T']} {spec['kind']}")
        t0 = time.monotonic()
        results, status, message = run_cell(spec, args.timeout)
        seconds = time.monotonic() - t0
        if 'weights' in results:
            weights[spec['variant']] = results.pop('weights')
            params[spec['variant']] = results.pop('params')
        for mode in spec['modes']:
            c = dict(status=status, message=message)
            if mode in results:
                c = dict(results[mode], status='ok')
            cells[(spec['variant'], spec['T'], mode)] = dict(c, cell_seconds=seconds,
                                                             batch=spec['batch'])
        if status != 'ok':
            failures.append(f"{spec['variant']} T={spec['T']} {spec['kind']}: {status}: {message}")

    print("\nWeights (reported separately): "
          + ', '.join(f"{v} {fmt_bytes(n)}" for v, n in weights.items()))
    for mode in MODES:
        if mode == 'decode' and mode in args.mode:
            print(decode_table(args.variants, args.contexts, cells, predicted, args.predict))
        elif mode in args.mode:
            print(markdown_table(mode, args.variants, args.contexts, cells))
    mismatch = [f"{v} T={T}: measured {c['state_bytes']} B, formula {c['formula_bytes']} B"
                for (v, T, m), c in cells.items()
                if m == 'state' and c['status'] == 'ok' and c['state_bytes'] != c['formula_bytes']]
    if mismatch:
        print("\nstate: measured differs from the formula: " + '; '.join(mismatch))
    fits, train_fits = {}, {}
    if 'prefill' in args.mode:
        text, fits = budget_table(args.variants, args.contexts, cells, weights, args.budget)
        print(text)
    if 'train' in args.mode:
        text, train_fits = train_budget_table(args.variants, args.contexts, cells, params)
        print(text)
    if failures:
        print("\nFailed cells:\n" + '\n'.join(f"- {f}" for f in failures))

    rows = [dict(variant=v, T=T, mode=m, **c) for (v, T, m), c in cells.items()]
    if args.json:
        run = dict(args=vars(args), weights_bytes=weights, budget=fits, cells=rows,
                   train_budget=train_fits,
                   predicted=[dict(variant=v, T=T, gpu=args.predict, batch=b, tok_s=x)
                              for (v, T), by_batch in (predicted or {}).items()
                              for b, x in by_batch.items()])
        write_atomic(args.json, lambda f: json.dump(run, f, indent=1))
    if args.csv:
        first = ['variant', 'T', 'mode', 'status']
        fields = first + sorted({k for r in rows for k in r} - set(first))
        write_atomic(args.csv, lambda f: (w := csv.DictWriter(f, fields), w.writeheader(),
                                          w.writerows(rows)))
    if args.plot:
        plot(args.plot, args.variants, args.contexts, cells)
    return cells


if __name__ == '__main__':
    main()
