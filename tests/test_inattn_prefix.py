"""InAttention over a causal prefix (GPTConfig.inattn_prefix = m): m = 0 is the InAttention of
before, bit for bit; for every m, causality, cached = uncached, chunked = whole, state formula."""
from pathlib import Path

import pytest
import torch

from conftest import assert_cached_equals_uncached, tiny_gpt, train_then_resume, varied_gpt
from model import CausalSelfAttention, InAttention

REFERENCE = Path(__file__).parent / 'reference' / 'inattention_logits.pt'


def test_inattention_is_bit_identical_to_the_stored_reference():
    """tests/reference/inattention_logits.pt was written by the InAttention code before the prefix
    existed (tiny_gpt, seed 0): the same parameters and the same logits, to the bit."""
    ref = torch.load(REFERENCE)
    model = tiny_gpt(attention='inattention')
    logits, _ = model(ref['idx'], ref['idx'])
    assert sum(p.numel() for p in model.parameters()) == ref['n_params']
    assert torch.equal(logits, ref['logits'])


PREFIXES = [0, 1, 2]


def prefixed(m, **kw):
    return tiny_gpt(attention='inattention', n_layer=3, inattn_prefix=m, **kw)


@pytest.mark.parametrize('m', PREFIXES)
def test_the_first_m_blocks_are_causal_and_the_rest_read_s(m):
    model = prefixed(m)
    kinds = [type(block.attn) for block in model.transformer.h]
    assert kinds == [CausalSelfAttention] * m + [InAttention] * (3 - m)
    # the same parameters for every m: the prefix blocks have GPT-2's names and shapes
    assert model.get_num_params() == prefixed(0).get_num_params()


@pytest.mark.parametrize('m', PREFIXES)
def test_causality(m):
    """Changing token t changes no logit before t."""
    model = prefixed(m)
    idx = torch.randint(0, 37, (1, 20), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx, idx)
    changed = idx.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 37
    logits2, _ = model(changed, changed)
    torch.testing.assert_close(logits2[0, :12], logits[0, :12], atol=0, rtol=0)
    assert not torch.allclose(logits2[0, 12:], logits[0, 12:])


@pytest.mark.parametrize('m', PREFIXES)
@pytest.mark.parametrize('layout', ['s', 'kv'])
@pytest.mark.parametrize('prompt_len,chunk', [(3, 8), (10, 4)])
def test_cached_decoding_equals_uncached_also_past_block_size(m, layout, prompt_len, chunk):
    # block_size 32: 40 new tokens slide the window; prompts shorter and longer than a chunk
    model = varied_gpt(attention='inattention', n_layer=3, inattn_prefix=m, inattn_cache=layout)
    idx = torch.randint(0, 37, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    assert_cached_equals_uncached(model, idx, 40, prefill_chunk=chunk)


@pytest.mark.parametrize('m', PREFIXES)
def test_chunked_prefill_equals_the_whole_prompt(m):
    model = prefixed(m)
    idx = torch.randint(0, 37, (2, 29), generator=torch.Generator().manual_seed(3))
    whole = model.prefill(idx, model.new_cache())
    for chunk in (1, 5, 8):
        torch.testing.assert_close(model.prefill(idx, model.new_cache(), chunk), whole,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize('m', PREFIXES)
@pytest.mark.parametrize('layout, per_token', [('s', lambda m, L: 2 * m + 1),
                                               ('kv', lambda m, L: 2 * L)])
def test_state_formula_equals_the_measured_cache(m, layout, per_token):
    """The s cache: (2m + 1)·d numbers per token (K and V of the m causal blocks, and s); the
    kv layout: 2·L·d, as GPT-2."""
    model = prefixed(m, inattn_cache=layout)
    d, L = model.config.n_embd, model.config.n_layer
    for T in (1, 7, 30):
        cache = model.new_cache()
        model.prefill(torch.zeros(1, T, dtype=torch.long), cache)
        formula = model.decode_state_bytes(T)
        assert formula == per_token(m, L) * d * T * 4 == cache.nbytes()


def test_a_prefix_needs_inattention_and_a_block_after_it():
    with pytest.raises(ValueError, match=r"inattn_prefix=1 needs an attention that reads"):
        tiny_gpt(attention='causal', inattn_prefix=1)
    with pytest.raises(ValueError, match=r"inattn_prefix=2 must be in 0\.\.n_layer-1 = 1"):
        tiny_gpt(attention='inattention', n_layer=2, inattn_prefix=2)


def test_extend_block_size_keeps_the_prefix_working():
    model = varied_gpt(attention='inattention', n_layer=3, inattn_prefix=1)
    model.extend_block_size(64)
    idx = torch.randint(0, 37, (1, 10), generator=torch.Generator().manual_seed(4))
    assert_cached_equals_uncached(model, idx, 60)  # 70 tokens: past the 64 rows too


def test_train_py_trains_and_resumes_a_prefixed_model(char_data, tmp_path):
    saved = train_then_resume(char_data, tmp_path, '--attention=inattention', '--n_layer=2',
                              '--inattn_prefix=1')
    assert saved['model_args']['inattn_prefix'] == 1
