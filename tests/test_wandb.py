"""train.py --wandb_log=True: the losses it prints reach wandb. Offline mode (conftest.run sets
WANDB_MODE=offline): the run is written to a local file and nothing leaves the machine."""
import json
import re
import struct

import pytest
from wandb.proto import wandb_internal_pb2

from conftest import TINY, run

HEADER = b':W&B\xe1\xbe\x00'  # 'W&B', the magic 0xBEE1 and version 0 of the .wandb file
BLOCK = 32768  # bytes; a chunk never crosses a block's end


def records(path):
    """The records of an offline run's .wandb file (wandb 0.31 ships no Python reader for it). The
    file is a LevelDB log: chunks with a 7-byte header (crc32, length, type: 1 a whole record, 2
    its first, 3 a middle, 4 its last part), zero padding where a block has no room for one more."""
    data = path.read_bytes()
    assert data[:len(HEADER)] == HEADER, f'{path} is no .wandb file of the version this reads'
    pos, parts = len(HEADER), []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the padding at a block's end
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0:  # zeros: the end of what was written
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b''.join(parts))
            parts = []
            yield record


def history(path):
    """What each wandb.log() call logged: a dict per call."""
    for record in records(path):
        if record.WhichOneof('record_type') == 'history':
            items = record.history.item  # a key with '/' is stored as its parts, in nested_key
            yield {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in items}


def test_train_and_val_losses_reach_wandb(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))  # run() hands this process's environment on
    r = run('train.py', *TINY, '--out_dir=out', f'--dataset={char_data}', '--max_iters=4',
            '--eval_interval=2', '--wandb_log=True', '--wandb_run_name=tiny', cwd=tmp_path)
    printed = re.findall(r'^step (\d+): train loss ([\d.]+), val loss ([\d.]+)$', r.stdout, re.M)
    assert [int(i) for i, _, _ in printed] == [0, 2, 4]
    [path] = (tmp_path / 'wandb').glob('offline-run-*/run-*.wandb')  # one run, in WANDB_DIR
    runs = [rec.run for rec in records(path) if rec.WhichOneof('record_type') == 'run']
    assert runs and {info.display_name for info in runs} == {'tiny'}  # --wandb_run_name
    logged = [h for h in history(path) if 'train/loss' in h]
    assert [h['iter'] for h in logged] == [0, 2, 4]
    for h, (_, train, val) in zip(logged, printed):
        expected = (float(train), float(val))
        assert (h['train/loss'], h['val/loss']) == pytest.approx(expected, abs=5e-5)  # 4 decimals
