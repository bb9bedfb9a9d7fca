"""Crash safety: train.py and prepare_data.py killed
with SIGKILL at random moments, again and again.

After every kill the files on disk must be usable: ckpt.pt always loads and is bit for bit the
checkpoint an uninterrupted run wrote at the same iteration, and resuming from it continues that
run exactly; a dataset folder is either not prepared (it holds the marker .preparing) or complete,
and the temp files a killed run leaves are removed by the next run. Kills are aimed (seeded) at
random moments: anywhere in a run, inside a checkpoint write (tests/faults/fork_runner.py pauses
torch.save halfway through its bytes), and before each file operation of prepare_data.py.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import prepare_data
from conftest import TINY, assert_same_state

KILLS = 24  # kills of train.py; each one is followed by a resume
M = 64  # iterations of the run, more than the kills can get through


class Runner:
    """The test's end of fork_runner.py: start runs, read their reports, kill and reap them."""

    def __init__(self):
        runner = Path(__file__).with_name('fork_runner.py')  # beside this file, in tests/faults/
        self.proc = subprocess.Popen([sys.executable, str(runner)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=dict(os.environ, OMP_NUM_THREADS='1'))
        # the reports since the last start; how many of each kind next() took
        self.lines, self.taken = [], {}
        self.arrived = threading.Condition()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            with self.arrived:
                self.lines.append(line.rstrip('\n'))
                self.arrived.notify_all()

    def reports(self, kind):
        """The reports of this kind ('pid', 'status', 'save',
        'fileop') since the last start, without the kind."""
        with self.arrived:
            return [line[len(kind) + 1:] for line in self.lines if line.startswith(kind + ' ')]

    def next(self, kind, timeout=120):
        """Wait for the next report of this kind."""
        with self.arrived:
            i = self.taken.get(kind, 0)
            arrived = self.arrived.wait_for(lambda: len(self.reports(kind)) > i, timeout)
            assert arrived, f"no {kind} report"
            self.taken[kind] = i + 1
            return self.reports(kind)[i]

    def command(self, *args):
        self.proc.stdin.write(json.dumps(args) + '\n')
        self.proc.stdin.flush()

    def start(self, log, env, script, *args):
        """Fork a run; -> its pid. (The previous run was waited for:
        its reports have all arrived.)"""
        with self.arrived:
            self.lines, self.taken = [], {}
        self.command('run', str(log), env, script, *map(str, args))
        return int(self.next('pid'))

    def wait(self, pid):
        """-> the run's exit code, or minus the signal that killed it."""
        self.command('wait', pid)
        return int(self.next('status'))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope='module')
def runner():
    r = Runner()
    yield r
    r.close()


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def test_killed_training_always_leaves_a_checkpoint_that_resumes_exactly(
        runner, char_data, tmp_path):
    args = [*TINY, f'--dataset={char_data}', f'--max_iters={M}', '--eval_interval=1',
            '--eval_iters=1', '--always_save_checkpoint=True', '--dropout=0.1']
    # the uninterrupted reference keeps every checkpoint it writes, and tells how long a run takes
    (tmp_path / 'ref').mkdir()
    pid = runner.start(tmp_path / 'ref.log', {'KEEP_CHECKPOINTS': str(tmp_path / 'ref')},
                       'train.py', *args, f'--out_dir={tmp_path / "ref"}')
    times = []
    for _ in range(M):
        runner.next('save')
        times.append(time.perf_counter())
    assert runner.wait(pid) == 0, (tmp_path / 'ref.log').read_text()
    # one iteration: step, evaluation, save
    step = sorted(b - a for a, b in zip(times, times[1:]))[M // 2]
    assert len(list((tmp_path / 'ref').glob('ckpt_*.pt'))) == M
    full = min(f.stat().st_size for f in (tmp_path / 'ref').glob('ckpt_*.pt'))  # a whole file

    rng = random.Random(1234)
    out = tmp_path / 'run'
    kills = write_kills = resumes = 0
    while kills < KILLS:
        resume = (out / 'ckpt.pt').exists()
        k = load(out / 'ckpt.pt')['iter_num'] if resume else 0
        log = tmp_path / f'life{kills}.log'
        aim_at_write = rng.random() < 0.5
        n, fraction = rng.randint(1, 4), rng.uniform(0.05, 0.95)  # which save, where in its bytes
        env = {'SAVE_PAUSE_AT': f'{n}:{fraction}'} if aim_at_write else {}
        pid = runner.start(log, env, 'train.py', *args, f'--out_dir={out}',
                           f'--init_from={"resume" if resume else "scratch"}')
        for _ in range(n if aim_at_write else n - 1):
            runner.next('save')
        if aim_at_write:
            time.sleep(rng.uniform(0, 0.5) * 0.3)  # inside fork_runner's pause of 0.3 s
        else:  # at any moment of startup (n = 1) or of the iteration after the (n-1)-th save
            time.sleep(rng.uniform(0, step))
        os.kill(pid, signal.SIGKILL)
        assert runner.wait(pid) == -signal.SIGKILL, log.read_text()
        kills += 1

        # what the run printed before it died:
        # it went on from the checkpoint's iteration, one step at a time
        iters = [int(i) for i in re.findall(r'^iter (\d+):', log.read_text(), re.M)]
        assert iters == list(range(k, k + len(iters))), (k, iters)
        tmp = out / 'ckpt.pt.tmp'
        # killed in the middle of writing (this run opened the temp file for its n-th save, whose
        # report we waited for, and it holds less than a whole checkpoint): the half file is the
        # temp file, a truncated archive; ckpt.pt is checked below to be a whole checkpoint
        if aim_at_write and tmp.exists() and tmp.stat().st_size < full:
            with pytest.raises((RuntimeError, OSError)):  # torch's reader: either, by the cut
                load(tmp)
            write_kills += 1
        # always loads, and is what the uninterrupted run had at that iteration
        if (out / 'ckpt.pt').exists():
            ckpt = load(out / 'ckpt.pt')
            assert ckpt['iter_num'] >= k
            assert_same_state(ckpt, load(tmp_path / 'ref' / f"ckpt_{ckpt['iter_num']}.pt"))
            if resume and ckpt['iter_num'] > k:  # this run resumed, and the steps it took matched
                resumes += 1
        else:
            assert not resume

    # the last run is not killed: it finishes where
    # the uninterrupted run finished, in the same state
    k = load(out / 'ckpt.pt')['iter_num']
    assert 0 < k < M
    pid = runner.start(tmp_path / 'last.log', {}, 'train.py', *args, f'--out_dir={out}',
                       '--init_from=resume')
    assert runner.wait(pid) == 0, (tmp_path / 'last.log').read_text()
    assert_same_state(load(out / 'ckpt.pt'), load(tmp_path / 'ref' / f'ckpt_{M}.pt'))
    resumes += 1
    # the loss log holds every iteration and evaluation once: what a killed run logged past its
    # last checkpoint, a line cut short included, was dropped by the next run
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [(r['iter'], r['kind']) for r in log] == [
        (i, kind) for i in range(M + 1) for kind in ('eval', 'train') if i < M or kind == 'eval']
    print(f"\n{kills} kills ({write_kills} in the middle of a checkpoint write), "
          f"{resumes} resumes verified against the uninterrupted run, "
          f"resumed from iteration {k} to {M}")
    assert write_kills >= 6 and resumes >= 6


def test_killed_prepare_data_never_leaves_a_dataset_that_looks_complete_but_is_not(
        runner, tmp_path):
    """A folder holds a complete dataset (text A); preparing text B into it is killed again and
    again, before each of its file operations in turn and at random moments, each time starting
    from A again. Every time, the folder is either not prepared or holds all of A's or all of B's
    files, and the temp files the previous killed run left are gone; the last, unkilled, run leaves
    B and nothing else."""
    texts = {'A': 'to be, or not to be: that is the question.\n' * 40,
             'B': 'All the world\'s a stage!\n' * 60}
    expected = {}
    for name, text in texts.items():
        (tmp_path / f'{name}.txt').write_text(text)
        folder = prepare_data.prepare('shakespeare_char', input_path=tmp_path / f'{name}.txt',
                                      out_dir=tmp_path / name)
        expected[name] = {f: (folder / f).read_bytes()
                          for f in ('train.bin', 'val.bin', 'meta.pkl')}
    data = tmp_path / 'data'
    args = ['shakespeare_char', '--input', tmp_path / 'B.txt', '--out_dir', data]

    def restore_a():
        """Put A's complete dataset back, written by hand; temp files stay where they are."""
        for f, content in expected['A'].items():
            (data / f).write_bytes(content)
        (data / prepare_data.MARKER).unlink(missing_ok=True)

    def state():
        files = {f: (data / f).read_bytes() for f in ('train.bin', 'val.bin', 'meta.pkl')
                 if (data / f).exists()}
        if prepare_data.is_prepared(data):
            assert files in (expected['A'], expected['B'])
        return files

    def temp_files():
        return sorted(p.name for p in data.iterdir() if prepare_data.TEMP_NAME.fullmatch(p.name))

    # one run reports the file operations, every one of
    # them to be killed before, and how long a run takes
    data.mkdir()
    restore_a()
    t0 = time.perf_counter()
    pid = runner.start(tmp_path / 'count.log', {'FILEOP_DIR': str(data)}, 'prepare_data.py', *args)
    assert runner.wait(pid) == 0, (tmp_path / 'count.log').read_text()
    lifetime = time.perf_counter() - t0
    ops = runner.reports('fileop')
    marker = data / prepare_data.MARKER
    assert ops[0] == f'open {marker}' and ops[-1] == f'os.remove {marker}'  # first and last
    final_names = [str(data / f) for f in ('train.bin', 'val.bin', 'meta.pkl')]
    # only ever renamed onto
    assert not [op for op in ops if op.startswith('open ') and op[5:] in final_names]
    assert state() == expected['B']

    rng = random.Random(99)
    kills = removed = 0
    # before each operation, then at 5 random moments
    for at in [*range(1, len(ops) + 1), *[0] * 5]:
        restore_a()
        left = temp_files()  # by the run killed last: this run removes them first, one op each
        env = {'FILEOP_DIR': str(data), 'FILEOP_PAUSE_AT': str(len(left) + at if at else 0)}
        pid = runner.start(tmp_path / 'p.log', env, 'prepare_data.py', *args)
        if at:
            for _ in range(len(left) + at):
                runner.next('fileop')
            time.sleep(rng.uniform(0, 0.5) * 0.3)
        else:
            time.sleep(rng.uniform(0, lifetime))
        os.kill(pid, signal.SIGKILL)
        status = runner.wait(pid)
        kills += status == -signal.SIGKILL
        files = state()
        if at:
            assert status == -signal.SIGKILL
            # killed before its first operation (the marker), the run changed nothing; after it,
            # the folder is not prepared, though all of B's files may be there (before the last)
            assert prepare_data.is_prepared(data) == (at == 1)
            assert at > 1 or files == expected['A']
            assert all(f'.{pid}.tmp' in name for name in temp_files()), (left, temp_files())
            removed += len(left)
    assert kills >= len(ops) and removed > 0
    pid = runner.start(tmp_path / 'p.log', {}, 'prepare_data.py', *args)
    assert runner.wait(pid) == 0
    assert state() == expected['B']
    assert sorted(os.listdir(data)) == ['meta.pkl', 'train.bin', 'val.bin']  # no marker, no temp
    print(f"\n{kills} kills of prepare_data.py, {len(ops)} of them before each of its file "
          f"operations; {removed} temp files of killed runs removed by the next run")
