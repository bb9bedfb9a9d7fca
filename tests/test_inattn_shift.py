"""InAttention with token-shifted initial states (GPTConfig.inattn_shift = k):
    s_t = ln_in(h_t + Σ_{i=1..k} W_i h_{t-i})
k = 0 is the InAttention of before, bit for bit; for k in {1, 2} and m in {0, 1}: causality,
cached = uncached (on sampled output that varies, also past block_size), chunked = whole, the
InAttention property, the state formula, train.py, and checkpoints from before the key."""
import pytest
import torch

from checkpoint import build_model
from conftest import (TINY, assert_cached_equals_uncached, one_line_error, run, tiny_gpt,
                      train_then_resume, varied_gpt)
from test_inattn_prefix import REFERENCE

SHIFTS = [1, 2]
PREFIXES = [0, 1]
V = 37  # tiny_gpt's vocabulary


def shifted(k, m=0, **kw):
    return tiny_gpt(attention='inattention', n_layer=3, inattn_prefix=m, inattn_shift=k, **kw)


def prompt(B, T, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_k0_is_bit_identical_to_the_stored_reference():
    """The same parameters and logits as the InAttention written before the shift existed."""
    ref = torch.load(REFERENCE)
    model = tiny_gpt(attention='inattention', inattn_shift=0)
    assert model.transformer.shift is None
    logits, _ = model(ref['idx'], ref['idx'])
    assert sum(p.numel() for p in model.parameters()) == ref['n_params']
    assert torch.equal(logits, ref['logits'])


@pytest.mark.parametrize('k', SHIFTS)
def test_the_shift_is_k_learned_c_by_c_matrices(k):
    model = shifted(k)
    C = model.config.n_embd
    assert model.transformer.shift.weight.shape == (C, k * C)
    assert model.get_num_params() == shifted(0).get_num_params() + k * C * C


@pytest.mark.parametrize('m', PREFIXES)
@pytest.mark.parametrize('k', SHIFTS)
def test_causality(k, m):
    """Changing token t changes no logit before t, and changes the logits from t on."""
    model = shifted(k, m)
    idx = prompt(1, 20, 1)
    logits, _ = model(idx, idx)
    changed = idx.clone()
    changed[0, 12] = (changed[0, 12] + 1) % V
    logits2, _ = model(changed, changed)
    torch.testing.assert_close(logits2[0, :12], logits[0, :12], atol=0, rtol=0)
    assert not torch.allclose(logits2[0, 12:], logits[0, 12:])


@pytest.mark.parametrize('k', SHIFTS)
def test_s_reads_exactly_the_previous_k_positions(k):
    """With m = 0, s_t depends on the tokens t-k..t and on no earlier one."""
    model = shifted(k)
    held = {}
    model.transformer.ln_in.register_forward_hook(lambda mod, args, out: held.update(s=out))
    idx = prompt(1, 20, 5)
    model(idx)
    s = held['s']
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % V
    model(changed)
    moved = (held['s'] - s).abs().amax(dim=-1)[0]  # (T,): how far each s_t moved
    assert moved[:8].max() == 0
    assert (moved[8:9 + k] > 0).all()  # token 8 is in s_8 .. s_{8+k}
    assert moved[9 + k:].max() == 0


@pytest.mark.parametrize('m', PREFIXES)
@pytest.mark.parametrize('k', [0, *SHIFTS])
@pytest.mark.parametrize('layout', ['s', 'kv'])
def test_cached_decoding_equals_uncached_also_past_block_size(k, m, layout):
    """On a model whose output varies, every step's logits; 10 + 40 tokens slide the 32-token
    window, which rebuilds the cache (the shift starts from zeros again); prefill chunks of 3."""
    model = varied_gpt(attention='inattention', n_layer=3, inattn_prefix=m, inattn_shift=k,
                       inattn_cache=layout)
    assert_cached_equals_uncached(model, prompt(2, 10, 2), 40)
    assert_cached_equals_uncached(model, prompt(2, 10, 2), 40, prefill_chunk=3)


@pytest.mark.parametrize('m', PREFIXES)
@pytest.mark.parametrize('k', SHIFTS)
@pytest.mark.parametrize('layout', ['s', 'kv'])
def test_chunked_prefill_equals_the_whole_prompt(k, m, layout):
    """A chunk's first tokens read the previous chunk's last inputs (chunks shorter than k too)."""
    model = shifted(k, m, inattn_cache=layout)
    idx = prompt(2, 29, 3)
    whole, _ = model(idx, idx)  # every position's logits, no cache
    for chunk in (1, 2, 5, 8):
        cache = model.new_cache()
        logits = [model(idx[:, i:i + chunk], idx[:, i:i + chunk], cache=cache)[0]
                  for i in range(0, 29, chunk)]
        torch.testing.assert_close(torch.cat(logits, dim=1), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize('m', PREFIXES)
@pytest.mark.parametrize('k', SHIFTS)
def test_the_stream_after_block_m_moves_no_key_or_value(k, m):
    """The InAttention property: keys and values come from s, which is taken from the stream
    entering block m, so perturbing the output of block m (and so every later block's input)
    moves no key or value, only the queries."""
    model = shifted(k, m)
    held = {}
    model.transformer.ln_in.register_forward_hook(lambda mod, args, out: held.update(s=out))
    idx = prompt(1, 16, 6)
    logits, _ = model(idx, idx)
    s = held['s']
    noise = torch.randn(1, 16, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    model.transformer.h[m].register_forward_hook(lambda mod, args, out: out + noise)
    logits2, _ = model(idx, idx)
    assert torch.equal(held['s'], s)
    assert not torch.allclose(logits2, logits)  # the perturbation did reach the queries


@pytest.mark.parametrize('m', PREFIXES)
@pytest.mark.parametrize('k', [0, *SHIFTS, 3])
@pytest.mark.parametrize('layout', ['s', 'kv'])
def test_state_formula_equals_the_measured_cache(k, m, layout):
    """The shift adds its last k inputs: k·d numbers per sequence, for any T (also T < k)."""
    model = shifted(k, m, inattn_cache=layout)
    d, L = model.config.n_embd, model.config.n_layer
    per_token = 2 * m + 1 if layout == 's' else 2 * L
    for T in (1, 2, 7, 30):
        for B in (1, 3):
            cache = model.new_cache()
            model.prefill(torch.zeros(B, T, dtype=torch.long), cache)
            formula = model.decode_state_bytes(T, batch_size=B)
            assert formula == B * (per_token * T + k) * d * 4 == cache.nbytes()


def test_a_shift_needs_an_attention_that_reads_s():
    for attention in ('causal', 'lightning', 'infini'):
        with pytest.raises(ValueError, match=r"inattn_shift=1 needs an attention that reads"):
            tiny_gpt(attention=attention, inattn_shift=1)
    with pytest.raises(ValueError, match=r"inattn_shift=-1 must be 0"):
        tiny_gpt(attention='inattention', inattn_shift=-1)


def test_train_py_stops_with_one_line_on_a_shift_without_initial_states(char_data, tmp_path):
    r = run('train.py', *TINY, f'--dataset={char_data}', '--inattn_shift=1', cwd=tmp_path,
            expect_ok=False)
    assert 'inattn_shift=1 needs an attention that reads initial states' in one_line_error(r, 2)
    assert not (tmp_path / 'out').exists()


def test_train_py_trains_and_resumes_a_shifted_model(char_data, tmp_path):
    saved = train_then_resume(char_data, tmp_path, '--attention=inattention', '--inattn_shift=2',
                              '--inattn_prefix=1')
    assert saved['model_args']['inattn_shift'] == 2
    assert saved['model']['transformer.shift.weight'].shape == (32, 64)


def test_a_checkpoint_from_before_the_key_still_loads():
    model = tiny_gpt(attention='inattention')
    args = dict(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32,
                attention='inattention')  # written before inattn_shift existed: no such key
    saved = dict(model=model.state_dict(), model_args=args, meta=dict(vocab_size=V))
    loaded = build_model(saved, 'old.pt').eval()
    assert loaded.config.inattn_shift == 0
    idx = prompt(1, 12, 8)
    torch.testing.assert_close(loaded(idx, idx)[0], model(idx, idx)[0], atol=0, rtol=0)


def test_the_overhead_script_times_both_models(tmp_path):
    """docs/shift_overhead.py (the shift's decode cost, docs/results.md) runs and prints both
    rates and the ratio of their step times."""
    r = run('docs/shift_overhead.py', 64, 1, '--threads=1', '--rounds=3', cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert lines[-3].startswith('inattn_shift=0: ') and lines[-2].startswith('inattn_shift=1: ')
    assert lines[-1].startswith('step time, shift / no shift: median ')
