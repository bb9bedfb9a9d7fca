"""No lost runs: a checkpoint in out_dir is resumed by its own command and never overwritten by
another one; torchrun's elastic restarts resume on their own; a full disk loses nothing."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, one_line_error, run

ARGS = [*TINY, '--eval_interval=2']


def train(tmp, *args, expect_ok=True, script='train.py', env=None):
    extra = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    r = subprocess.run([sys.executable, str(REPO / script), *ARGS, *map(str, args)], cwd=tmp,
                       env=extra, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def test_the_same_command_twice_resumes(char_data, tmp_path):
    train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=4')
    first = load(tmp_path / 'out' / 'ckpt.pt')
    # max_iters may change on resume: the same run, trained for longer
    r = train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=6')
    assert ("auto_resume: out/ckpt.pt (iteration 4) is this run's checkpoint: resuming it"
            in r.stdout)
    assert 'iter 4:' in r.stdout and 'iter 3:' not in r.stdout
    # and it is the same run as one that went to 6 without stopping
    train(tmp_path, f'--dataset={char_data}', '--out_dir=straight', '--max_iters=6')
    a, b = load(tmp_path / 'out' / 'ckpt.pt'), load(tmp_path / 'straight' / 'ckpt.pt')
    assert first['iter_num'] == 4 and a['iter_num'] == b['iter_num'] == 6
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k


@pytest.mark.parametrize('change, shown', [
    (['--learning_rate=2e-3'], "learning_rate=0.001 there, 0.002 here"),
    (['--auto_resume=False'], "auto_resume=False"),
])
def test_another_command_stops_and_loses_nothing(char_data, tmp_path, change, shown):
    train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=2')
    before = (tmp_path / 'out' / 'ckpt.pt').read_bytes()
    r = train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=2', *change,
              expect_ok=False)
    line = one_line_error(r, 2)
    assert shown in line
    for way_out in ('--init_from=resume', '--out_dir', '--overwrite=True'):
        assert way_out in line
    assert (tmp_path / 'out' / 'ckpt.pt').read_bytes() == before
    assert 'iter ' not in r.stdout


def test_overwrite_starts_over_and_eval_only_writes_nothing(char_data, tmp_path):
    train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=4')
    before = (tmp_path / 'out' / 'ckpt.pt').read_bytes()
    r = train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=2',
              '--learning_rate=2e-3', '--eval_only=True')
    assert 'step 0:' in r.stdout and (tmp_path / 'out' / 'ckpt.pt').read_bytes() == before
    r = train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=2',
              '--learning_rate=2e-3', '--overwrite=True')
    assert 'overwrite=True: a new run replaces out/ckpt.pt (iteration 4)' in r.stdout
    assert 'iter 0:' in r.stdout and load(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 2


def test_a_full_disk_keeps_the_previous_checkpoint(char_data, tmp_path):
    """The second checkpoint write fails half-way: one line, the first checkpoint intact."""
    r = train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=6',
              script='tests/faults/worker_faults.py', env={'DISK_FULL_AT': '2'}, expect_ok=False)
    line = one_line_error(r, 1)
    assert line.startswith("train.py: error: the disk is full: out/ckpt.pt was not written")
    # the partial temp file is gone (log.jsonl: train.py's loss log, issue 23)
    assert sorted(os.listdir(tmp_path / 'out')) == ['ckpt.pt', 'log.jsonl']
    assert load(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 2
    assert 'iter 4:' not in r.stdout  # it stopped at the failed write


def test_a_full_disk_while_logging_stops_the_same_way(char_data, tmp_path):
    """The 6th record of log.jsonl (iteration 3's) is cut short by a full disk: one line, the
    checkpoint of iteration 2 intact; the same command then resumes, and the log holds every
    record once."""
    r = train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=6',
              script='tests/faults/worker_faults.py', env={'LOG_FULL_AT': '6'}, expect_ok=False)
    line = one_line_error(r, 1)
    assert line == ("train.py: error: the disk is full: out/log.jsonl was not written (the "
                    "checkpoint there is intact); free some space and resume with the same command")
    assert sorted(os.listdir(tmp_path / 'out')) == ['ckpt.pt', 'log.jsonl']
    assert load(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 2 and 'iter 4:' not in r.stdout
    train(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=6')
    log = [json.loads(line) for line in (tmp_path / 'out' / 'log.jsonl').read_text().splitlines()]
    assert [(rec['iter'], rec['kind']) for rec in log] == [
        (0, 'eval'), (0, 'train'), (1, 'train'), (2, 'eval'), (2, 'train'), (3, 'train'),
        (4, 'eval'), (4, 'train'), (5, 'train'), (6, 'eval')]


def torchrun(tmp, *args, restarts=0, env=None):
    """torchrun --standalone --nproc_per_node=2 (gloo on CPU) on tests/faults/worker_faults.py."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               f'--max-restarts={restarts}', f'--log-dir={tmp / "logs"}', '--redirects=3',
               str(REPO / 'tests' / 'faults' / 'worker_faults.py'), *ARGS, *map(str, args)]
    # a session of its own: if the job hangs, its workers are killed with it, not left behind
    job = subprocess.Popen(command, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
    try:
        stdout, stderr = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def rank_log(tmp, attempt, rank, stream='stdout'):
    return next((tmp / 'logs').glob(f'*/attempt_{attempt}/{rank}/{stream}.log')).read_text()


def test_a_full_disk_under_ddp_stops_every_rank(char_data, tmp_path):
    r = torchrun(tmp_path, f'--dataset={char_data}', '--out_dir=out', '--max_iters=6',
                 '--gradient_accumulation_steps=2', env={'DISK_FULL_AT': '2'})
    assert r.returncode != 0  # and it returned: no rank waits in a collective
    assert 'the disk is full: out/ckpt.pt was not written' in rank_log(tmp_path, 0, 0, 'stderr')
    assert load(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 2


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(char_data, tmp_path):
    """Rank 1 is SIGKILLed after its step of iteration 2, past the checkpoint of iteration 2;
    torchrun restarts both workers with the same command, which resumes the checkpoint."""
    args = [f'--dataset={char_data}', '--max_iters=6', '--gradient_accumulation_steps=2',
            '--dropout=0.1']
    r = torchrun(tmp_path, *args, '--out_dir=ddp', restarts=1,
                 env={'KILL_RANK': '1', 'KILL_STEP': '2'})
    logs = '\n'.join(f"== {p}\n{p.read_text()}" for p in sorted((tmp_path / 'logs').rglob('*.log')))
    assert r.returncode == 0, r.stderr + logs
    assert 'iter 3:' not in rank_log(tmp_path, 0, 0)  # the first attempt died in iteration 3
    restarted = rank_log(tmp_path, 1, 0)
    assert "auto_resume: ddp/ckpt.pt (iteration 2) is this run's checkpoint" in restarted
    assert 'iter 2:' in restarted and 'iter 1:' not in restarted
    run('train.py', *ARGS, *args, '--out_dir=single', cwd=tmp_path)  # uninterrupted, one process
    a, b = load(tmp_path / 'single' / 'ckpt.pt'), load(tmp_path / 'ddp' / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 6
    for k, v in a['model'].items():  # only the order of the gradient sums differs
        torch.testing.assert_close(b['model'][k], v, rtol=0, atol=1e-6)
