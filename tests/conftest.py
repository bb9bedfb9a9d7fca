"""Shared fixtures: a tiny character dataset, a first training run on it, and running
train.py / sample.py the way a user does (or inside this process, for the runs that stop early).

Two resources come from outside the repo, and the tests that need them are skipped, with a line
that says what is missing, where they cannot be had:
    gpt2_bpe     GPT-2's BPE from tiktoken: TIKTOKEN_CACHE_DIR=FOLDER with tiktoken's cached file,
                 or online (tiktoken downloads it)
    shakespeare  Tiny Shakespeare's input.txt: SHAKESPEARE_INPUT=PATH, or online (downloaded once)
"""
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
import torch

import prepare_data
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
TEXT = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\n'
        'All:\nSpeak, speak.\n') * 120

# a model and a run small enough for a few iterations in about a second on one CPU core
TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2',
        '--log_interval=1', '--warmup_iters=2', '--lr_decay_iters=8', '--learning_rate=1e-3',
        '--min_lr=1e-4']


def write_char_dataset(folder, text):
    """What prepare_data.py writes for a character dataset:
    uint16 ids in train.bin/val.bin (90/10), meta.pkl."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(folder / 'train.bin')
    ids[n:].tofile(folder / 'val.bin')
    with open(folder / 'meta.pkl', 'wb') as f:
        itos = {i: ch for ch, i in stoi.items()}
        pickle.dump({'vocab_size': len(chars), 'stoi': stoi, 'itos': itos}, f)
    return folder


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    return write_char_dataset(tmp_path_factory.mktemp('data') / 'tiny_char', TEXT)


N = 4  # iterations of first_run; test_train.py's resume tests continue it to 2N


@pytest.fixture(scope='session')
def first_run(char_data, tmp_path_factory):
    """N iterations with dropout (so the random numbers matter), a checkpoint at N; ->
    (folder, stdout). Shared by test_train.py (which copies the folder before changing
    anything) and test_sample.py."""
    tmp = tmp_path_factory.mktemp('train')
    r = run('train.py', *TINY, '--out_dir=run_n', f'--dataset={char_data}', f'--max_iters={N}',
            f'--eval_interval={N}', '--dropout=0.1', cwd=tmp)
    return tmp / 'run_n', r.stdout


def run(script, *args, cwd, expect_ok=True):
    """Run a repo script in its own process (one thread:
    fast for tiny models, and the same arithmetic every run)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', WANDB_MODE='offline')
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
    return r


def train_then_resume(char_data, tmp_path, *model_args):
    """train.py trains a tiny model with model_args for 2 iterations, then the same command with
    max_iters=3 must resume it (auto_resume) at iteration 2; -> the checkpoint it wrote."""
    args = [*TINY, f'--dataset={char_data}', '--out_dir=out', '--eval_interval=2', *model_args]
    run('train.py', *args, '--max_iters=2', cwd=tmp_path)
    r = run('train.py', *args, '--max_iters=3', cwd=tmp_path)
    assert 'auto_resume' in r.stdout and 'iter 2:' in r.stdout
    return torch.load(tmp_path / 'out' / 'ckpt.pt', map_location='cpu', weights_only=False)


def run_here(script, *args):
    """Run a repo script inside this process until it exits: -> (exit status, stdout,
    stderr). No new Python and torch imports, so it is fast; for runs that do not train (bad
    input, sampling), since it shares this process's state (its torch seed, for one)."""
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
    """The process failed with `status` and exactly one
    line on stderr, no traceback; return that line."""
    assert r.returncode == status, r.stdout + r.stderr
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -----------------------------------------------------------------------------
# resources from outside the repo: found once per session, quickly, or their tests are skipped

BPE_TIMEOUT = 30  # seconds for tiktoken to find or download its file; its download has no timeout
SHAKESPEARE_INPUT = os.environ.get('SHAKESPEARE_INPUT')  # read before any test can change it
ASK_TIKTOKEN = """
import tiktoken
try:
    tiktoken.get_encoding('r50k_base')
except Exception as e:
    print(type(e).__name__)
    raise SystemExit(1)
"""


def gpt2_bpe_missing():
    """None if tiktoken can load GPT-2's BPE here, else why not, in a word. Asked in a child
    process: one that hangs on a network that drops packets is killed after BPE_TIMEOUT."""
    try:
        r = subprocess.run([sys.executable, '-c', ASK_TIKTOKEN], capture_output=True, text=True,
                           timeout=BPE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f'no answer in {BPE_TIMEOUT} s'
    if r.returncode == 0:
        return None
    return r.stdout.strip() or f'exit status {r.returncode}'


@pytest.fixture(scope='session')
def gpt2_bpe():
    """GPT-2's BPE (a tiktoken Encoding), or the test is skipped. Once per session."""
    why = gpt2_bpe_missing()
    if why is not None:
        cache = os.environ.get('TIKTOKEN_CACHE_DIR')
        where = (f'TIKTOKEN_CACHE_DIR={cache} holds no cached file for it' if cache else
                 "set TIKTOKEN_CACHE_DIR to a folder with tiktoken's cached file")
        pytest.skip(f"needs GPT-2's BPE: {where}, or go online ({why})")
    return prepare_data.get_encoding()


@pytest.fixture(scope='session')
def shakespeare(tmp_path_factory):
    """The path of Tiny Shakespeare's input.txt: $SHAKESPEARE_INPUT, else downloaded now, else the
    test is skipped."""
    if SHAKESPEARE_INPUT:
        if not Path(SHAKESPEARE_INPUT).is_file():  # set, but wrong: an error, not a skip
            pytest.fail(f'SHAKESPEARE_INPUT={SHAKESPEARE_INPUT} is not a file: set it to Tiny '
                        f'Shakespeare\'s input.txt, or unset it')
        return Path(SHAKESPEARE_INPUT)
    try:
        return prepare_data.download_shakespeare(tmp_path_factory.mktemp('tinyshakespeare') /
                                                 'input.txt', timeout=10)
    except prepare_data.PrepareError:
        pytest.skip('needs Tiny Shakespeare: set SHAKESPEARE_INPUT to the path of its input.txt, '
                    'or go online (its download failed)')


def tiny_gpt(**kw):
    """A tiny GPT in eval mode with seeded weights: the unit of the model tests."""
    args = dict(block_size=32, vocab_size=37, n_layer=2, n_head=4, n_embd=32)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args)).eval()


def assert_same_state(a, b):
    """Two checkpoints hold the same iteration, weights and AdamW state (moments, step counts),
    bit for bit."""
    assert a['iter_num'] == b['iter_num']
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(sa[i][name], sb[i][name]), (i, name)


def varied_gpt(**kw):
    """tiny_gpt whose output varies with its input: the unit of the equivalence tests (cached =
    uncached, absorbed = standard). GPT-2's initial weights (std 0.02, zero biases) give a model
    that repeats one or two tokens, and zero biases hide any decoding path that drops a bias. Here
    every bias is random (std 0.1) and every matrix is redrawn at std 1/sqrt(its columns) (fan-in;
    n_embd for the embeddings): logits of std ~1, so that sampling at temperature 1 draws 10-18
    distinct tokens of 30. Same weights every call."""
    model = tiny_gpt(**kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.size(1) ** 0.5)
    return model


def sample_with_logits(model, idx, n, seed=0, **kw):
    """generate_tokens at temperature 1 from a seeded generator -> (tokens (B, n), logits
    (B, n, V)): the tokens and the logits each was drawn from (read by a hook on lm_head: the
    last position of its last call before each token is yielded)."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out[:, -1]))
    torch.manual_seed(seed)
    tokens, logits = [], []
    try:
        for tok in model.generate_tokens(idx, n, temperature=1.0, **kw):
            tokens.append(tok)
            logits.append(seen[-1])
    finally:
        hook.remove()
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def assert_cached_equals_uncached(model, idx, n, prefill_chunk=None, atol=1e-4, min_distinct=8):
    """Generation with a cache equals generation without, compared at every step's logits, not
    only the tokens, on output that varies (at least min_distinct distinct tokens in each row).
    Both runs sample from the same seed: they draw the same tokens unless a draw falls within
    rounding of a boundary between two tokens' probabilities (a near tie, either rounding may
    break it). That is allowed only where the logits agree; the runs are compared up to it."""
    cached, cached_logits = sample_with_logits(model, idx, n, prefill_chunk=prefill_chunk)
    uncached, uncached_logits = sample_with_logits(model, idx, n, use_cache=False)
    differ = (cached != uncached).any(0).nonzero()
    steps = n if len(differ) == 0 else differ[0].item() + 1  # the first different draw included
    torch.testing.assert_close(cached_logits[:, :steps], uncached_logits[:, :steps], atol=atol,
                               rtol=0)
    assert steps > n // 2, f'the two runs drew different tokens at step {steps - 1} of {n}'
    for row in uncached[:, :steps]:
        assert len(set(row.tolist())) >= min_distinct, f'output does not vary: {row.tolist()}'
