"""gpu_check.py (`bash .ci/gpu`) on a machine without CUDA: one line and exit status 2, at once;
and its reading of train.py's output (CI runs the whole check as `bash .ci/gpu --dry-run`)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, one_line_error, run_here
from gpu_check import parse_train, train_row


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='this machine has a CUDA GPU: the check would run')
def test_without_cuda_it_stops_with_one_line_and_status_2():
    r = subprocess.run(['bash', str(REPO / '.ci' / 'gpu')], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert 'needs a CUDA GPU' in one_line_error(r, 2)
    assert r.stdout == ''


class OverflowingScaler:
    """A GradScaler whose every step overflows: train.py's float16 path needs CUDA, so this makes
    a CPU run print what train.py prints for a skipped step (the scale halves, no step taken)."""

    def __init__(self, *args, **kwargs):
        self.scale_now = 2.0 ** 16

    def is_enabled(self):
        return True

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def get_scale(self):
        return self.scale_now

    def step(self, optimizer):
        pass  # skipped: the gradients overflowed

    def update(self):
        self.scale_now /= 2

    def state_dict(self):
        return {}


def test_the_overflow_lines_train_py_prints_are_counted(char_data, tmp_path, monkeypatch):
    # gpu_check's pattern against train.py's own message, not a copy of it
    monkeypatch.setattr(torch.amp, 'GradScaler', OverflowingScaler)
    status, out, err = run_here('train.py', *TINY, f'--dataset={char_data}', '--max_iters=3',
                                '--eval_interval=3', f'--out_dir={tmp_path / "out"}')
    assert status in (0, None), err
    assert parse_train(out)[2] == 3, out


def log(skipped, last_val=2.5):
    lines = ['step 0: train loss 3.4000, val loss 3.3900']
    # the line train.py is to print for each step the GradScaler skips
    lines += [f"iter {i}: float16 gradients overflowed, optimizer step skipped "
              f"(GradScaler scale now {2.0 ** -i:g})" for i in range(skipped)]
    lines += [f"iter {i}: loss {3.4 - i / 100:.4f}, time 5.00ms, 10,000 tokens/s, mfu 1.00%"
              for i in range(0, 100, 10)]
    lines += ['step 50: train loss 3.0000, val loss 3.0100',
              f"step 100: train loss 2.4000, val loss {last_val:.4f}"]
    return '\n'.join(lines) + '\n'


def test_training_log_is_read_and_judged():
    val, train, skipped = parse_train(log(3))
    assert val == {0: 3.39, 50: 3.01, 100: 2.5}
    assert train[0] == 3.4 and train[90] == 2.5 and skipped == 3
    assert train_row(True, log(3), 1.0, 'causal', 'float16') == \
        ('', '| causal | float16 | 3.390 → 3.010 → 2.500 | 3.400 → 2.500 | 3 | 1 | ok |')
    assert 'skipped 6 steps' in train_row(True, log(6), 1.0, 'causal', 'float16')[0]
    assert 'less than 10 %' in train_row(True, log(0, last_val=3.2), 1.0, 'causal', 'bfloat16')[0]
    assert train_row(False, log(0), 1.0, 'causal', 'bfloat16')[0] == 'train.py failed'
