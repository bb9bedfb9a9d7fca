"""Shared fixtures: a tiny character dataset, a first training run on it, and running train.py / sample.py the way a
user does (or inside this process, for the runs that stop early)."""
import io
import os
import pickle
import runpy
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'  # reference data beside the repo: tiktoken's cached GPT-2 BPE file
TEXT = 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n' * 120

# a model and a run small enough for a few iterations in about a second on one CPU core
TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--lr_decay_iters=8', '--learning_rate=1e-3', '--min_lr=1e-4']


def write_char_dataset(folder, text):
    """What prepare_data.py writes for a character dataset: uint16 ids in train.bin/val.bin (90/10), meta.pkl."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(folder / 'train.bin')
    ids[n:].tofile(folder / 'val.bin')
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'stoi': stoi, 'itos': {i: ch for ch, i in stoi.items()}}, f)
    return folder


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    return write_char_dataset(tmp_path_factory.mktemp('data') / 'tiny_char', TEXT)


N = 4  # iterations of first_run; test_train.py's resume tests continue it to 2N


@pytest.fixture(scope='session')
def first_run(char_data, tmp_path_factory):
    """N iterations with dropout (so the random numbers matter), a checkpoint at N; -> (folder, stdout).
    Shared by test_train.py (which copies the folder before changing anything) and test_sample.py."""
    tmp = tmp_path_factory.mktemp('train')
    r = run('train.py', *TINY, '--out_dir=run_n', f'--dataset={char_data}', f'--max_iters={N}',
            f'--eval_interval={N}', '--dropout=0.1', cwd=tmp)
    return tmp / 'run_n', r.stdout


def run(script, *args, cwd, expect_ok=True):
    """Run a repo script in its own process (one thread: fast for tiny models, and the same arithmetic every run)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', WANDB_MODE='offline')
    if 'TIKTOKEN_CACHE_DIR' not in env and (SHARED / 'tiktoken_cache').is_dir():
        env['TIKTOKEN_CACHE_DIR'] = str(SHARED / 'tiktoken_cache')
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
    return r


def run_here(script, *args):
    """Run a repo script inside this process until it exits: -> (exit status, stdout, stderr). No new Python and
    torch imports, so it is fast; for runs that do not train (bad input, sampling), since it shares this process's
    state (its torch seed, for one)."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [str(REPO / script), *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name='__main__')
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = argv
    return status, out.getvalue(), err.getvalue()


def one_line_error(r, status):
    """The process failed with `status` and exactly one line on stderr, no traceback; return that line."""
    assert r.returncode == status, r.stdout + r.stderr
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]
