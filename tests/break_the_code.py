"""Show that the tests bite: break the code on purpose, one break at a time, see which tests fail.

Each break is one exact text replacement in one file of a copy of the repo (the tracked and the
untracked, not ignored, files of the working tree, in a temp folder: the checkout is never touched).
The text must occur exactly once, else the break is reported as stale (the code moved on; update
it here). Then the tests that should catch it run in the copy, and a table says, per break, how
many tests failed and which. A break that no test catches is a hole in the suite.

    OMP_NUM_THREADS=1 python tests/break_the_code.py            # every break, its test files
    OMP_NUM_THREADS=1 python tests/break_the_code.py --all      # every break, the whole suite
    OMP_NUM_THREADS=1 python tests/break_the_code.py shift seed # only the breaks named so

Not a test itself (pytest does not collect it) and not run in CI: it takes minutes. Set
TIKTOKEN_CACHE_DIR and SHAKESPEARE_INPUT as for the tests, or the tests that need them are skipped.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name: (file, exact text, its replacement, the test files that should catch it)
BREAKS = {
    'absorbed-drops-bv': (
        'model.py', '            y = y + bv.view(1, H, hd)\n', '            y = y\n',
        ['tests/test_model.py']),
    'kv-cache-keeps-newest-16': (
        'model.py', "            k = grow(cache, 'k', k)\n            v = grow(cache, 'v', v)\n",
        "            k = grow(cache, 'k', k)[:, :, -16:]\n"
        "            v = grow(cache, 'v', v)[:, :, -16:]\n",
        ['tests/test_model.py']),
    'lightning-decode-drops-decay': (
        'model.py', '        kv = decay * kv + k.transpose(-2, -1) @ v\n',
        '        kv = kv + k.transpose(-2, -1) @ v\n',
        ['tests/test_lightning.py', 'tests/test_model.py']),
    'lightning-block-drops-inter': (
        'model.py', '        o = o + (q * q_decay) @ torch.stack(states, dim=2)  # inter\n', '',
        ['tests/test_lightning.py', 'tests/test_model.py']),
    'infini-decode-rope-at-0': (
        'model.py', 'y = attend(self.rope(qs, P), ', 'y = attend(self.rope(qs, 0), ',
        ['tests/test_infini.py', 'tests/test_model.py']),
    'infini-decode-skips-memory': (
        'model.py', '            if self.memory:\n',
        '            if self.memory and cache is None:\n',
        ['tests/test_infini.py', 'tests/test_model.py']),
    'chunk-mask-off-by-one': (
        'model.py', '.tril(Tk - Tq)', '.tril(Tk - Tq + 1)',
        ['tests/test_model.py', 'tests/test_inattn_prefix.py']),
    'interpolation-misaligns-ends': (
        'model.py', '* ((T0 - 1) / (T1 - 1))', '* (T0 / T1)',
        ['tests/test_model.py']),
    'stream-decode-no-rescale': (
        'model.py', '            z = z * r + (p.to(s.dtype) @ s_b).float()\n',
        '            z = z + (p.to(s.dtype) @ s_b).float()\n',
        ['tests/test_model.py']),
    'checkpoint-in-place': (
        'checkpoint.py', "    tmp = path + '.tmp'\n", '    tmp = path\n',
        ['tests/faults/test_crash.py']),
    'resume-drops-optimizer': (
        'train.py', "        optimizer.load_state_dict(checkpoint['optimizer'])\n",
        '        pass\n',
        ['tests/test_train.py']),
    'micro-batches-share-seed': (
        'train.py', 'micro_seed(iter_num, ddp_rank * gradient_accumulation_steps + micro_step)',
        'micro_seed(iter_num, ddp_rank * gradient_accumulation_steps)',
        ['tests/test_train.py']),
    # more, in code that is easy to get subtly wrong
    'shift-reads-h_t': (
        'model.py', 'h[:, k - i:k - i + T]', 'h[:, k - i + 1:k - i + 1 + T]',
        ['tests/test_inattn_shift.py']),
    'kv-layout-drops-bv': (
        'model.py', "grow(cache, 'v', self.split_heads(F.linear(s, Wv, bv)))",
        "grow(cache, 'v', self.split_heads(F.linear(s, Wv)))",
        ['tests/test_model.py']),
    'grow-forgets-old-tokens': (
        'model.py', '            room.narrow(dim, 0, held).copy_(state[name])\n',
        '            pass\n',
        ['tests/test_model.py']),
    'slide-keeps-stale-cache': (
        'model.py', 'start, cache = slid, None', 'start = slid',
        ['tests/test_model.py', 'tests/test_inattn_prefix.py']),
    'infini-delta-writes-all': (
        'model.py', '                v = v - self.retrieve(k, M, z)\n', '                v = v\n',
        ['tests/test_infini.py']),
    'overflow-message-reworded': (
        'train.py', 'float16 gradients overflowed, optimizer step skipped ',
        'float16 gradients overflowed, step skipped ',
        ['tests/test_gpu_check.py']),
    'lightning-block-decay-off-by-one': (
        'model.py', '(n[:, None] - 1 - i)', '(n[:, None] - i)',
        ['tests/test_lightning.py', 'tests/test_model.py']),
}


def copy_repo(dest):
    """The working tree's tracked and untracked (not ignored) files -> dest."""
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split('\0')
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(root, file, old, new):
    """Replace old by new in root/file; False if old does not occur exactly once (stale)."""
    path = root / file
    text = path.read_text()
    if text.count(old) != 1:
        return False
    path.write_text(text.replace(old, new))
    return True


def run_tests(root, targets):
    """-> (outcome line, [failing test ids]) of pytest over targets in root."""
    env = dict(os.environ, OMP_NUM_THREADS='1', WANDB_MODE='offline')
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '--tb=no', '-rfE',
                        '-p', 'no:cacheprovider', *targets], cwd=root, env=env,
                       capture_output=True, text=True)
    failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', r.stdout, re.M)
    summary = ((r.stdout + r.stderr).strip().splitlines() or ['(no output)'])[-1]
    return summary, failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('names', nargs='*', help=f'breaks to apply (default: all): {", ".join(BREAKS)}')
    ap.add_argument('--all', action='store_true', help='run the whole suite for every break')
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in BREAKS]
    if unknown:
        sys.exit(f'break_the_code.py: unknown break {unknown[0]!r}; see --help for the breaks')
    names = args.names or list(BREAKS)
    caught = 0
    print(f'{"break":34s} {"failed":>6s}  tests (the first three)')
    for name in names:
        file, old, new, targets = BREAKS[name]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            copy_repo(root)
            if not apply(root, file, old, new):
                print(f'{name:34s} {"STALE":>6s}  its text is not in {file} exactly once')
                continue
            missing = [t for t in targets if not (root / t).exists()]
            present = [t for t in targets if t not in missing]
            summary, failed = ('no test file to run', []) if not (args.all or present) else \
                run_tests(root, ['tests'] if args.all else present)
        caught += bool(failed)
        shown = ', '.join(f.split('::', 1)[-1] for f in failed[:3])
        note = f'  (missing: {", ".join(missing)})' if missing else ''
        print(f'{name:34s} {len(failed):6d}  {shown or "NOT CAUGHT: " + summary}{note}', flush=True)
    print(f'caught {caught} of {len(names)} breaks')
    return 0 if caught == len(names) else 1


if __name__ == '__main__':
    sys.exit(main())
