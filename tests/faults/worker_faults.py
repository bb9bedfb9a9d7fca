"""
train.py with a fault injected, for tests/faults/test_no_lost_runs.py. Run it exactly like train.py
(alone or under torchrun). The environment chooses the fault:
  DISK_FULL_AT=n   the n-th checkpoint write of this process writes half its bytes, then fails
                   with OSError(ENOSPC), as a full disk does
  LOG_FULL_AT=n    the same for the n-th record written to out_dir/log.jsonl
  KILL_RANK=r, KILL_STEP=n   in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT=0),
                   the process of RANK r SIGKILLs itself after its n-th optimizer step (from 0)
"""
import builtins
import errno
import io
import os
import runpy
import signal
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))  # tests/faults/../..
real_save = torch.save
real_open = builtins.open
saves = 0
records = 0
steps = 0


def full_disk_save(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves != int(os.environ['DISK_FULL_AT']):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[:buffer.tell() // 2])
    f.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullLog:
    """log.jsonl, open to append, on a disk that fills up at the LOG_FULL_AT-th record."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        global records
        records += 1
        if records != int(os.environ['LOG_FULL_AT']):
            return self.f.write(text)
        self.f.write(text[:len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):  # flush, fileno, close: the file's own
        return getattr(self.f, name)


def full_disk_open(file, mode='r', *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return FullLog(f) if str(file).endswith('log.jsonl') and 'a' in mode else f


def kill_once(optimizer, args, kwargs):
    global steps
    first_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'
    if first_attempt and os.environ.get('RANK') == os.environ['KILL_RANK']:
        if steps == int(os.environ['KILL_STEP']):
            os.kill(os.getpid(), signal.SIGKILL)
    steps += 1


if 'DISK_FULL_AT' in os.environ:
    torch.save = full_disk_save
if 'LOG_FULL_AT' in os.environ:
    builtins.open = full_disk_open
if 'KILL_RANK' in os.environ:
    register_optimizer_step_post_hook(kill_once)  # called after every optimizer's step()
sys.path.insert(0, REPO)
sys.argv[0] = os.path.join(REPO, 'train.py')
runpy.run_path(sys.argv[0], run_name='__main__')
