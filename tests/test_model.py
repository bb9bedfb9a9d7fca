"""Behaviour of model.py shared by every attention variant, and the core claims of InAttention."""
from pathlib import Path

import pytest
import torch

import model as model_module
from conftest import assert_cached_equals_uncached, varied_gpt
from model import ATTENTIONS, GPT, GPTConfig, InAttention

REPO = Path(__file__).resolve().parents[1]


def tiny(attention='causal', **kw):
    args = dict(block_size=32, vocab_size=37, n_layer=2, n_head=4, n_embd=32, attention=attention)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args)).eval()


# every registered variant, plus the second cache layout of InAttention and its two decode forms
VARIANTS = [dict(attention=a) for a in ATTENTIONS] + [
    dict(attention='inattention', inattn_cache='kv'),
    dict(attention='inattention', inattn_decode='gemm'),
    dict(attention='inattention', inattn_decode='stream'),
]
IDS = ['-'.join(map(str, v.values())) for v in VARIANTS]


@pytest.fixture(autouse=True)
def small_stream_blocks(monkeypatch):
    # blocks of 4 tokens: the one-pass decode runs over several blocks even in these short texts
    monkeypatch.setattr(InAttention, 'stream_block', 4)


@pytest.mark.parametrize('kw', VARIANTS, ids=IDS)
@pytest.mark.parametrize('prompt_len,chunk', [(3, 8), (20, 8), (29, 32)])
def test_cached_generation_equals_uncached(kw, prompt_len, chunk):
    # prompts shorter and longer than a prefill chunk; 20 + 40 and 29 + 40 tokens run past
    # block_size=32: the window slides (once or twice), and both paths agree logit by logit
    m = varied_gpt(**kw)
    idx = torch.randint(0, 37, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    assert_cached_equals_uncached(m, idx, 40, prefill_chunk=chunk)


@pytest.mark.parametrize('kw', VARIANTS, ids=IDS)
def test_incremental_forward_matches_full_forward(kw):
    # stepwise decoding reproduces the full-sequence logits at every position (fp32, 1e-5)
    m = tiny(**kw)
    idx = torch.randint(0, 37, (1, 24))
    full, _ = m(idx, idx)
    cache = m.new_cache()
    m.prefill(idx[:, :5], cache, chunk=2)
    steps = [m(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize('kw', VARIANTS, ids=IDS)
@pytest.mark.parametrize('chunk', [1, 3, 7, 32])
def test_chunked_prefill_equals_full_forward(kw, chunk):
    m = tiny(**kw)
    idx = torch.randint(0, 37, (2, 25))
    full, _ = m(idx, idx)
    cache = m.new_cache()
    last = m.prefill(idx, cache, chunk)
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=0)
    assert cache.pos == 25


def test_absorbed_decode_equals_standard_attention():
    # InAttention's decode step never builds K or V: it must agree with the layer's standard path,
    # biases included (varied_gpt's are random: GPT-2's zeros would hide a dropped value bias)
    m = varied_gpt(attention='inattention')
    attn = m.transformer.h[1].attn
    x, s = torch.randn(3, 1, 32), torch.randn(3, 17, 32)
    absorbed = attn(x, s)  # one query against 17 cached initial states: the absorbed path
    C = 32
    Wq, Wk, Wv = attn.c_attn.weight.split(C)
    bq, bk, bv = attn.c_attn.bias.split(C)
    q = attn.split_heads(x @ Wq.T + bq)
    k, v = attn.split_heads(s @ Wk.T + bk), attn.split_heads(s @ Wv.T + bv)
    # the last query sees all 17
    y = torch.softmax(q @ k.transpose(-2, -1) / (C // 4) ** 0.5, dim=-1) @ v
    standard = attn.c_proj(y.transpose(1, 2).reshape(3, 1, C))
    torch.testing.assert_close(absorbed, standard, atol=1e-5, rtol=0)
    assert bv.abs().min() > 0  # the value bias the absorbed step adds once


@pytest.mark.parametrize('attention', ['causal', 'inattention'])
def test_keys_and_values_depend_on_initial_states_only(attention, monkeypatch):
    # InAttention's defining property: perturbing the residual stream between blocks changes the
    # queries of later layers but not one key or value of any layer. Causal attention is the
    # control: its keys move.
    m = tiny(attention)
    idx = torch.randint(0, 37, (2, 12))
    seen = []
    real_attend = model_module.attend
    monkeypatch.setattr(model_module, 'attend',
                        lambda q, k, v, *a: seen.append((q, k, v)) or real_attend(q, k, v, *a))
    m(idx, idx)
    clean, seen[:] = list(seen), []
    m.transformer.h[0].register_forward_hook(lambda mod, inp, out: out + torch.randn_like(out))
    m(idx, idx)
    (q0, k0, v0), (q1, k1, v1) = clean[1], seen[1]  # layer 1 reads the perturbed stream
    assert not torch.allclose(q0, q1)
    if attention == 'inattention':
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(clean, seen))
    else:
        assert not torch.allclose(k0, k1)


@pytest.mark.parametrize('kw', VARIANTS, ids=IDS)
def test_causality(kw):
    # changing token j never changes the logits at positions before j
    m = tiny(**kw)
    idx = torch.randint(0, 37, (1, 30))
    base, _ = m(idx, idx)
    for j in (0, 7, 15, 29):
        changed = idx.clone()
        changed[0, j] = (changed[0, j] + 1) % 37
        out, _ = m(changed, changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, j:], base[:, j:])


@pytest.mark.parametrize('attention', ['causal', 'inattention'])
def test_materialised_attention_matches_sdpa(attention):
    idx = torch.randint(0, 37, (2, 20))
    a, _ = tiny(attention)(idx, idx)
    b, _ = tiny(attention, sdpa=False)(idx, idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize('kw', VARIANTS, ids=IDS)
def test_decode_state_measured_equals_formula(kw):
    m = tiny(**kw)
    cache = m.new_cache()
    m.prefill(torch.randint(0, 37, (1, 21)), cache, chunk=8)
    assert cache.nbytes() == m.decode_state_bytes(21) > 0


@pytest.mark.parametrize('kw', VARIANTS, ids=IDS)
@pytest.mark.parametrize('capacity', [None, 4, 64])
def test_growing_past_capacity_keeps_the_tokens(kw, capacity):
    # a cache with room for 4 tokens (or none given) doubles its rooms while 21 tokens come in; with
    # room for 64 it never reallocates. Either way: the full forward's logits, the formula's bytes.
    m = tiny(**kw, block_size=64)
    idx = torch.randint(0, 37, (2, 21))
    full, _ = m(idx, idx)
    cache = m.new_cache(capacity)
    with torch.no_grad():
        m.prefill(idx[:, :3], cache, chunk=2)
        rooms = [r for state in cache.states() for r in state.get('room', {}).values()]
        steps = [m(idx[:, t:t + 1], cache=cache)[0] for t in range(3, 21)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 3:], atol=1e-5, rtol=0)
    assert cache.nbytes() == m.decode_state_bytes(21, batch_size=2) <= cache.allocated_nbytes()
    if capacity == 64:  # room for everything from the start: no room was ever replaced
        now = [r for state in cache.states() for r in state.get('room', {}).values()]
        assert len(now) == len(rooms) and all(a is b for a, b in zip(now, rooms))


@pytest.mark.parametrize('prompt_len,new', [(5, 30), (29, 40)])
def test_generation_sizes_the_cache_once(prompt_len, new, monkeypatch):
    # generate_tokens knows how many tokens each cache will hold: its first rooms fit them all, so
    # none is ever doubled (29 + 40 tokens slide the window of block_size=32: new caches)
    m = tiny('causal', block_size=32)
    caches = []
    real = GPT.new_cache
    monkeypatch.setattr(GPT, 'new_cache', lambda self, capacity=None:
                        caches.append(real(self, capacity)) or caches[-1])
    m.generate(torch.zeros(1, prompt_len, dtype=torch.long), new, temperature=0)
    assert caches[0].pos == min(prompt_len + new - 1, 32)
    for cache in caches:
        for layer in cache.layers:
            assert [room.size(2) for room in layer['room'].values()] == [layer['capacity']] * 2
            assert layer['k'].size(2) == cache.pos <= layer['capacity']


@pytest.mark.parametrize('dtype,atol', [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
def test_stream_decode_equals_two_pass_gemm(dtype, atol):
    # the one-pass online softmax over blocks of s gives the two-pass softmax(q sᵀ) s. fp32: to
    # rounding (and the float64 value to 1e-5). bf16: both round the scores (~20 here) to 8 bits, so
    # both are ~0.1 from the exact value, but they agree to two bf16 steps of |z| < 4 (2^-6 each)
    g = torch.Generator().manual_seed(0)
    q = (2 * torch.randn(3, 4, 32, generator=g)).to(dtype)  # large scores: the running max moves
    s = torch.randn(3, 50, 32, generator=g).to(dtype)  # 50 = 12 blocks of 4 and a block of 2
    two_pass = InAttention.weighted_s_gemm(q, s)
    one_pass = InAttention.weighted_s_stream(q, s, 4)
    assert one_pass.dtype == two_pass.dtype == dtype
    torch.testing.assert_close(one_pass.float(), two_pass.float(), atol=atol, rtol=0)
    if dtype == torch.float32:
        exact = InAttention.weighted_s_gemm(q.double(), s.double())
        torch.testing.assert_close(one_pass.double(), exact, atol=atol, rtol=0)


def test_auto_decode_form():
    # 'auto' streams s in one pass on a CPU from stream_from tokens on; two GEMMs below, and on GPUs
    form = InAttention.decode_form
    n = InAttention.stream_from
    assert [form('auto', n - 1, 'cpu'), form('auto', n, 'cpu'), form('auto', n, 'cuda')] == \
        ['gemm', 'stream', 'gemm']
    assert form('gemm', n, 'cpu') == 'gemm' and form('stream', 1, 'cuda') == 'stream'


def test_inattention_state_is_one_over_2L_of_kv_cache():
    causal, inattn = tiny('causal', n_layer=12), tiny('inattention', n_layer=12)
    assert causal.decode_state_bytes(1000) == 24 * inattn.decode_state_bytes(1000)


def test_forward_past_position_table_is_an_error():
    m = tiny()
    with pytest.raises(ValueError, match='block_size=32'):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_no_position_embedding_runs_past_block_size():
    m = varied_gpt(attention='inattention', pos_emb='none')
    assert m.transformer.wpe is None
    assert_cached_equals_uncached(m, torch.zeros(1, 1, dtype=torch.long), 50)  # no window slide


def test_crop_block_size_keeps_first_rows():
    m = tiny()
    wpe = m.transformer.wpe.weight.detach().clone()
    m.crop_block_size(16)
    assert m.config.block_size == 16 and torch.equal(m.transformer.wpe.weight, wpe[:16])
    m(torch.zeros(1, 16, dtype=torch.long))


def test_extend_block_size_interpolate_and_copy():
    m = tiny(block_size=4)
    old = m.transformer.wpe.weight.detach().clone()
    m.extend_block_size(8, 'interpolate')  # new row i = old row i * 3/7: end points aligned
    new = m.transformer.wpe.weight.detach()
    assert new.shape == (8, 32)
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[7], old[3])
    torch.testing.assert_close(new[3], old[1] * (1 - 2 / 7) + old[2] * 2 / 7)  # 3 * 3/7 = 1 + 2/7
    assert len({tuple(row.tolist()) for row in new}) == 8  # no two positions alike
    m(torch.zeros(1, 8, dtype=torch.long))  # the model runs at the new length

    m = tiny(block_size=4)
    old = m.transformer.wpe.weight.detach().clone()
    m.extend_block_size(10, 'copy')
    assert torch.equal(m.transformer.wpe.weight.detach(), old[torch.arange(10) % 4])
    with pytest.raises(ValueError, match='unknown extension method'):
        m.extend_block_size(20, 'stretch')


def test_config_errors():
    with pytest.raises(ValueError, match='valid: causal, inattention'):
        GPT(GPTConfig(attention='flash'))
    with pytest.raises(ValueError, match='not divisible'):
        GPT(GPTConfig(n_embd=30, n_head=4))
    with pytest.raises(ValueError, match='pos_emb'):
        GPT(GPTConfig(pos_emb='rotary'))
    with pytest.raises(ValueError, match="inattn_decode 'flash'; valid: auto, gemm, stream"):
        GPT(GPTConfig(attention='inattention', inattn_decode='flash'))


def test_optimizer_groups_cover_every_parameter_once():
    m = tiny()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    decay = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert id(m.lm_head.weight) in decay and id(m.transformer.ln_f.weight) not in decay


@pytest.mark.parametrize('attention', ['causal', 'inattention'])
def test_from_pretrained_matches_transformers(attention, tmp_path):
    transformers = pytest.importorskip('transformers')
    hf_config = transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                        vocab_size=37)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path)
    m = GPT.from_pretrained(str(tmp_path), override_args=dict(attention=attention)).eval()
    idx = torch.randint(0, 37, (2, 20))
    ours, _ = m(idx, idx)
    if attention == 'causal':
        torch.testing.assert_close(ours, hf(idx).logits, atol=1e-5, rtol=0)
    else:  # same weights, different attention inputs: loads every tensor, computes something else
        torch.testing.assert_close(m.lm_head.weight, hf.lm_head.weight)
        assert not torch.allclose(ours, hf(idx).logits, atol=1e-3)


@pytest.mark.parametrize('attention', list(ATTENTIONS))
def test_attention_flag_alone_gives_the_class_positions(attention):
    """pos_emb='auto' asks the attention class; an explicit value still overrides it."""
    cls = ATTENTIONS[attention]
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=8,
                          attention=attention))
    assert model.config.pos_emb == cls.pos_emb
    assert (model.transformer.wpe is None) == (cls.pos_emb == 'none')
    assert (model.transformer.ln_in is None) == (not cls.reads_s)
    forced = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=8,
                           attention=attention, pos_emb='learned'))
    assert forced.transformer.wpe is not None


def test_gpt_never_asks_for_a_variant_by_name():
    """GPT asks the attention class what it needs; only the registry names the variants."""
    source = (REPO / 'model.py').read_text()
    assert "== 'inattention'" not in source and "== 'lightning'" not in source
