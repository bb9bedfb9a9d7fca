"""The GPU check, run as `bash .ci/gpu` on a machine with one CUDA GPU (docs/guide.md:
"Checking on a GPU"). In at most five minutes on an H200, with the torch that is there
and nothing installed or downloaded:

  1. tests/test_cuda.py: every attention variant in bfloat16 (cached = uncached decoding, and the
     rest)
  2. 100 training iterations of every variant, torch.compile + bfloat16, and one float16 run with
     the GradScaler, on a synthetic character dataset written here: the val loss must fall by
     10 %; the GradScaler may skip at most MAX_SKIPPED steps (train.py's "float16 gradients
     overflowed" lines)
  3. bench_vram.py --preset gpt2: state, prefill and decode at 4K and 32K tokens, and 128K where
     150 s are left, every row -> assets/bench_gpt2_cuda.json and assets/vram_gpt2_cuda.png
  4. decode tokens/s at 32K: InAttention's absorbed step (each GPTConfig.inattn_decode form, where
     the model has that field) against its K/V cache, batch 1 and 16
  5. the one-card configs (config/*_1gpu.py): 3 iterations each at its block size and batch, from
     scratch on synthetic GPT-2-sized tokens, eager; train.py's peak memory against the training
     budget's prediction (bench_vram.py --mode train on this GPU, fitted and extrapolated)
  6. a markdown summary on stdout, in assets/gpu_check_cuda.md, and in $OUT with the files above
     where OUT is set

--dry-run does the same on the CPU at tiny sizes, eager, float32 instead of float16 (train.py
refuses float16 on a CPU), in about a minute: CI runs it so that this script cannot rot. Exit
status 0: all passed; 1: a check failed; 2: no CUDA GPU (one line on stderr).
"""
import argparse
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent
CONFIGS = {'causal': 'train', 'inattention': 'inattn', 'lightning': 'lightning', 'infini': 'infini'}
BENCH_ROWS = 'causal,causal-materialised,inattention,inattention-kv,lightning,infini'
MAX_SKIPPED = 5  # GradScaler skips while its scale calibrates: a few are normal
TRAIN = ['--max_iters=100', '--eval_interval=50', '--eval_iters=10', '--log_interval=10',
         '--dropout=0.0', '--warmup_iters=10', '--lr_decay_iters=100', '--learning_rate=1e-3',
         '--gradient_accumulation_steps=1']
SETTINGS = {  # what differs between the real check and the dry run
    'cuda': dict(deadline=290, parallel=6, chars=2_000_000, dtypes=('bfloat16', 'float16'),
                 train=['--device=cuda', '--compile=True', '--n_layer=2', '--n_head=4',
                        '--n_embd=128', '--block_size=256', '--batch_size=32',
                        '--lightning_block=64', '--infini_segment=64'],
                 preset='gpt2', contexts='4096,32768', long_context=(131072, 150), cell_timeout=45,
                 must_run=32768,  # every bench cell up to this context
                                  # must run (the T x T baseline may OOM)
                 decode=dict(preset='gpt2', T=32768, batches=(1, 16), steps=32, chunk=1024),
                 onecard=dict(preset='gpt2', contexts='1024,2048', needs=90,
                              train=['--device=cuda', '--compile=False'])),
    'cpu': dict(deadline=170, parallel=2, chars=200_000, dtypes=('bfloat16', 'float32'),
                train=['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2',
                       '--n_embd=32', '--block_size=64', '--batch_size=8', '--lightning_block=16',
                       '--infini_segment=16'],
                preset='tiny', contexts='128,512', long_context=(1024, 60), cell_timeout=60,
                must_run=512,
                decode=dict(preset='tiny', T=256, batches=(1, 16), steps=8, chunk=64),
                onecard=dict(preset='tiny', contexts='64,128', needs=30,
                             train=['--device=cpu', '--compile=False', '--dtype=float32',
                                    '--n_layer=2', '--n_head=2', '--n_embd=64',
                                    '--block_size=128', '--batch_size=2'])),
}
HAS_DECODE_FORMS = 'inattn_decode' in {f.name for f in fields(GPTConfig)}
DECODE_FORMS = ('gemm', 'stream', 'auto') if HAS_DECODE_FORMS else ()
START, LOG, GROUPS = time.monotonic(), [], set()  # LOG: every command run, with its whole output


def log(msg):
    print(f"[{time.monotonic() - START:5.0f}s] {msg}", file=sys.stderr, flush=True)


def write_dataset(folder, n_chars):
    """A character dataset in prepare_data.py's format: 64 random 'words' in random sentences,
    so that the loss can fall (spelling is predictable) but never to zero."""
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 7)))
             for _ in range(64)]
    lines, size = [], 0
    while size < n_chars:
        lines.append(' '.join(rng.choice(words) for _ in range(rng.randint(4, 12))) + '.\n')
        size += len(lines[-1])
    text = ''.join(lines)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    folder.mkdir(parents=True)
    ids[:int(0.9 * len(ids))].tofile(folder / 'train.bin')
    ids[int(0.9 * len(ids)):].tofile(folder / 'val.bin')
    with open(folder / 'meta.pkl', 'wb') as f:
        itos = {i: ch for ch, i in stoi.items()}
        pickle.dump({'vocab_size': len(chars), 'stoi': stoi, 'itos': itos}, f)


def write_token_dataset(folder, n_tokens):
    """Random GPT-2 token ids in train.bin/val.bin and no meta.pkl: a dataset of GPT-2's
    vocabulary (the model is OpenWebText's shape), for memory and not for learning."""
    ids = np.random.default_rng(0).integers(0, 50257, n_tokens, dtype=np.uint16)
    folder.mkdir(parents=True)
    ids[:int(0.9 * n_tokens)].tofile(folder / 'train.bin')
    ids[int(0.9 * n_tokens):].tofile(folder / 'val.bin')


ONECARD = {'causal': 'train_long_gpt2_1gpu', 'inattention': 'inattn_long_gpt2_1gpu'}


def onecard_configs(work, s, env, remaining):
    """A few iterations of each one-card config, from scratch, against the training budget's
    prediction of its peak: bench_vram.py --mode train on this device at two contexts, the line
    through them extrapolated to the config's block size and batch (bench_vram.train_peak).
    -> (markdown lines, failures)"""
    import bench_vram
    o = s['onecard']
    bench_json = work / 'bench_train.json'
    ok, _, _ = run('bench_vram train', [
        sys.executable, 'bench_vram.py', '--device', o['train'][0].removeprefix('--device='),
        '--preset', o['preset'], '--mode', 'train', '--variants', ','.join(ONECARD),
        '--contexts', o['contexts'], '--json', bench_json], remaining(60), env)
    if not ok:
        return [], ["one-card configs: bench_vram.py --mode train failed (the log has its output)"]
    budget = json.loads(bench_json.read_text())['train_budget']
    write_token_dataset(work / 'tokens', 400_000)
    lines = ["| config | block_size | batch | grad_checkpoint | peak (train.py) | predicted | "
             "measured / predicted | seconds |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    failures = []
    for v, name in ONECARD.items():
        cmd = [sys.executable, 'train.py', f"config/{name}.py", '--init_from=scratch',
               f"--dataset={work / 'tokens'}", f"--out_dir={work / name}", '--wandb_log=False',
               '--max_iters=3', '--eval_interval=3', '--eval_iters=1', '--log_interval=1',
               '--gradient_accumulation_steps=2', '--bias=True', *o['train']]  # GPT-2's shape
        ok, out, secs = run(name, cmd, remaining(120), env)
        if not ok:
            failures.append(f"one-card config {name}: train.py failed")
            continue
        cfg = torch.load(work / name / 'ckpt.pt', map_location='cpu', weights_only=False)['config']
        T, B, ckpt = cfg['block_size'], cfg['batch_size'], cfg['grad_checkpoint']
        fit = budget[v]['fit']['peak_bytes_ckpt' if ckpt else 'peak_bytes']
        predicted = bench_vram.train_peak(budget[v]['params'], *fit, T, B)
        peak = re.search(r'^peak GPU memory: (\d+) bytes', out, re.M)
        measured = int(peak.group(1)) if peak else None
        shown = (f"{measured / 2**30:.2f} GiB | {predicted / 2**30:.2f} GiB | "
                 f"{measured / predicted:.2f}" if measured else
                 f"n/a on the CPU | {predicted / 2**30:.3f} GiB | n/a")
        lines.append(f"| {name} | {T} | {B} | {ckpt} | {shown} | {secs:.0f} |")
    return lines, failures


def run(name, cmd, timeout, env=None):
    """Run a command from the repo root; -> (ok, stdout, seconds). Its whole output goes
    to the log. It runs in a process group of its own, so that a timeout (or Ctrl-C:
    stop()) ends every process it started."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, **(env or {})), start_new_session=True)
    GROUPS.add(p.pid)
    try:
        out, err = p.communicate(timeout=max(timeout, 1))
        ok = p.returncode == 0
        err = err + ('' if ok else f"\nexit status {p.returncode}")
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        ok, err = False, err + f"\ntimed out after {timeout:.0f} s"
    GROUPS.discard(p.pid)
    LOG.append(f"## {name} ({time.monotonic() - t0:.0f} s)\n"
               f"$ {' '.join(map(str, cmd))}\n{out}\n{err}\n")
    if not ok:
        log(f"{name} FAILED; its last lines:\n" + '\n'.join((out + err).splitlines()[-15:]))
    return ok, out, time.monotonic() - t0


def stop(signum, frame):
    """Ctrl-C: the commands run in process groups of their own,
    which the terminal's signal does not reach."""
    for pid in list(GROUPS):
        os.killpg(pid, signal.SIGKILL)
    raise KeyboardInterrupt


def parse_train(out):
    """train.py's stdout -> (val losses by eval step,
    train losses by iteration, GradScaler-skipped steps)."""
    evals = re.findall(r'^step (\d+): train loss \S+, val loss (\S+)$', out, re.M)
    val = {int(i): float(v) for i, v in evals}
    train = {int(i): float(v) for i, v in re.findall(r'^iter (\d+): loss ([^,\s]+),', out, re.M)}
    overflow = r'^iter \d+: float16 gradients overflowed, optimizer step skipped'
    skipped = len(re.findall(overflow, out, re.M))
    return val, train, skipped


def train_row(ok, out, seconds, variant, dtype):
    """-> (what is wrong with a training run, '' if nothing; its row in the summary's table)"""
    val, train, skipped = parse_train(out)
    fell_short = len(val) < 2 or val[max(val)] > 0.9 * val[min(val)]
    problem = ('train.py failed' if not ok else
               'the val loss fell by less than 10 %' if fell_short else
               f"the GradScaler skipped {skipped} steps (at most {MAX_SKIPPED})"
               if skipped > MAX_SKIPPED else '')
    losses = ' → '.join(f"{v:.3f}" for _, v in sorted(val.items())) or 'none'
    iters = f"{train[min(train)]:.3f} → {train[max(train)]:.3f}" if train else 'none'
    return problem, (f"| {variant} | {dtype} | {losses} | {iters} | {skipped} | {seconds:.0f} | "
                     f"{problem or 'ok'} |")


def decode_speed(device, preset, T, batches, steps, chunk):
    """Decode tokens/s of InAttention at context T in bfloat16 (random weights, greedy):
    the absorbed step on the cache of initial states, in each form the model has,
    against the per-layer K/V cache. -> {row: {batch: tok/s}}"""
    from bench_vram import PRESETS
    rows = {f"absorbed ({f})": dict(inattn_cache='s', inattn_decode=f) for f in DECODE_FORMS}
    rows = rows or {'absorbed (s cache)': dict(inattn_cache='s')}
    rows['K/V cache (inattention-kv)'] = dict(inattn_cache='kv')
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    results = {}
    for name, kw in rows.items():
        torch.manual_seed(0)
        cfg = GPTConfig(**PRESETS[preset], block_size=T + steps + 8, attention='inattention', **kw)
        model = GPT(cfg).to(device, torch.bfloat16).eval()
        results[name] = {}
        for B in batches:
            cache = model.new_cache()
            with torch.no_grad():
                prompt = torch.randint(cfg.vocab_size, (B, T), device=device)
                tok = model.prefill(prompt, cache, chunk).argmax(-1)
                for i in range(steps + 2):  # two warm-up steps, then the timed ones
                    if i == 2:
                        sync()
                        t0 = time.perf_counter()
                    tok = model(tok, cache=cache)[0].argmax(-1)
                sync()
            results[name][B] = B * steps / (time.perf_counter() - t0)
            del cache
        del model
        if device == 'cuda':
            torch.cuda.empty_cache()
    return results


def bench_failures(cells, must_run):
    """Cells that must be 'ok': every one up to must_run tokens (the T x T baseline may run out of
    memory), and no cell anywhere may crash; a measured decoding state must equal the formula."""
    bad = []
    for c in cells:
        where = f"{c['variant']} T={c['T']} {c['mode']}"
        if c['status'] == 'error' or (c['T'] <= must_run and c['status'] != 'ok' and not (
                c['variant'] == 'causal-materialised' and c['status'] == 'OOM')):
            bad.append(f"bench {where}: {c['status']} {c.get('message', '')}")
        elif (c['mode'] == 'state' and c['status'] == 'ok'
              and c['state_bytes'] != c['formula_bytes']):
            bad.append(f"bench {where}: state {c['state_bytes']} B, formula {c['formula_bytes']} B")
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--dry-run', action='store_true',
                   help="the same steps on the CPU at tiny sizes (what CI runs)")
    p.add_argument('--contexts', help="bench_vram.py's contexts (default: 4096,32768, and 131072 "
                   "where there is time; dry run: 128,512 and 1024)")
    args = p.parse_args()
    signal.signal(signal.SIGINT, stop)
    device = 'cpu' if args.dry_run else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU, and torch sees none (on a CPU: bash .ci/gpu --dry-run)",
              file=sys.stderr)
        sys.exit(2)
    s = SETTINGS[device]
    deadline = START + s['deadline']
    remaining = lambda cap: min(cap, deadline - time.monotonic())  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    results = REPO / 'assets' if device == 'cuda' else work
    # on a GPU six processes share the CPUs:
    # 16 compile workers each would crowd the H200 machine's 16 cores
    env = ({'TORCHINDUCTOR_COMPILE_THREADS': '3'} if device == 'cuda' else
           {'OMP_NUM_THREADS': '1', 'GPU_CHECK_DEVICE': 'cpu'})
    name = torch.cuda.get_device_name() if device == 'cuda' else 'CPU'
    log(f"GPU check on {name}, torch {torch.__version__}; work folder {work}")
    write_dataset(work / 'data', s['chars'])
    failures, notes = [], []

    # 1 + 2: the tests and the training runs side by side (nothing here is timed)
    jobs = {'tests': [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                      'tests/test_cuda.py']}
    runs = [(v, s['dtypes'][0]) for v in CONFIGS] + [('causal', s['dtypes'][1])]
    for v, dtype in runs:
        jobs[f"train {v} {dtype}"] = [sys.executable, 'train.py',
                                      f"config/{CONFIGS[v]}_shakespeare_char.py",
                                      f"--dataset={work / 'data'}",
                                      f"--out_dir={work / f'out-{v}-{dtype}'}",
                                      f"--dtype={dtype}", *TRAIN, *s['train']]
    log(f"tests/test_cuda.py and {len(runs)} training runs, {s['parallel']} at a time")
    with ThreadPoolExecutor(s['parallel']) as pool:
        done = dict(zip(jobs, pool.map(lambda job: run(job, jobs[job], remaining(240), env), jobs)))
    ok, out, secs = done['tests']
    tests = (out.strip().splitlines() or ['no output'])[-1]
    if not ok or 'skipped' in tests:
        failures.append(f"tests/test_cuda.py: {tests}")
    train_lines = []
    for v, dtype in runs:
        problem, line = train_row(*done[f"train {v} {dtype}"], v, dtype)
        train_lines.append(line)
        if problem:
            failures.append(f"training {v} {dtype}: {problem}")
    passed = sum(line.endswith('| ok |') for line in train_lines)
    log(f"tests: {tests}; training: {passed} of {len(runs)} passed")

    # 3: memory and speed tables, one cell at a time;
    # the longest context only where there is time for it
    contexts, (long_T, long_needs) = s['contexts'], s['long_context']
    if args.contexts or remaining(long_needs) >= long_needs:
        contexts = args.contexts or f"{contexts},{long_T}"
    else:
        notes.append(f"bench_vram at T={long_T} was left out: it needs {long_needs} s, "
                     f"and fewer were left.")
    bench_json = results / f"bench_{s['preset']}_{device}.json"
    bench_png = results / f"vram_{s['preset']}_{device}.png"
    # budget table
    budget = torch.cuda.get_device_properties(0).total_memory if device == 'cuda' else 24 * 2**30
    ok, bench_out, bench_secs = run('bench_vram', [
        sys.executable, 'bench_vram.py', '--device', device, '--preset', s['preset'],
        '--contexts', contexts, '--variants', BENCH_ROWS, '--mode', 'state,prefill,decode',
        '--timeout', str(s['cell_timeout']), '--budget', str(budget), '--json', bench_json,
        '--plot', bench_png], remaining(200), env)
    if ok:
        failures += bench_failures(json.loads(bench_json.read_text())['cells'], s['must_run'])
    else:
        failures.append("bench_vram.py failed (its output is in the log)")
    log(f"bench_vram: {'done' if ok else 'FAILED'}")

    # 4: InAttention's decode step, in this process
    d, speed = s['decode'], {}
    t0 = time.monotonic()
    try:
        if remaining(30) < 15:
            raise TimeoutError(f"only {remaining(30):.0f} s of the {s['deadline']} s left")
        speed = decode_speed(device, d['preset'], d['T'], d['batches'], d['steps'], d['chunk'])
    except Exception as e:  # noqa: BLE001 - reported, then the summary is still written
        failures.append(f"decode speed: {type(e).__name__}: {e}")
    decode_secs = time.monotonic() - t0
    log(f"decode speed: {'done' if speed else 'FAILED'}")

    # 5: the one-card configs, where there is time
    onecard_lines, onecard_secs = [], 0.0
    if remaining(s['onecard']['needs']) >= s['onecard']['needs']:
        t0 = time.monotonic()
        onecard_lines, bad = onecard_configs(work, s, env, remaining)
        failures += bad
        onecard_secs = time.monotonic() - t0
        log(f"one-card configs: {'done' if not bad else 'FAILED'}")
    else:
        notes.append(f"the one-card configs were left out: they need {s['onecard']['needs']} s, "
                     f"and fewer were left.")

    # 6: the summary
    total = time.monotonic() - START
    if total > s['deadline'] + 10:
        failures.append(f"the check took {total:.0f} s, more than its {s['deadline'] + 10} s")
    dry = ' (dry run on the CPU)' if args.dry_run else ''
    compiled = 'torch.compile' if device == 'cuda' else 'eager'
    md = [f"# GPU check{dry}: {'FAIL' if failures else 'PASS'}\n",
          f"{name}, torch {torch.__version__}, {total:.0f} s in all.\n",
          f"## tests/test_cuda.py ({secs:.0f} s)\n\n{tests}\n",
          f"## Training: 100 iterations, {compiled}, synthetic characters\n",
          "| variant | dtype | val loss at steps 0, 50, 100 | train loss, first → last logged | "
          "GradScaler-skipped steps | seconds | result |", "|---|---|---|---|---:|---:|---|",
          *train_lines,
          f"\nThe val loss must fall by 10 %; at most {MAX_SKIPPED} skipped steps.\n",
          f"## Memory and speed: bench_vram.py ({bench_secs:.0f} s; {bench_json.name}, "
          f"{bench_png.name})\n",
          re.sub(r'^# ', '', bench_out.strip()),
          f"\n## Decode tokens/s at T = {d['T']}, bfloat16, {d['preset']} sizes "
          f"({decode_secs:.0f} s)\n",
          '| InAttention step | ' + ' | '.join(f"batch {B}" for B in d['batches']) + ' |',
          '|---|' + '---:|' * len(d['batches'])]
    md += [f"| {row} | " + ' | '.join(f"{r[B]:,.0f}" for B in d['batches']) + ' |'
           for row, r in speed.items()]
    if onecard_lines:
        md += [f"\n## One-card configs: 3 iterations at their block size, from scratch, eager "
               f"({onecard_secs:.0f} s)\n",
               "Peak: torch.cuda.max_memory_allocated in train.py. Predicted: weights and AdamW "
               "(12 bytes per parameter) + the training step's peak measured by bench_vram.py "
               "--mode train at two contexts on this device, fitted as fixed + per token · T "
               "and extrapolated to block_size · batch.\n", *onecard_lines]
    if not DECODE_FORMS:
        notes.append("GPTConfig has no inattn_decode field: the absorbed step has one form.")
    md += [f"\n{n}" for n in notes]
    md.append("\n## Failures\n\n" + '\n'.join(f"- {f}" for f in failures) if failures else
              "\nAll checks passed.")
    summary = '\n'.join(md) + '\n'
    print(summary)
    (work / 'gpu_check.log').write_text('\n'.join(LOG))  # every command with its whole output
    if device == 'cuda':
        (results / 'gpu_check_cuda.md').write_text(summary)
    # a folder that a caller collects (the summary, the log, the bench's files)
    if os.environ.get('OUT'):
        (Path(os.environ['OUT']) / f"gpu_check_{device}.md").write_text(summary)
        for f in (work / 'gpu_check.log', bench_json, bench_png):
            if f.exists():
                shutil.copy(f, os.environ['OUT'])
    if failures:
        log(f"{len(failures)} failure(s); the full log: {work / 'gpu_check.log'}")
        sys.exit(1)
    shutil.rmtree(work)


if __name__ == '__main__':
    main()
