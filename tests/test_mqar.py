"""MQAR (docs/attention.md section 10): the generator's sequences, their files, train.py's
whole-sequence batches, eval_long.py's recall score, the configs."""
import math
import pickle
import re
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import eval_long
import prepare_data
from configurator import read_config_file
from conftest import REPO, TINY, one_line_error, run, run_here, tiny_gpt
from model import GPT, GPTConfig
from prepare_data import PrepareError, mqar_name, prepare, read_mqar

T, N, V = 32, 4, 32  # a tiny setting: TINY's block_size is 32
SETTING = dict(seq_len=T, pairs=N, vocab=V)


@pytest.fixture(scope='module')
def mqar_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('mqar') / mqar_name(T, N, V)
    return prepare('mqar', out_dir=out, train_samples=400, val_samples=16, **SETTING)


def load(folder, split):
    with open(folder / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    return (*read_mqar(folder, split, meta['mqar']['seq_len']), meta)


# -----------------------------------------------------------------------------
# the generator and its files

def test_every_query_asks_for_the_value_paired_with_its_key(mqar_dir):
    x, y, meta = load(mqar_dir, 'train')
    assert meta['vocab_size'] == V and meta['mqar']['seq_len'] == T and meta['mqar']['pairs'] == N
    assert x.shape == y.shape == (400, T) and x.dtype == np.uint16 and y.dtype == np.int16
    for row, target in zip(x, y):
        keys, values = row[0:2 * N:2], row[1:2 * N:2]
        assert len(set(keys)) == N and all(1 <= k < V // 2 for k in keys)  # distinct, own ids
        assert len(set(values)) == N and all(V // 2 <= v < V for v in values)
        queries = np.flatnonzero(target != -1)
        assert len(queries) == N and queries.min() >= 2 * N and np.all((queries - 2 * N) % 2 == 0)
        assert sorted(row[queries]) == sorted(keys)  # every key asked once
        pairs = dict(zip(keys, values))
        assert all(target[t] == pairs[row[t]] for t in queries)
        rest = np.setdiff1d(np.arange(2 * N, T), queries)
        assert np.all(row[rest] == 0) and np.all(target[:2 * N] == -1)  # filler, no target


def test_queries_come_in_random_order_in_every_slot(mqar_dir):
    x, y, _ = load(mqar_dir, 'train')
    slots = set()
    orders = set()
    for row, target in zip(x, y):
        queries = np.flatnonzero(target != -1)
        slots |= set(queries.tolist())
        order = [list(row[0:2 * N:2]).index(k) for k in row[queries]]  # which pair each query asks
        orders.add(tuple(order))
    assert slots == set(range(2 * N, T, 2))  # all (T - 2N) / 2 slots are used
    assert len(orders) > 20  # of the 24 orders of 4 keys


def test_same_seed_same_files_another_seed_other_files_and_val_is_not_train(mqar_dir, tmp_path):
    again = prepare('mqar', out_dir=tmp_path / 'again', train_samples=400, val_samples=16,
                    **SETTING)
    other = prepare('mqar', out_dir=tmp_path / 'other', train_samples=400, val_samples=16,
                    seed=1, **SETTING)
    for name in ('train.bin', 'train_targets.bin', 'val.bin', 'val_targets.bin'):
        assert (again / name).read_bytes() == (mqar_dir / name).read_bytes()
        assert (other / name).read_bytes() != (mqar_dir / name).read_bytes()
    train, _, _ = load(mqar_dir, 'train')
    val, _, _ = load(mqar_dir, 'val')
    assert not {r.tobytes() for r in val} & {r.tobytes() for r in train}
    assert sorted(p.name for p in mqar_dir.iterdir()) == [
        'meta.pkl', 'train.bin', 'train_targets.bin', 'val.bin', 'val_targets.bin']


def test_a_settings_name_is_its_dataset(tmp_path):
    assert mqar_name(64, 8, 256) == 'mqar_T64_N8_V256'
    assert prepare_data.preparable('mqar_T64_N8_V256')
    assert not prepare_data.preparable('mqar_T64_N8')
    a = prepare('mqar_T16_N2_V16', out_dir=tmp_path / 'a', train_samples=3, val_samples=2)
    b = prepare('mqar', out_dir=tmp_path / 'b', seq_len=16, pairs=2, vocab=16, train_samples=3,
                val_samples=2)
    assert load(a, 'val')[2]['mqar']['seq_len'] == 16
    assert (a / 'train.bin').read_bytes() == (b / 'train.bin').read_bytes()


@pytest.mark.parametrize('setting, message', [
    (dict(seq_len=15, pairs=4, vocab=32), 'seq_len=15 is too short for pairs=4'),
    (dict(seq_len=64, pairs=8, vocab=17), 'vocab=17 has 7 key ids for pairs=8'),
    (dict(seq_len=64, pairs=8, vocab=2**15 + 2), 'does not fit the int16 targets'),
    (dict(seq_len=64, pairs=0, vocab=256), 'must all be at least 1'),
])
def test_impossible_settings_are_errors_before_anything_is_written(tmp_path, setting, message):
    with pytest.raises(PrepareError, match=message):
        prepare('mqar', out_dir=tmp_path / 'out', train_samples=2, val_samples=2, **setting)
    assert not (tmp_path / 'out').exists()


def test_script_writes_a_setting_and_its_errors_are_one_line(tmp_path):
    args = ['--seq_len', 16, '--pairs', 2, '--vocab', 16, '--train_samples', 5, '--val_samples', 3]
    run('prepare_data.py', 'mqar', *args, '--out_dir', tmp_path / 'ok', cwd=tmp_path)
    run('prepare_data.py', 'mqar_T16_N2_V16', *args[-4:], '--out_dir', tmp_path / 'name',
        cwd=tmp_path)  # the same setting by its name
    assert load(tmp_path / 'ok', 'train')[0].shape == (5, 16)
    for name in ('train.bin', 'val_targets.bin'):
        assert (tmp_path / 'ok' / name).read_bytes() == (tmp_path / 'name' / name).read_bytes()
    r = run('prepare_data.py', 'mqar', *args, '--pairs', 5, '--out_dir', tmp_path / 'bad',
            cwd=tmp_path, expect_ok=False)
    assert 'seq_len=16 is too short for pairs=5' in one_line_error(r, 1)


def test_targets_that_do_not_fit_the_sequences_are_an_error(tmp_path):
    out = prepare('mqar', out_dir=tmp_path, train_samples=3, val_samples=2, seq_len=16, pairs=2,
                  vocab=16)
    (out / 'val_targets.bin').write_bytes((out / 'val_targets.bin').read_bytes()[:-2])
    with pytest.raises(PrepareError, match='do not hold the same whole sequences of 16 tokens'):
        read_mqar(out, 'val', 16)


# -----------------------------------------------------------------------------
# the recall score

class Recaller(torch.nn.Module):
    """A hand-made model that recalls: at a key seen in the pairs it predicts that key's value,
    else the filler; forget=k makes it answer the filler for the first k pairs' keys instead."""

    def __init__(self, forget=0):
        super().__init__()
        self.forget = forget

    def forward(self, x, targets=None):
        logits = torch.zeros(*x.shape, V)
        for b, row in enumerate(x.tolist()):
            pairs = dict(zip(row[2 * self.forget:2 * N:2], row[2 * self.forget + 1:2 * N:2]))
            for t in range(2 * N, T):
                logits[b, t, pairs.get(row[t], 0)] = 10.0
        return logits, None


def test_the_score_counts_the_recall_positions_only(mqar_dir):
    tokens, targets, _ = load(mqar_dir, 'val')
    lse = math.log(math.exp(10) + V - 1)  # logsumexp of the logits: one 10, V - 1 zeros
    accuracy, loss = eval_long.mqar_recall(Recaller(), tokens, targets, batch_size=5)
    # 1.0, not N / T: the filler positions do not count
    assert accuracy == 1.0 and loss == pytest.approx(lse - 10, abs=1e-6)
    accuracy, loss = eval_long.mqar_recall(Recaller(forget=N // 2), tokens, targets, batch_size=16)
    assert accuracy == 0.5 and loss == pytest.approx(lse - 5, abs=1e-6)
    accuracy, loss = eval_long.mqar_recall(Recaller(forget=N), tokens, targets, batch_size=3)
    assert accuracy == 0.0 and loss == pytest.approx(lse, abs=1e-6)


# -----------------------------------------------------------------------------
# train.py and eval_long.py

@pytest.fixture(scope='module')
def mqar_run(mqar_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('train')
    r = run('train.py', *TINY, '--out_dir=run', f'--dataset={mqar_dir}', '--max_iters=3',
            '--eval_interval=3', cwd=tmp)
    return tmp / 'run', r.stdout


def test_train_draws_whole_sequences_and_scores_the_recall_positions(mqar_dir, mqar_run):
    out, stdout = mqar_run
    ckpt = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=False)
    assert ckpt['meta']['mqar']['seq_len'] == T and ckpt['iter_num'] == 3
    model, _ = eval_long.load(out, 'cpu')
    printed = re.search(r'^step 3: train loss ([\d.]+), val loss ([\d.]+)$', stdout, re.M).groups()
    for split, loss in zip(('train', 'val'), map(float, printed)):
        # estimate_loss: eval_iters=2 batches of batch_size=4 sequences, drawn by a generator
        # seeded with 1337
        tokens, targets, _ = load(mqar_dir, split)
        generator = torch.Generator().manual_seed(1337)
        losses = []
        for _ in range(2):
            ix = torch.randint(len(tokens), (4,), generator=generator).numpy()
            x, y = (torch.from_numpy(a[ix].astype(np.int64)) for a in (tokens, targets))
            with torch.no_grad():
                losses.append(model(x, y)[1].item())
        assert loss == pytest.approx(np.mean(losses), abs=2e-4)


def test_eval_long_reports_recall_accuracy(mqar_run, tmp_path, capsys):
    out, _ = mqar_run
    eval_long.main([f'--ckpt={out}', '--mode=mqar'])
    printed = capsys.readouterr().out
    assert f'| dataset | {mqar_name(T, N, V)} |' in printed
    assert f'| sequences (queries) | 16 ({16 * N}) |' in printed
    assert re.search(r'^\| accuracy % \| \d+\.\d\d \|$', printed, re.M)
    shutil.copy(out / 'ckpt.pt', tmp_path / 'twin.pt')  # two columns
    eval_long.main([f'--ckpt={out},{tmp_path / "twin.pt"}', '--mode=mqar', '--sequences=5',
                    '--batch_size=2'])
    assert f'| sequences (queries) | 5 ({5 * N}) | 5 ({5 * N}) |' in capsys.readouterr().out


def test_block_size_other_than_the_sequence_length_is_one_line(mqar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run_here('train.py', *TINY, f'--dataset={mqar_dir}', '--block_size=16')
    assert status == 2 and len(stderr.splitlines()) == 1
    assert f'holds MQAR sequences of {T} tokens' in stderr and f'--block_size={T}' in stderr
    assert not (tmp_path / 'out').exists()


def test_mqar_score_of_a_model_without_mqar_data_is_one_line(char_data, tmp_path, capsys):
    with open(char_data / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=meta['vocab_size'], n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config),
                'config': {'dataset': str(char_data)}, 'meta': meta}, tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit) as e:
        eval_long.main([f'--ckpt={tmp_path}', '--mode=mqar'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and 'is no MQAR dataset' in err


# -----------------------------------------------------------------------------
# the configs

TWINS = {'inattn_mqar': 'inattention', 'lightning_mqar': 'lightning', 'infini_mqar': 'infini'}


def train_keys():
    return {k for k in re.findall(r'^(\w+) = ', (REPO / 'train.py').read_text(), re.M)}


@pytest.mark.parametrize('name', ['train_mqar', *TWINS])
def test_configs_read_whole_sequences_and_differ_only_in_the_attention(name):
    base = read_config_file('config/train_mqar.py')
    config = read_config_file(f'config/{name}.py')
    assert set(config) <= train_keys()
    T_name = int(prepare_data.MQAR_NAME.fullmatch(config['dataset'])[1])
    assert config['block_size'] == T_name
    differ = {k for k in base.keys() | config.keys() if base.get(k) != config.get(k)}
    assert differ <= {'out_dir', 'wandb_run_name', 'attention', 'infini_segment'}
    assert config.get('attention', 'causal') == TWINS.get(name, 'causal')
    if name == 'infini_mqar':
        assert config['infini_segment'] == 16  # queries reach the pairs through the memory


# -----------------------------------------------------------------------------
# eval_long.py --mode=heads: the recall diagnosis

@pytest.mark.parametrize('attention, prefix', [('causal', 0), ('inattention', 0),
                                               ('inattention', 1)])
def test_attention_maps_are_the_weights_the_model_uses(attention, prefix):
    """Each map, applied to the block's values, gives the block's attention output."""
    model = tiny_gpt(attention=attention, inattn_prefix=prefix)
    x = torch.randint(37, (2, 12))
    maps, s = eval_long.attention_maps(model, x)
    assert (s is None) == (attention == 'causal')
    outputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: outputs.append((args, out)))
             for b in model.transformer.h]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for att, attn, ((h, s_in, _), out) in zip(maps, [b.attn for b in model.transformer.h],
                                               outputs):
        assert torch.allclose(att.sum(-1), torch.ones(()), atol=1e-6)
        assert att.triu(1).abs().max() == 0  # causal: no weight on a later token
        C = h.size(-1)
        v = attn.split_heads(F.linear(s_in if attn.reads_s else h, attn.c_attn.weight[2 * C:],
                                      attn.c_attn.bias[2 * C:]))
        assert torch.allclose(attn.c_proj(attn.merge_heads(att @ v)), out, atol=1e-5)


def test_a_probe_reads_what_the_features_hold_and_no_more():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(10, (400,), generator=generator)
    train = torch.arange(400) < 200
    held = torch.eye(10)[labels] + 0.01 * torch.randn(400, 10, generator=generator)
    assert eval_long.probe(held, labels, train) == 1.0
    noise = torch.randn(400, 10, generator=generator)
    assert eval_long.probe(noise, labels, train) < 0.3  # chance is 0.1


def test_heads_finds_the_value_a_query_fetches(mqar_dir):
    """At every query, 'fetch' reads the weight on the position of the value paired with the
    query's key, as the data has it, and nowhere else."""
    model = tiny_gpt(vocab_size=V)
    x, at, recall = eval_long.head_inputs({'config': {'dataset': str(mqar_dir)}}, '', 8, T)
    assert x.shape == (8, T) and at[:, 1:2 * N:2].all() and at.sum() == 8 * N  # the values
    tokens, targets, _ = load(mqar_dir, 'val')
    for b in range(8):
        for t in (targets[b] != -1).nonzero()[0]:
            key_at = list(tokens[b, :2 * N:2]).index(tokens[b, t])
            assert recall[b, t] == 2 * key_at + 1 and targets[b, t] == tokens[b, 2 * key_at + 1]
    assert (recall != -1).sum() == 8 * N
    # a head whose queries are 0 spreads its weight evenly: 1/(t+1) on each of the t+1 positions
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:32] = 0
        model.transformer.h[1].attn.c_attn.bias[:32] = 0
    report = eval_long.head_report(model, x, at, recall)
    assert len(report['rows']) == 2 and report['rows'][0][2].shape == (4,)
    rb, rt = (recall != -1).nonzero(as_tuple=True)
    bt = at.nonzero(as_tuple=True)[1]
    torch.testing.assert_close(report['rows'][1][2], (1 / (bt + 1)).mean().expand(4).float())
    torch.testing.assert_close(report['rows'][1][3], (1 / (rt + 1)).mean().expand(4).float())


def test_heads_reads_the_weights_where_a_hand_built_map_puts_them(monkeypatch):
    # one head, 4 positions: position 1 and 3 are read for the previous token, 3 fetches 1
    att = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                        [0.3, 0.7, 0.0, 0.0],
                        [0.1, 0.2, 0.7, 0.0],
                        [0.4, 0.1, 0.2, 0.3]]).view(1, 1, 4, 4)
    monkeypatch.setattr(eval_long, 'attention_maps', lambda model, x: ([att, None], None))
    at = torch.tensor([[False, True, False, True]])
    recall = torch.tensor([[-1, -1, -1, 1]])
    model = tiny_gpt(vocab_size=V)
    report = eval_long.head_report(model, torch.zeros(1, 4, dtype=torch.long), at, recall)
    (_, _, prev, fetch), (_, _, none, _) = report['rows']
    assert prev.tolist() == pytest.approx([(0.3 + 0.2) / 2])  # att[1, 0] and att[3, 2]
    assert fetch.tolist() == pytest.approx([0.1])  # att[3, 1]
    assert none is None and report['uniform'] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_heads_mode_prints_the_tables_and_draws_the_maps(mqar_run, tmp_path, capsys):
    out, _ = mqar_run
    eval_long.main([f'--ckpt={out}', '--mode=heads', '--sequences=8',
                    f'--plot={tmp_path / "heads.png"}'])
    printed = capsys.readouterr().out
    assert re.search(r'^\| \S+ \| 1 \| CausalSelfAttention \| [\d. ]+ \| [\d. ]+ \| [\d.]+ \|$',
                     printed, re.M)
    assert (tmp_path / 'heads.png').read_bytes()[:4] == b'\x89PNG'
    assert 'linear probe of s (' not in printed  # a causal model has no initial states to probe
