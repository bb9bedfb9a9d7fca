"""Lightning attention: the block form against the equations (values, state, gradients), the
recurrent decode, prefill from a cached state, the fixed decays, and a whole GPT without
positions: cached == uncached decoding, causality, a decoding state that never grows."""
import pytest
import torch
from torch.nn import functional as F

from conftest import assert_cached_equals_uncached, tiny_gpt, varied_gpt


def tiny(**kw):
    return tiny_gpt(**{'attention': 'lightning', 'block_size': 16, 'lightning_block': 8, **kw})


def layer(**kw):
    """Layer 0 of a tiny lightning GPT with weights of std 0.3, so that its output is of order
    1 and a tolerance of 1e-5 means something (GPT-2's init makes c_proj's output tiny)."""
    attn = tiny(**kw).transformer.h[0].attn
    torch.manual_seed(1)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def naive(q, k, v, rate, kv0):
    """The quadratic form straight from the equations, with the T x T decay-masked matrix:
    o_t = Σ_{s≤t} λ^(t-s) (q_t·k_s) v_s + λ^(t+1) q_t KV0;
    final state = λ^T KV0 + Σ_s λ^(T-1-s) k_sᵀ v_s."""
    T = q.size(2)
    t = torch.arange(T, dtype=q.dtype)
    rate = rate.to(q.dtype).view(-1, 1, 1)
    causal = t[:, None] >= t[None, :]
    D = torch.where(causal, torch.exp(-rate * (t[:, None] - t[None, :])), 0.0)  # (H, T, T)
    o = ((q @ k.transpose(-2, -1)) * D) @ v + (q * torch.exp(-rate * (t[:, None] + 1))) @ kv0
    k_decayed = k * torch.exp(-rate * (T - 1 - t[:, None]))
    kv = torch.exp(-rate * T) * kv0 + k_decayed.transpose(-2, -1) @ v
    return o, kv


def inputs(T, dtype=torch.float32, B=2, H=4, hd=8):
    """q, k as the layer makes them (silu), v, and a random earlier state, all of order 1 in
    the output."""
    g = torch.Generator().manual_seed(T)
    q, k = (F.silu(torch.randn(B, H, T, hd, generator=g, dtype=dtype)) * 0.5 for _ in range(2))
    v = torch.randn(B, H, T, hd, generator=g, dtype=dtype)
    kv0 = torch.randn(B, H, hd, hd, generator=g, dtype=dtype) * 0.2
    return q, k, v, kv0


# block size 8: below, equal, above, a multiple, neither
@pytest.mark.parametrize('T', [5, 8, 13, 24, 29])
def test_block_form_equals_naive_quadratic_form(T):
    attn = layer()
    q, k, v, kv0 = inputs(T)
    for start in (None, kv0):  # from nothing (training) and from a cached state (prefill)
        o, kv = attn.blockwise(q, k, v, start)
        kv_start = torch.zeros_like(kv0) if start is None else kv0
        o_ref, kv_ref = naive(q, k, v, attn.decay_rate, kv_start)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(kv, kv_ref, atol=1e-5, rtol=0)


def test_block_form_gradients_equal_naive_gradients():
    attn = layer()
    q, k, v, kv0 = (t.requires_grad_() for t in inputs(13, torch.float64))
    w_o = torch.randn(2, 4, 13, 8, dtype=torch.float64)
    w_kv = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grads = []
    for f in (attn.blockwise, lambda q, k, v, kv0: naive(q, k, v, attn.decay_rate, kv0)):
        o, kv = f(q, k, v, kv0)
        grads.append(torch.autograd.grad((o * w_o).sum() + (kv * w_kv).sum(), (q, k, v, kv0)))
    for g_block, g_naive in zip(*grads):
        torch.testing.assert_close(g_block, g_naive, atol=1e-10, rtol=1e-10)
    # 5 tokens in blocks of 2: the last one partial
    tiny_attn = layer(n_head=2, n_embd=8, lightning_block=2)
    small = [t[:1, :2, :5, :4].detach().clone().requires_grad_() for t in (q, k, v)] + \
            [kv0[:1, :2, :4, :4].detach().clone().requires_grad_()]
    assert torch.autograd.gradcheck(tiny_attn.blockwise, small)


@pytest.mark.parametrize('T', [5, 8, 29])
def test_recurrent_and_chunked_prefill_equal_block_form(T):
    attn = layer()
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(2))
    y = attn(x, None)
    assert y.abs().mean() > 0.1  # order 1: the tolerance below is meaningful
    cache = {}
    # one token at a time
    y_rec = torch.cat([attn(x[:, t:t + 1], None, cache) for t in range(T)], dim=1)
    torch.testing.assert_close(y_rec, y, atol=1e-5, rtol=0)
    q, k, v = attn.c_attn(x).double().split(32, dim=2)
    q, k, v = attn.split_heads(F.silu(q)), attn.split_heads(F.silu(k)), attn.split_heads(v)
    _, kv_ref = naive(q, k, v, attn.decay_rate, torch.zeros(2, 4, 8, 8, dtype=torch.float64))
    # a sum of many terms: ~30
    torch.testing.assert_close(cache['kv'].double(), kv_ref, atol=1e-5, rtol=1e-5)
    cache = {}
    cuts = [0, 3, 4, 15, T] if T > 15 else [0, 3, 4, T]  # chunks of 3, 1, 11, the rest
    y_pre = torch.cat([attn(x[:, a:b], None, cache) for a, b in zip(cuts, cuts[1:])], dim=1)
    torch.testing.assert_close(y_pre, y, atol=1e-5, rtol=0)


def test_decays_are_the_released_tnl_values():
    # H = 4, L = 3: slopes 2^-2, 2^-4, 2^-6, 2^-8, times 1 - l/2 + 1e-5
    expected = [[0.7787988360718809, 0.939412475680495, 0.9844962831778521, 0.9961013305599085],
                [0.8824946963450968, 0.9692326287057619, 0.9922177832262028, 0.9980487421211958],
                [0.999997500003125, 0.9999993750001953, 0.9999998437500122, 0.9999999609375008]]
    m = tiny(n_layer=3)
    lam = lambda attn: torch.exp(-attn.decay_rate.double()).tolist()  # noqa: E731
    for block, row in zip(m.transformer.h, expected):
        assert lam(block.attn) == pytest.approx(row, abs=1e-7)
    # L = 1: no division by L - 1; the first layer's decays
    one = tiny(n_layer=1, n_head=2, n_embd=16)
    assert lam(one.transformer.h[0].attn) == pytest.approx([0.939412475680495, 0.9961013305599085],
                                                           abs=1e-7)


@pytest.mark.parametrize('prompt_len,chunk', [(3, None), (3, 8), (11, 4), (20, None), (20, 8)])
def test_cached_generation_equals_uncached(prompt_len, chunk):
    # prompts shorter and longer than a chunk and than a block of 8 (the prefill's block form
    # crosses blocks); 30 recurrent steps run past block_size=16, which has no position table
    m = varied_gpt(attention='lightning', block_size=16, lightning_block=8)
    idx = torch.randint(0, 37, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    assert_cached_equals_uncached(m, idx, 30, prefill_chunk=chunk)


def test_causality():
    # changing token j never changes the logits before j (exactly: the mask multiplies by 0),
    # and does change j
    m = tiny()
    idx = torch.randint(0, 37, (1, 21))
    base, _ = m(idx, idx)
    for j in (0, 5, 8, 13, 20):
        changed = idx.clone()
        changed[0, j] = (changed[0, j] + 1) % 37
        out, _ = m(changed, changed)
        assert torch.equal(out[:, :j], base[:, :j])
        assert not torch.allclose(out[:, j], base[:, j])


def test_decoding_state_never_grows():
    m = tiny()
    cache = m.new_cache()
    m.prefill(torch.randint(0, 37, (1, 10)), cache)
    after_10 = cache.nbytes()
    for _ in range(60):  # far past block_size=16
        m(torch.randint(0, 37, (1, 1)), cache=cache)
    assert cache.pos == 70
    assert (cache.nbytes() == after_10 == m.decode_state_bytes(10) == m.decode_state_bytes(70)
            == 2 * 4 * 8 * 8 * 4)


def test_state_stays_fp32_under_autocast():
    m = tiny()
    cache = m.new_cache()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        m.prefill(torch.randint(0, 37, (1, 10)), cache)
        logits, _ = m(torch.randint(0, 37, (1, 1)), cache=cache)
    assert all(t.dtype == torch.float32 for t in cache.tensors())
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('T', [5, 16, 29])
def test_quadratic_form_equals_block_form(T):
    """sdpa=False trains with the T x T matrix (the readable form): same logits and gradients."""
    idx = torch.randint(0, 37, (2, T), generator=torch.Generator().manual_seed(T))
    grads = []
    for sdpa in (True, False):
        model = tiny(sdpa=sdpa, block_size=32).train()
        logits, loss = model(idx, idx)
        loss.backward()
        grads.append((logits, [p.grad for p in model.parameters() if p.grad is not None]))
    (logits_a, ga), (logits_b, gb) = grads
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
