"""Bad input to train.py and sample.py: broken or foreign checkpoints, checkpoints that do not fit
the request, impossible settings. Each is one line on stderr that says what is wrong, before any
work, and nothing on disk changes. Most run the script inside this process (conftest.run_here):
they stop before training, so no new Python is needed; one of each kind runs as a real process."""
import hashlib
import os
import pickle
from dataclasses import asdict

import pytest
import torch

from conftest import TEXT, one_line_error, run, run_here, write_char_dataset
from model import GPT, GPTConfig

ERROR = 'train.py: error: '



def only_echo(stdout):
    """Nothing was done: train.py printed only its echo of the overrides (nanoGPT's)."""
    return all(line.startswith('Overriding') for line in stdout.splitlines())

def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def weights(char_data, tmp_path_factory):
    """A tiny GPT over char_data's vocabulary,
    saved with everything train.py saves (as at iteration 0)."""
    with open(char_data / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=meta['vocab_size'], n_layer=1, n_head=2,
                          n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    path = tmp_path_factory.mktemp('weights') / 'ckpt.pt'
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': torch.amp.GradScaler('cpu', enabled=False).state_dict(),
                'model_args': asdict(model.config),
                'iter_num': 0, 'best_val_loss': 1e9, 'config': {}, 'meta': meta}, path)
    return path


def broken(kind, good, path):
    """Write a checkpoint file that is not one: truncated, empty, random bytes, or someone
    else's torch.save."""
    if kind == 'truncated':
        path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'random bytes':
        path.write_bytes(os.urandom(4096))
    elif kind == 'a plain dict':
        torch.save({'weights': torch.zeros(3), 'step': 10}, path)
    elif kind == 'a bare state_dict':
        torch.save(torch.load(good, weights_only=False)['model'], path)
    elif kind == 'other shapes':
        ckpt = torch.load(good, weights_only=False)
        ckpt['model']['lm_head.weight'] = torch.zeros(7, 16)
        torch.save(ckpt, path)
    elif kind == 'unknown model field':
        ckpt = torch.load(good, weights_only=False)
        ckpt['model_args']['rotary'] = True
        torch.save(ckpt, path)
    return path


KINDS = ['truncated', 'empty', 'random bytes', 'a plain dict', 'a bare state_dict', 'other shapes',
         'unknown model field']
MESSAGES = {'truncated': 'cannot be read as a checkpoint',
            'empty': 'cannot be read as a checkpoint',
            'random bytes': 'cannot be read as a checkpoint',
            'a plain dict': 'is not a checkpoint of train.py: it has no model, model_args',
            'a bare state_dict': 'is not a checkpoint of train.py: it has no model, model_args',
            'other shapes': 'holds no GPT that this model.py can load '
                            '(RuntimeError: Error(s) in loading state_dict',
            'unknown model field': "holds no GPT that this model.py can load (TypeError"}


@pytest.mark.parametrize('kind', KINDS)
def test_a_broken_or_foreign_checkpoint_is_one_line_and_stays_as_it_was(
        kind, weights, char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'out').mkdir()
    path = broken(kind, weights, tmp_path / 'out' / 'ckpt.pt')
    before = digest(path)
    for script, args in (('train.py', ['--init_from=resume', f'--dataset={char_data}',
                                       '--block_size=32']),
                         ('sample.py', ['--device=cpu'])):
        status, stdout, stderr = run_here(script, '--out_dir=out', *args)
        assert status == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith(f'{script}: error: out/ckpt.pt ') and MESSAGES[kind] in stderr
    assert digest(path) == before and os.listdir(tmp_path / 'out') == ['ckpt.pt']  # nothing written


def test_a_truncated_checkpoint_in_a_real_process(weights, char_data, tmp_path):
    path = broken('truncated', weights, tmp_path / 'ckpt.pt')
    r = run('train.py', f'--init_from={path}', f'--dataset={char_data}', '--device=cpu',
            '--out_dir=new', cwd=tmp_path, expect_ok=False)
    line = one_line_error(r, 1)
    assert line.startswith(f'{ERROR}{path} cannot be read as a checkpoint (')
    assert line.endswith('): the file is truncated or was not written by train.py; '
                         'use another checkpoint, or train again')
    assert only_echo(r.stdout) and not (tmp_path / 'new').exists()


def test_weights_without_optimizer_state_start_a_new_run_but_do_not_resume(
        weights, char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = torch.load(weights, weights_only=False)
    (tmp_path / 'out').mkdir()
    torch.save({k: ckpt[k] for k in ('model', 'model_args', 'meta')}, tmp_path / 'out' / 'ckpt.pt')
    status, _, stderr = run_here('train.py', '--init_from=resume', '--out_dir=out',
                                 f'--dataset={char_data}')
    assert status == 2 and stderr == (f"{ERROR}out/ckpt.pt holds weights but no optimizer state, "
                                      f"so it cannot be resumed: start a new run from it with "
                                      f"--init_from=out/ckpt.pt\n")


@pytest.mark.parametrize('arg, message', [
    ('--attention=inattention', "attention='inattention' was asked for but {ckpt} is a model with "
                                "attention='causal': drop the attention override"),
    ('--n_layer=3', "n_layer=3 was asked for but {ckpt} is a model with n_layer=1"),
    ('--n_embd=64', "n_embd=64 was asked for but {ckpt} is a model with n_embd=16"),
    ('--block_size=64 --extend_method=none', "block_size=64 is past the 32 rows of the position "
                                             "table of {ckpt}: use --extend_method=interpolate "
                                             "(or copy) to grow it"),
])
def test_a_checkpoint_of_another_variant_or_size_than_requested_is_an_error(
        arg, message, weights, char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stdout, stderr = run_here('train.py', f'--init_from={weights}',
                                      f'--dataset={char_data}', '--n_head=2', *arg.split(),
                                      '--out_dir=new')
    assert status == 2 and stderr.startswith(ERROR + message.format(ckpt=weights)), stderr
    assert only_echo(stdout) and not (tmp_path / 'new').exists()


@pytest.mark.parametrize('text', [
    'ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz!' * 50,  # more characters
    TEXT.replace('F', 'Z')])  # as many characters, one of them another
def test_a_dataset_with_another_vocabulary_than_the_checkpoint_is_an_error(
        text, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = write_char_dataset(tmp_path / 'other', text)
    status, stdout, stderr = run_here('train.py', f'--init_from={weights}', f'--dataset={other}',
                                      '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=32',
                                      '--out_dir=new')
    n_chars, n_trained = len(set(text)), len(set(TEXT))
    assert status == 2 and stderr == (f"{ERROR}dataset '{other}' has another vocabulary "
                                      f"({n_chars} characters) than the model of {weights} was "
                                      f"trained on ({n_trained} characters): use that model's "
                                      f"dataset, or train from scratch\n")
    assert not (tmp_path / 'new').exists()


def test_gpt2_weights_need_the_gpt2_vocabulary(char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stops before anything is downloaded
    status, _, stderr = run_here('train.py', '--init_from=gpt2', f'--dataset={char_data}',
                                 '--block_size=256')
    assert status == 2 and 'than the model of gpt2 was trained on (the r50k_base BPE)' in stderr
    status, _, stderr = run_here('train.py', '--init_from=gpt2', '--block_size=2048',
                                 '--extend_method=none')
    assert status == 2
    assert 'block_size=2048 is past the 1024 rows of the position table of gpt2' in stderr


@pytest.mark.parametrize('arg, message', [
    ('--n_head=5', 'n_embd=768 is not divisible by n_head=5'),
    ('--attention=flash',
     "unknown attention 'flash'; valid: causal, inattention"),  # and the others
    ('--pos_emb=rope', "unknown pos_emb 'rope'; valid: auto, learned, none"),
    ('--eval_interval=0', 'eval_interval=0 must be at least 1'),
    ('--dropout=1.5', 'dropout=1.5 must be in [0, 1)'),
    ('--learning_rate=-1', 'learning_rate=-1.0 must not be negative'),
    ('--extend_method=stretch', "extend_method='stretch' is not one of interpolate, copy, none"),
    ('--batch_size=2.5', 'batch_size must be of type int like its default 12, got 2.5'),
    ('--lerning_rate=1e-3', "unknown config key 'lerning_rate'; did you mean learning_rate?"),
])
def test_impossible_settings_stop_before_any_work(arg, message, tmp_path, monkeypatch):
    # the default dataset is OpenWebText, not prepared here: any work would start by downloading it
    monkeypatch.chdir(tmp_path)
    status, stdout, stderr = run_here('train.py', arg)
    assert status == 2 and only_echo(stdout) and stderr.startswith(ERROR + message), stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a CUDA GPU')
def test_asking_for_a_gpu_that_is_not_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stdout, stderr = run_here('train.py', '--device=cuda')
    assert status == 2 and stderr == f"{ERROR}device='cuda' but PyTorch sees no CUDA GPU: " \
                                     f"use --device=cpu (or mps on a Mac)\n"
