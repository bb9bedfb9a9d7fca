"""
train.py with one deliberate fault, for tests/faults/test_ddp.py: on the process of RANK 1,
the optimizer step number FAULT_STEP (counted from 0 in this process) nudges one weight
afterwards, as a rank-dependent bug would.
Run it exactly like train.py (under torchrun); --check_sync=True must then stop the run at that
step.
"""
import os
import runpy
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))  # tests/faults/../..
steps = 0


def nudge(optimizer, args, kwargs):
    global steps
    if os.environ['RANK'] == '1' and steps == int(os.environ['FAULT_STEP']):
        with torch.no_grad():
            optimizer.param_groups[0]['params'][0].view(-1)[0] += 1e-3
    steps += 1


register_optimizer_step_post_hook(nudge)  # called after every optimizer's step()
sys.path.insert(0, REPO)
sys.argv[0] = os.path.join(REPO, 'train.py')
runpy.run_path(sys.argv[0], run_name='__main__')
