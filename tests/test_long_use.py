"""Where a longer context is used: MQAR with far queries and accuracy by distance, the passkey
mix at another length, and eval_long.py --mode=gain (the tokens that gain from context)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_long
import prepare_data
from conftest import run
from prepare_data import PrepareError, mqar_name, mqar_sample, prepare, read_mqar

T, N, V, Q = 256, 8, 64, 80  # queries from position 80 on: 65 to 253 tokens after their value


@pytest.fixture(scope='module')
def far(tmp_path_factory):
    out = tmp_path_factory.mktemp('far') / mqar_name(T, N, V, Q)
    prepare(out.name, out_dir=out, train_samples=4, val_samples=200)
    return read_mqar(out, 'val', T)


def test_far_queries_come_after_query_start_each_key_once(far):
    x, y = far
    assert x.shape == (200, T)
    for row, target in zip(x, y):
        queries = np.flatnonzero(target != -1)
        assert len(queries) == N and queries.min() >= Q and (queries % 2 == 0).all()
        assert sorted(row[queries]) == sorted(row[0:2 * N:2])  # every key asked once
        assert (row[2 * N:Q] == prepare_data.MQAR_FILLER).all()  # nothing between pairs and Q
    distance = eval_long.query_distances(x, y, N)
    asked = distance[y != -1]
    assert asked.min() >= Q - 2 * N + 1 and asked.max() <= T - 2
    assert asked.min() < 70 and asked.max() > 240  # they spread over the whole range
    assert ((distance == -1) == (y == -1)).all()


def test_the_name_holds_query_start_and_the_default_is_unchanged():
    assert mqar_name(64, 8, 256) == mqar_name(64, 8, 256, 16) == 'mqar_T64_N8_V256'
    assert mqar_name(256, 8, 256, 80) == 'mqar_T256_N8_V256_Q80'
    assert prepare_data.preparable('mqar_T256_N8_V256_Q80')
    a = mqar_sample(np.random.default_rng(1), 64, 8, 256)
    b = mqar_sample(np.random.default_rng(1), 64, 8, 256, query_start=16)
    assert all((u == v).all() for u, v in zip(a, b))


@pytest.mark.parametrize('query_start', [15, 14, 242])
def test_an_impossible_query_start_is_a_clear_error(tmp_path, query_start):
    with pytest.raises(PrepareError, match=f'query_start={query_start} must be even'):
        prepare('mqar', out_dir=tmp_path / 'out', seq_len=T, pairs=N, vocab=V,
                query_start=query_start, train_samples=2, val_samples=2)
    assert not (tmp_path / 'out').exists()


class DistanceLimited(nn.Module):
    """A hand-made recaller: at a query it outputs the value paired with the key, read from the
    pairs, but only when the query is less than `reach` tokens after that value; else the filler."""

    def __init__(self, reach):
        super().__init__()
        self.reach = reach

    def forward(self, x, y=None, cache=None):
        B, T = x.shape
        logits = torch.zeros(B, T, V)
        for b in range(B):
            for t in range(2 * N, T):
                place = (x[b, 0:2 * N:2] == x[b, t]).nonzero()
                answer = 0
                if len(place) and t - (2 * place[0, 0] + 1) < self.reach:
                    answer = x[b, 2 * place[0, 0] + 1]
                logits[b, t, answer] = 1.0
        return logits, None


def test_accuracy_by_distance_of_a_model_whose_answers_are_known(far):
    x, y = far[0][:20], far[1][:20]
    rows = eval_long.mqar_by_distance(DistanceLimited(reach=128), x, y, N, 64, batch_size=7)
    assert [(lo, hi) for lo, hi, _, _ in rows] == [(64, 128), (128, 192), (192, 256)]
    assert [a for _, _, a, _ in rows] == [1.0, 0.0, 0.0]
    assert sum(q for *_, q in rows) == (y != -1).sum()
    rows = eval_long.mqar_by_distance(DistanceLimited(reach=10 ** 6), x, y, N, 64, batch_size=7)
    assert all(a == 1.0 for _, _, a, _ in rows)


def test_passkey_len_on_the_command_line_is_the_python_api(tmp_path, monkeypatch):
    text = tmp_path / 'input.txt'
    text.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 400)
    run('prepare_data.py', 'shakespeare_char_passkey', '--passkey_len', 160, '--input', text,
        '--out_dir', tmp_path / 'cli', cwd=tmp_path)
    prepare('shakespeare_char_passkey', input_path=text, out_dir=tmp_path / 'api',
            passkey_len=160)
    default = prepare('shakespeare_char_passkey', input_path=text, out_dir=tmp_path / 'd256')
    for name in ('train.bin', 'val.bin', 'meta.pkl'):
        assert (tmp_path / 'cli' / name).read_bytes() == (tmp_path / 'api' / name).read_bytes()
    assert (tmp_path / 'cli/train.bin').read_bytes() != (default / 'train.bin').read_bytes()
    monkeypatch.setattr(prepare_data, 'REPO', tmp_path)  # the default folder: its own name
    out = prepare('shakespeare_char_passkey', input_path=text, passkey_len=160)
    assert out == tmp_path / 'data' / 'shakespeare_char_passkey_160'


class CurrentTokenOnly(nn.Module):
    """Logits from the current token alone: a model that ignores its context."""

    def __init__(self, vocab=20):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x, y=None, cache=None):
        return self.table(x), None


class LastTokensCount(nn.Module):
    """Logits from how often each token has been seen so far in the window: a model whose
    prediction depends on its whole context."""

    def forward(self, x, y=None, cache=None):
        counts = F.one_hot(x, 20).float().cumsum(1)  # (B, T, V): each token seen so far
        return counts / (1 + torch.arange(x.size(1)).view(1, -1, 1)), None


def test_a_model_that_ignores_context_gains_nothing():
    data = np.random.default_rng(0).integers(0, 20, 3000).astype(np.uint16)
    torch.manual_seed(0)
    index, long, short = eval_long.token_losses(CurrentTokenOnly(), data, 128, 32, 0, 8)
    torch.testing.assert_close(long, short, atol=1e-6, rtol=0)  # the same, but for rounding
    # every token with at least 32 before it is scored once (but the tail past the last window)
    assert index[0] == 32 and (index.diff() == 1).all() and len(index) >= 3000 - 32 - 128
    assert (data[index.numpy()] >= 0).all()
    _, long, short = eval_long.token_losses(LastTokensCount(), data, 128, 32, 0, 8)
    assert not torch.allclose(long, short)  # the test can tell a model that reads context


def test_the_long_and_short_losses_are_the_model_reading_those_windows():
    data = np.random.default_rng(1).integers(0, 20, 600).astype(np.uint16)
    model = LastTokensCount()
    index, long, short = eval_long.token_losses(model, data, 64, 16, 0, 4)
    for k in (0, 5, 100, len(index) - 1):
        t = int(index[k])
        ids = torch.from_numpy(data.astype(np.int64))
        s_logits, _ = model(ids[t - 16:t].unsqueeze(0))
        assert torch.isclose(short[k], F.cross_entropy(s_logits[0, -1], ids[t]))
        j = (t - 16) // 48 * 48  # the long windows start every 64 - 16 tokens
        l_logits, _ = model(ids[j:t].unsqueeze(0))
        assert torch.isclose(long[k], F.cross_entropy(l_logits[0, -1], ids[t]))


def test_top_tokens_are_chosen_on_one_half_and_scored_on_the_other():
    """Key 3 gains 5 nats on the first half and nothing on the second: a selection scored where
    it was made would report 5, the other half reports 0. Key 7 gains 1 on both halves."""
    keys = np.tile(np.arange(10), 40)  # 400 tokens, 40 of each key
    gain = np.zeros(400)
    gain[:200][keys[:200] == 3] = 5.0
    gain[keys == 7] = 1.0
    b_mean, share, a_mean, chosen = eval_long.split_half_gain(keys, gain, 0.1)
    assert chosen == [3] and a_mean == 5.0 and b_mean == 0.0 and share == 0.1
    b_mean, share, a_mean, chosen = eval_long.split_half_gain(keys, gain, 0.2)
    assert chosen == [3, 7] and b_mean == 0.5 and share == 0.2
    b_mean, _, _, chosen = eval_long.split_half_gain(keys, gain, 0.1, min_count=21)
    assert chosen == [] and np.isnan(b_mean)  # no key seen often enough to be chosen
