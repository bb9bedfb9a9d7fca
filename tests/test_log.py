"""train.py's best checkpoint (always_save_checkpoint=False), its loss log out_dir/log.jsonl and
eval_long.py --mode=curves, and torch.compile's fallback."""
import json
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from checkpoint import resume_path
from conftest import TINY, assert_same_state, one_line_error, run, run_here


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def records(folder):
    return [json.loads(line) for line in (folder / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def overfit_data(tmp_path_factory):
    """train.bin repeats one random 40-character string, val.bin another: the model learns the
    first by heart, so its validation loss rises after the first evaluations."""
    folder = tmp_path_factory.mktemp('overfit')
    rng = np.random.default_rng(0)
    np.tile(rng.integers(0, 8, 40), 50).astype(np.uint16).tofile(folder / 'train.bin')
    np.tile(rng.integers(0, 8, 40), 10).astype(np.uint16).tofile(folder / 'val.bin')
    stoi = {ch: i for i, ch in enumerate('abcdefgh')}
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 8, 'tokenizer': 'char', 'stoi': stoi,
                     'itos': {i: ch for ch, i in stoi.items()}}, f)
    return folder


OVERFIT = ['--eval_interval=3', '--learning_rate=1e-2', '--lr_decay_iters=12',
           '--always_save_checkpoint=False']


def train(tmp, out, data, *args, expect_ok=True):
    return run('train.py', *TINY, *OVERFIT, f'--dataset={data}', f'--out_dir={out}', *args,
               cwd=tmp, expect_ok=expect_ok)


def test_the_best_checkpoint_is_kept_and_the_run_still_resumes(overfit_data, tmp_path):
    r = train(tmp_path, 'out', overfit_data, '--max_iters=12')
    val = {int(i): float(v) for i, v in re.findall(r'^step (\d+): .*val loss ([\d.]+)', r.stdout,
                                                    re.M)}
    best_iter = min((i for i in val if i > 0), key=val.get)
    assert best_iter < 12 and val[12] > val[best_iter]  # it did overfit
    best, last = load(tmp_path / 'out' / 'ckpt.pt'), load(tmp_path / 'out' / 'last.pt')
    assert best['iter_num'] == best_iter
    assert best['best_val_loss'] == pytest.approx(val[best_iter], abs=1e-4)  # 4 decimals shown
    assert last['iter_num'] == 12 and last['best_val_loss'] == best['best_val_loss']
    assert resume_path(tmp_path / 'out') == str(tmp_path / 'out' / 'last.pt')

    # the same command again: nothing left to do, nothing written
    before = {p.name: p.read_bytes() for p in (tmp_path / 'out').iterdir()}
    r = train(tmp_path, 'out', overfit_data, '--max_iters=12')
    assert "out/last.pt is at iteration 12, max_iters=12: nothing left to do" in r.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / 'out').iterdir()} == before

    # resume continues from last.pt, exactly as a run that went to 15 at once; ckpt.pt stays
    r = train(tmp_path, 'out', overfit_data, '--max_iters=15', '--init_from=resume')
    assert 'resuming from out/last.pt' in r.stdout and 'iter 12:' in r.stdout
    assert 'iter 11:' not in r.stdout
    train(tmp_path, 'straight', overfit_data, '--max_iters=15')
    assert_same_state(load(tmp_path / 'out' / 'last.pt'), load(tmp_path / 'straight' / 'last.pt'))
    assert (tmp_path / 'out' / 'ckpt.pt').read_bytes() == before['ckpt.pt']


def test_a_new_best_removes_last_pt_and_a_stale_one_is_ignored(overfit_data, tmp_path):
    out = tmp_path / 'out'
    train(tmp_path, 'out', overfit_data, '--max_iters=6')
    assert sorted(p.name for p in out.iterdir()) == ['ckpt.pt', 'last.pt', 'log.jsonl']
    # a run stopped between writing a new best and removing last.pt leaves an older last.pt
    best = load(out / 'ckpt.pt')
    torch.save(dict(best, iter_num=best['iter_num'] + 100), out / 'ckpt.pt')
    assert resume_path(out) == str(out / 'ckpt.pt')
    # always_save_checkpoint=True (a safe change on resume): every checkpoint is ckpt.pt
    shutil.rmtree(out)
    train(tmp_path, 'out', overfit_data, '--max_iters=6', '--always_save_checkpoint=True')
    assert sorted(p.name for p in out.iterdir()) == ['ckpt.pt', 'log.jsonl']


def test_the_log_holds_every_iteration_and_evaluation_once_across_a_crash(char_data, tmp_path):
    """A crashed attempt logged iterations past its last checkpoint; the resumed run drops them
    and logs them again: the same records as an uninterrupted run, but for the times."""
    common = [f'--dataset={char_data}', '--eval_interval=4', '--dropout=0.1']
    run('train.py', *TINY, *common, '--out_dir=out', '--max_iters=4', cwd=tmp_path)
    shutil.copy(tmp_path / 'out' / 'ckpt.pt', tmp_path / 'ckpt_4.pt')
    run('train.py', *TINY, *common, '--out_dir=out', '--max_iters=7', cwd=tmp_path)
    # the crash: the checkpoint at 7 never reached the disk, and a record was cut short
    shutil.copy(tmp_path / 'ckpt_4.pt', tmp_path / 'out' / 'ckpt.pt')
    with open(tmp_path / 'out' / 'log.jsonl', 'a') as f:
        f.write('{"iter": 7, "kind": "tr')
    r = run('train.py', *TINY, *common, '--out_dir=out', '--max_iters=7', cwd=tmp_path)
    assert 'resuming from out/ckpt.pt' in r.stdout
    run('train.py', *TINY, *common, '--out_dir=straight', '--max_iters=7', cwd=tmp_path)

    def without_times(folder):
        return [{k: v for k, v in rec.items() if k not in ('elapsed_s', 'tokens_per_s')}
                for rec in records(folder)]
    log = records(tmp_path / 'out')
    assert [(r['iter'], r['kind']) for r in log if r['kind'] == 'eval'] == [
        (0, 'eval'), (4, 'eval'), (7, 'eval')]
    assert [r['iter'] for r in log if r['kind'] == 'train'] == list(range(7))
    assert without_times(tmp_path / 'out') == without_times(tmp_path / 'straight')
    assert set(log[0]) == {'iter', 'kind', 'train_loss', 'val_loss', 'lr', 'elapsed_s'}
    assert set(log[1]) == {'iter', 'kind', 'loss', 'lr', 'tokens_per_s', 'elapsed_s'}
    elapsed = [r['elapsed_s'] for r in log]
    assert elapsed == sorted(elapsed)  # the clock continues over the resume

    # eval_only writes nothing, not even to the log
    before = (tmp_path / 'out' / 'log.jsonl').read_bytes()
    run('train.py', *TINY, *common, '--out_dir=out', '--init_from=resume', '--eval_only=True',
        cwd=tmp_path)
    assert (tmp_path / 'out' / 'log.jsonl').read_bytes() == before


def test_curves_draws_the_runs_from_their_logs(overfit_data, char_data, tmp_path):
    train(tmp_path, 'a', overfit_data, '--max_iters=6')
    run('train.py', *TINY, f'--dataset={char_data}', '--out_dir=b', '--max_iters=4',
        '--eval_interval=2', cwd=tmp_path)
    r = run('eval_long.py', '--ckpt=a,b/ckpt.pt', '--mode=curves', '--plot=curves.png',
            cwd=tmp_path)
    a = [rec for rec in records(tmp_path / 'a') if rec['kind'] == 'eval']
    best = min(a[1:], key=lambda rec: rec['val_loss'])  # after iteration 0, as ckpt.pt
    assert (f"| a | 6 | {a[-1]['val_loss']:.4f} | {best['val_loss']:.4f} ({best['iter']}) |"
            in r.stdout)
    assert '| b | 4 |' in r.stdout and 'wrote curves.png' in r.stdout
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    r = run('eval_long.py', '--ckpt=a,nowhere', '--mode=curves', cwd=tmp_path, expect_ok=False)
    assert 'nowhere: no nowhere/log.jsonl' in one_line_error(r, 2)


def failing_backend(graph_module, example_inputs):
    raise RuntimeError('Compiler: cc is not found\nsecond line of the message')


@pytest.mark.parametrize('how', ['torch.compile raises', 'the backend fails'])
def test_when_compile_fails_training_continues_uncompiled(char_data, tmp_path, monkeypatch, how):
    real_compile = torch.compile
    if how == 'torch.compile raises':
        def compile(model, **kw):
            raise RuntimeError('torch.compile is not supported on this platform')
    else:
        def compile(model, **kw):
            return real_compile(model, backend=failing_backend)
    monkeypatch.setattr(torch, 'compile', compile)
    monkeypatch.chdir(tmp_path)
    args = [a for a in TINY if not a.startswith('--compile')]
    status, stdout, stderr = run_here('train.py', *args, '--compile=True', '--max_iters=2',
                                      '--eval_interval=2', f'--dataset={char_data}',
                                      '--out_dir=out')
    assert status == 0, stdout + stderr
    line = next(s for s in stdout.splitlines() if s.startswith('torch.compile cannot'))
    assert line.endswith('training continues uncompiled (--compile=False skips the attempt)')
    why = {'torch.compile raises': 'RuntimeError: torch.compile is not supported on this platform',
           'the backend fails': 'RuntimeError: Compiler: cc is not found'}[how]
    assert f'({why})' in line
    assert 'second line' not in stdout
    assert 'step 2:' in stdout and load(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 2


def test_compile_is_off_by_default_on_a_cpu(char_data, tmp_path):
    args = [a for a in TINY if not a.startswith('--compile')]
    r = run('train.py', *args, '--max_iters=1', '--eval_interval=1', f'--dataset={char_data}',
            '--out_dir=out', cwd=tmp_path)
    assert 'compiling the model' not in r.stdout
    assert load(tmp_path / 'out' / 'ckpt.pt')['config']['compile'] is torch.cuda.is_available()
