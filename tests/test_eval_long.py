"""eval_long.py: passkey samples, key disjointness,
loss by position and passkey scoring on tiny checkpoints."""
import ast
import copy
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_long
import prepare_data
from configurator import read_config_file
from conftest import REPO, TINY, one_line_error, run
from model import GPT, GPTConfig
from prepare_data import PASSKEY_QUESTION, passkey_keys, passkey_sample, prepare

TEXT = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\n'
        'All:\nSpeak, speak.\n') * 40
CHARS = sorted(set(TEXT + prepare_data.PASSKEY_FILLER + prepare_data.PASSKEY_NEEDLE
                   + PASSKEY_QUESTION + '0123456789'))
STOI = {ch: i for i, ch in enumerate(CHARS)}
ITOS = {i: ch for ch, i in STOI.items()}


def encode(text):
    return [STOI[ch] for ch in text]


def decode(ids):
    return ''.join(ITOS[int(i)] for i in ids)


@pytest.mark.parametrize('depth', [0.0, 0.25, 0.5, 1.0])
def test_passkey_sample_puts_the_needle_at_its_depth(depth):
    prompt, answer = passkey_sample(encode, 12345, 300, depth)
    assert len(prompt) + len(answer) == 300
    assert decode(answer) == '12345'
    text = decode(prompt)
    assert text.endswith(PASSKEY_QUESTION)
    needle = prepare_data.PASSKEY_NEEDLE.format(key=12345)
    assert text.count(needle) == 1 and '12345' not in text.replace(needle, '')
    n_filler = len(text) - len(needle) - len(PASSKEY_QUESTION)
    # depth 0: first thing; 1: right before the question
    assert text.index(needle) == round(depth * n_filler)


def test_passkey_sample_too_short_is_a_clear_error():
    shortest = prepare_data.passkey_min_len(encode)
    # no filler at all
    assert len(sum(passkey_sample(encode, 12345, shortest, 0.5), [])) == shortest
    with pytest.raises(ValueError, match=f'needs at least {shortest} tokens'):
        passkey_sample(encode, 12345, shortest - 1, 0.5)


def test_eval_keys_are_disjoint_from_training_keys():
    train, evals = set(passkey_keys('train')), set(passkey_keys('eval'))
    assert not train & evals and train | evals == set(range(10000, 100000))
    assert 0.08 < len(evals) / 90000 < 0.12  # ~10% held out
    for d in range(10):  # a hash, not a digit rule: every last digit occurs among eval keys
        assert any(k % 10 == d for k in evals)


# -----------------------------------------------------------------------------
# tiny checkpoints in train.py's format

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('passkey')
    (tmp / 'input.txt').write_text(TEXT, encoding='utf-8')
    return prepare('shakespeare_char_passkey', input_path=tmp / 'input.txt', out_dir=tmp / 'data',
                   passkey_len=128)


def save_tiny(path, data_dir, **kw):
    """A random tiny GPT saved as train.py saves it (model, model_args, config, meta)."""
    with open(Path(data_dir) / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    args = dict(block_size=128, vocab_size=meta['vocab_size'], n_layer=2, n_head=2, n_embd=16,
                attention='inattention')
    args.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config),
                'config': {'dataset': str(data_dir)}, 'meta': meta}, path)
    return path


def test_loss_by_position_is_the_model_loss_split_by_position(data_dir, tmp_path):
    model, ckpt = eval_long.load(save_tiny(tmp_path / 'ckpt.pt', data_dir), 'cpu')
    data = eval_long.val_data(ckpt, '')
    per_position = eval_long.loss_by_position(model, data, 96, stride=50, windows=6, batch_size=4)
    assert per_position.shape == (96,)
    # the same windows (starting at 0, 50, ..., 250) through the model's own loss: the mean is the
    # mean loss
    starts = range(0, 300, 50)
    x = torch.stack([torch.from_numpy(data[j:j + 96].astype(np.int64)) for j in starts])
    y = torch.stack([torch.from_numpy(data[j + 1:j + 97].astype(np.int64)) for j in starts])
    assert per_position.mean().item() == pytest.approx(model(x, y)[1].item(), rel=1e-5)
    rows = eval_long.buckets(per_position, 32)
    assert [(lo, hi) for lo, hi, _ in rows] == [(0, 32), (32, 64), (64, 96)]
    assert rows[1][2] == pytest.approx(per_position[32:64].mean().item())
    # the last bucket is short
    assert [hi for _, hi, _ in eval_long.buckets(per_position, 40)] == [40, 80, 96]


@pytest.mark.parametrize('attention', ['causal', 'inattention'])
def test_an_offset_reads_the_same_windows_at_later_positions(data_dir, tmp_path, attention):
    """offset=o scores like a model whose position table starts at row o (positions enter
    through wpe only), and nothing else changes."""
    model, ckpt = eval_long.load(save_tiny(tmp_path / 'ckpt.pt', data_dir, attention=attention),
                                 'cpu')
    data = eval_long.val_data(ckpt, '')
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.transformer.wpe.weight[:96] = model.transformer.wpe.weight[32:128]
    late = eval_long.loss_by_position(model, data, 96, 32, 4, 2, offset=32)
    assert torch.allclose(late, eval_long.loss_by_position(shifted, data, 96, 32, 4, 2), atol=1e-5)
    assert not torch.allclose(late, eval_long.loss_by_position(model, data, 96, 32, 4, 2))


class TargetOnly(torch.nn.Module):
    """A 'model' that ignores its input:
    its loss at a position depends only on the token to predict there."""

    def __init__(self, vocab_size):
        super().__init__()
        self.logits = torch.randn(vocab_size, generator=torch.Generator().manual_seed(0)) * 3

    def forward(self, x, y, cache=None):
        return self.logits.expand(*x.shape, -1), None


def test_with_the_stride_dividing_the_bucket_every_bucket_scores_the_same_tokens(data_dir):
    data = np.memmap(data_dir / 'val.bin', dtype=np.uint16, mode='r')
    model = TargetOnly(int(data.max()) + 1)
    spread = {}  # largest minus smallest bucket mean, buckets of 16 positions
    for stride in (16, 8, 61, 13):
        per_position = eval_long.loss_by_position(model, data, 64, stride, 0, 64)
        means = [m for _, _, m in eval_long.buckets(per_position, 16)]
        spread[stride] = max(means) - min(means)
    # dividing the bucket: only the ends of the span differ (measured 0.005 of ~10 nats
    # on this 1.6k-token val); a stride that does not divide it weighs different tokens
    # in different buckets (0.05-0.12 here)
    assert max(spread[16], spread[8]) < 0.01 < 0.03 < min(spread[61], spread[13])


def test_at_length_extends_learned_positions_only_when_asked(data_dir, tmp_path):
    learned, _ = eval_long.load(save_tiny(tmp_path / 'a.pt', data_dir), 'cpu')
    assert eval_long.at_length(learned, 128, '') is learned
    assert eval_long.at_length(learned, 256, '') is None
    longer = eval_long.at_length(learned, 256, 'interpolate')
    # a copy: the original is kept
    assert longer.config.block_size == 256 and learned.config.block_size == 128
    free, _ = eval_long.load(save_tiny(tmp_path / 'b.pt', data_dir, pos_emb='none'), 'cpu')
    assert eval_long.at_length(free, 1024, '') is free  # no positions: any length


class Oracle(torch.nn.Module):
    """Reads the key from the needle in its input and predicts it;
    wrong_digit corrupts one digit of the key."""

    def __init__(self, wrong_digit=None):
        super().__init__()
        self.wrong_digit = wrong_digit

    def key(self, row):
        digits = [STOI[d] for d in re.search(r'pass key is (\d{5})', decode(row)).group(1)]
        if self.wrong_digit is not None:
            wrong = STOI['0'] if digits[self.wrong_digit] != STOI['0'] else STOI['1']
            digits[self.wrong_digit] = wrong
        return digits

    # logits favour the key at the last 5 positions (teacher forcing)
    def forward(self, x, targets=None):
        logits = torch.zeros(*x.shape, len(CHARS))
        for b, row in enumerate(x):
            logits[b, torch.arange(x.size(1) - 5, x.size(1)), self.key(row)] = 1.0
        return logits, None

    def generate(self, idx, max_new_tokens, temperature=1.0):
        return torch.cat([idx, torch.tensor([self.key(row) for row in idx])], dim=1)


def test_passkey_scores_exact_match_and_digits():
    scores = eval_long.passkey(Oracle(), encode, 200, 0.5, samples=5, batch_size=2, seed=0)
    assert scores == (1.0, 1.0)
    exact, per_digit = eval_long.passkey(Oracle(wrong_digit=4), encode, 200, 0.0, samples=5,
                                         batch_size=2, seed=0)
    assert exact == 0.0 and per_digit == pytest.approx(0.8)


def test_passkey_uses_evaluation_keys_only(monkeypatch):
    seen = []
    real = prepare_data.passkey_sample
    monkeypatch.setattr(prepare_data, 'passkey_sample',
                        lambda enc, key, *a: seen.append(key) or real(enc, key, *a))
    eval_long.passkey(Oracle(), encode, 150, 1.0, samples=7, batch_size=4, seed=1)
    assert len(set(seen)) == 7 and all(prepare_data.is_eval_key(k) for k in seen)


def test_eval_long_runs_end_to_end(data_dir, tmp_path, capsys):
    a = save_tiny(tmp_path / 'inattn.pt', data_dir)
    b = save_tiny(tmp_path / 'free.pt', data_dir, attention='causal', pos_emb='none')
    eval_long.main([f'--ckpt={a},{b}', '--mode=both', '--samples=2', '--windows=4',
                    '--lengths=[128,256]', '--depths=[0.0,1.0]', f'--plot={tmp_path / "loss.png"}',
                    '--mark=64'])
    out = capsys.readouterr().out
    assert re.search(r'\| 96-111 \| \d\.\d{4} \| \d\.\d{4} \|', out)  # 8 buckets of 16 positions
    assert re.search(r'\| 128 \| start \| \d+ / \d+ \| \d+ / \d+ \|', out)
    assert re.search(r'\| 256 \| end \| n/a \| \d+ / \d+ \|', out)  # learned positions stop at 128
    assert (tmp_path / 'loss.png').read_bytes()[:4] == b'\x89PNG'


def test_context_past_learned_positions_is_a_clear_error(data_dir, tmp_path, capsys):
    ckpt = save_tiny(tmp_path / 'ckpt.pt', data_dir)
    with pytest.raises(SystemExit) as e:
        eval_long.main([f'--ckpt={ckpt}', '--context=256', '--windows=2'])
    assert e.value.code == 2
    assert 'offset + context = 256 is past its block_size=128' in capsys.readouterr().err
    # extended: it runs
    eval_long.main([f'--ckpt={ckpt}', '--context=256', '--windows=2', '--extend=copy'])


def test_passkey_on_a_vocabulary_without_digits_is_a_clear_error(tmp_path, capsys):
    (tmp_path / 'in.txt').write_text(TEXT, encoding='utf-8')
    data = prepare('shakespeare_char', input_path=tmp_path / 'in.txt', out_dir=tmp_path / 'data')
    ckpt = save_tiny(tmp_path / 'ckpt.pt', data)
    with pytest.raises(SystemExit):
        eval_long.main([f'--ckpt={ckpt}', '--mode=passkey'])
    assert "vocabulary has no" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the configs of this feature, as train.py reads them

LONG_CONFIGS = ['inattn_long', 'train_long', 'inattn_long_gpt2', 'train_long_gpt2',
                'inattn_passkey', 'train_passkey', 'lightning_passkey', 'infini_passkey']


@pytest.mark.parametrize('name', LONG_CONFIGS)
def test_configs_set_only_train_keys(name):
    tree = ast.parse((REPO / 'train.py').read_text())
    keys = {t.id for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}
    assert set(read_config_file(f'config/{name}.py')) <= keys


def test_inattn_long_grows_a_short_checkpoint_and_names_it_when_missing(char_data, tmp_path):
    run('train.py', *TINY, '--attention=inattention', f'--dataset={char_data}', '--out_dir=short',
        '--max_iters=2', '--eval_interval=2', cwd=tmp_path)
    r = run('train.py', 'config/inattn_long.py', cwd=tmp_path, expect_ok=False)
    line = one_line_error(r, 2)
    assert 'out-inattn-shakespeare-char' in line  # the base checkpoint it needs
    run('train.py', 'config/inattn_long.py', f'--init_from={tmp_path / "short"}',
        f'--dataset={char_data}', '--out_dir=long', '--device=cpu', '--max_iters=2',
        '--eval_interval=2', '--eval_iters=1', '--batch_size=2', cwd=tmp_path)
    short, long = (torch.load(tmp_path / d / 'ckpt.pt', map_location='cpu', weights_only=False)
                   for d in ('short', 'long'))
    assert long['model_args']['block_size'] == 256
    assert long['model']['transformer.wpe.weight'].shape[0] == 256
    # the shape is the checkpoint's
    assert long['model_args']['n_embd'] == short['model_args']['n_embd'] == 32
    assert long['model_args']['attention'] == 'inattention'
