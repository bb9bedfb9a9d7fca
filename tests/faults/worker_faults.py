"""
train.py with a fault injected, for tests/faults/test_no_lost_runs.py. Run it exactly like train.py
(alone or under torchrun). The environment chooses the fault:
  DISK_FULL_AT=n   the n-th checkpoint write of this process writes half its bytes, then fails
                   with OSError(ENOSPC), as a full disk does
  KILL_RANK=r, KILL_STEP=n   in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT=0),
                   the process of RANK r SIGKILLs itself after its n-th optimizer step (from 0)
"""
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
saves = 0
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


def kill_once(optimizer, args, kwargs):
    global steps
    first_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'
    if first_attempt and os.environ.get('RANK') == os.environ['KILL_RANK']:
        if steps == int(os.environ['KILL_STEP']):
            os.kill(os.getpid(), signal.SIGKILL)
    steps += 1


if 'DISK_FULL_AT' in os.environ:
    torch.save = full_disk_save
if 'KILL_RANK' in os.environ:
    register_optimizer_step_post_hook(kill_once)  # called after every optimizer's step()
sys.path.insert(0, REPO)
sys.argv[0] = os.path.join(REPO, 'train.py')
runpy.run_path(sys.argv[0], run_name='__main__')
