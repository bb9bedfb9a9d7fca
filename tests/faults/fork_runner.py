"""
Runs train.py and prepare_data.py many times, fast, as processes that tests/faults/test_crash.py
kills with SIGKILL.

torch is imported once, here; every run is a fork of this process that executes the
script from its first line, a real process with its own pid that starts in milliseconds
instead of seconds. One JSON command per stdin line:
    ["run", log_path, env, script, arg, ...]  fork a run (stdout and stderr into log_path, env added
                                               to its environment); answers "pid PID"
    ["wait", pid]                              wait for that run to end; answers "status S" (its
                                               exit code, or minus the signal that killed it)
so that a test can aim its kills, runs also report on this process's stdout, one line each:
    "save PATH"         train.py's torch.save is writing PATH. With SAVE_PAUSE_AT=n:fraction in env,
                        the n-th save of the run writes that fraction of its bytes, reports, then
                        sleeps PAUSE seconds before writing the rest: a kill in that sleep leaves a
                        half-written file.
    "fileop EVENT PATH" prepare_data.py is about to open PATH for writing ("open"), rename it
                        ("os.rename") or delete it ("os.remove"), for paths under FILEOP_DIR. With
                        FILEOP_PAUSE_AT=n, the n-th such operation waits PAUSE seconds first.
KEEP_CHECKPOINTS=folder keeps a copy of every checkpoint train.py saves, as
folder/ckpt_<iter_num>.pt.
"""
import contextlib
import io
import json
import os
import runpy
import sys
import time
import traceback

import numpy  # noqa: F401  the slow imports, done once for every run
import torch
import torch._dynamo  # noqa: F401  imported by the first optimizer step otherwise (seconds)
import tqdm  # noqa: F401

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))  # tests/faults/../..
sys.path.insert(0, REPO)
import checkpoint, configurator, model, prepare_data, sample  # noqa: E401, F401, E402
PAUSE = 0.3  # seconds: a kill aimed into this window cannot miss it, even on a busy machine
# this process's stdout, kept open in the runs after their stdout goes to a log file
REPORTS = os.dup(1)
real_save = torch.save


def report(line):
    # one write per line: lines of different processes never interleave
    os.write(REPORTS, f"{line}\n".encode())


def pausing_save(obj, f, *args, **kwargs):
    """torch.save(obj, f) to a path or an open file, written in two parts with a report (and maybe a
    pause) in between."""
    pausing_save.count += 1
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    at, _, fraction = os.environ.get('SAVE_PAUSE_AT', '0:0.5').partition(':')
    cut = int(float(fraction) * len(data))
    path = getattr(f, 'name', f)
    with (open(f, 'wb') if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f)) as out:
        out.write(data[:cut])
        out.flush()
        report(f"save {path}")
        if pausing_save.count == int(at):
            time.sleep(PAUSE)
        out.write(data[cut:])
    if os.environ.get('KEEP_CHECKPOINTS'):
        keep = os.path.join(os.environ['KEEP_CHECKPOINTS'], f"ckpt_{obj['iter_num']}.pt")
        with open(keep, 'wb') as f:
            f.write(data)


pausing_save.count = 0


def watch_file_operations(folder):
    """An audit hook: report every write-open, rename and
    delete under folder, and pause before the chosen one."""
    count, at = 0, int(os.environ.get('FILEOP_PAUSE_AT', 0))

    def hook(event, args):
        nonlocal count
        if event not in ('open', 'os.rename', 'os.remove') or not str(args[0]).startswith(folder):
            return
        if event == 'open' and not args[2] & (os.O_WRONLY | os.O_RDWR):
            return  # a read
        count += 1
        report(f"fileop {event} {args[0]}")
        if count == at:
            time.sleep(PAUSE)

    sys.addaudithook(hook)


def run(log_path, env, script, *args):
    """Fork; the child runs `script args` as `python script args` would, and never returns."""
    sys.stdout.flush()
    # before the fork: it exists however soon the run is killed
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    pid = os.fork()
    if pid:
        os.close(log)
        return pid
    code = 1
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout.reconfigure(line_buffering=True)  # what was printed before a kill is in the log
        os.environ.update(env)
        torch.save = pausing_save
        if os.environ.get('FILEOP_DIR'):
            watch_file_operations(os.environ['FILEOP_DIR'])
        sys.argv = [os.path.join(REPO, script), *args]
        runpy.run_path(sys.argv[0], run_name='__main__')
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    command, *rest = json.loads(line)
    if command == 'run':
        report(f"pid {run(*rest)}")
    elif command == 'wait':
        _, status = os.waitpid(rest[0], 0)
        report(f"status {os.waitstatus_to_exitcode(status)}")
