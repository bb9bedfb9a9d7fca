"""train.py under torchrun: 2 CPU processes (gloo) compute
the same run as one process, stay in sync, resume."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, run

N = 3  # iterations of the first DDP run; the resumed one goes on to 2N
# 2 micro-batches per step: one per process under DDP,
# both in one process otherwise; dropout draws random numbers
ARGS = [*TINY, '--gradient_accumulation_steps=2', '--dropout=0.1', f'--eval_interval={N}',
        '--check_sync=True']


def torchrun(tmp, name, *args, script='train.py', env=None):
    """torchrun --standalone --nproc_per_node=2 script args;
    -> (result, {rank: (its stdout, its stderr)})."""
    logs = tmp / f'{name}-logs'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', f'--log-dir={logs}', '--redirects=3',
                        str(REPO / script), *map(str, args)],
                       cwd=tmp, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
    streams = {rank: tuple((next(logs.glob(f'*/attempt_0/{rank}')) / f).read_text()
                           for f in ('stdout.log', 'stderr.log')) for rank in (0, 1)}
    return r, streams


def losses(stdout):
    """{iteration: training loss} from the log lines."""
    return {int(i): float(x) for i, x in re.findall(r'^iter (\d+): loss ([\d.]+),', stdout, re.M)}


def load(folder):
    return torch.load(folder / 'ckpt.pt', map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def runs(char_data, tmp_path_factory):
    """One process to 2N; two processes to N, then resumed by two processes to 2N."""
    tmp = tmp_path_factory.mktemp('ddp')
    single = run('train.py', *ARGS, f'--dataset={char_data}', f'--max_iters={2 * N}',
                 '--out_dir=single', cwd=tmp)
    first = torchrun(tmp, 'first', *ARGS, f'--dataset={char_data}', f'--max_iters={N}',
                     '--out_dir=ddp')
    assert first[0].returncode == 0, first
    ckpt_n = load(tmp / 'ddp')
    resumed = torchrun(tmp, 'resumed', *ARGS, f'--dataset={char_data}', f'--max_iters={2 * N}',
                       '--out_dir=ddp', '--init_from=resume')
    assert resumed[0].returncode == 0, resumed
    return tmp, single.stdout, first[1], ckpt_n, resumed[1]


def test_two_processes_follow_the_loss_curve_and_weights_of_one(runs):
    tmp, single, first, ckpt_n, resumed = runs
    # rank r's micro-step is micro-step r of the single process's iteration: same data, same dropout
    ddp_losses = {**losses(first[0][0]), **losses(resumed[0][0])}
    assert sorted(ddp_losses) == list(range(2 * N))
    assert ddp_losses == pytest.approx(losses(single), abs=2e-4)  # the log's 4 decimals
    a, b = load(tmp / 'single'), load(tmp / 'ddp')
    assert a['iter_num'] == b['iter_num'] == 2 * N
    for k, v in a['model'].items():  # only the order of the gradient sums differs
        torch.testing.assert_close(b['model'][k], v, rtol=0, atol=1e-6)


def test_only_rank_0_logs_and_writes_checkpoints(runs):
    tmp, _, first, ckpt_n, resumed = runs
    for streams, saves in ((first, 1), (resumed, 2)):  # resumed: at N (where it starts) and at 2N
        assert streams[1] == ('', '')  # rank 1: no output at all
        assert streams[0][0].count('saving checkpoint to ddp/ckpt.pt') == saves
        assert streams[0][1] == ''
    # 2 processes x 1 micro-batch x 4 x 32 tokens
    assert 'tokens per iteration will be: 256' in first[0][0]
    # and rank 0 alone writes the loss log (issue 23)
    assert sorted(os.listdir(tmp / 'ddp')) == ['ckpt.pt', 'log.jsonl'] and ckpt_n['iter_num'] == N


def test_resume_under_torchrun_continues_from_the_checkpoint(runs):
    tmp, _, _, ckpt_n, resumed = runs
    stdout = resumed[0][0]
    assert 'resuming from ddp/ckpt.pt' in stdout
    # the first step taken is the checkpoint's iteration
    assert sorted(losses(stdout)) == list(range(N, 2 * N))
    # (that it continued the same run: the curve test above)
    assert load(tmp / 'ddp')['iter_num'] == 2 * N


def test_check_sync_stops_the_run_when_the_processes_diverge(char_data, tmp_path):
    # tests/faults/ddp_fault.py nudges one weight on rank 1 after its step of iteration 1, as a
    # rank-dependent bug would
    r, streams = torchrun(tmp_path, 'fault', *ARGS, f'--dataset={char_data}', '--max_iters=3',
                          '--out_dir=fault', script='tests/faults/ddp_fault.py',
                          env={'FAULT_STEP': '1'})
    assert r.returncode != 0
    assert streams[0][1] == ("train.py: error: the 2 processes hold different weights after the "
                             "step of iteration 1 (1 of 15 tensors differ, e.g. "
                             "transformer.wte.weight): something in the update depends on the "
                             "process; fault/ckpt.pt is left as it was\n")
    assert streams[1] == ('', '')
    # stopped before logging iteration 1
    assert re.findall(r'^iter (\d+):', streams[0][0], re.M) == ['0']
