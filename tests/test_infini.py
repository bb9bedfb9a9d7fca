"""Infini-attention: the segment loop against the equations, cached decoding,
causality, the memory's reach, bounded decoding state, the gate's optimizer group."""
import math

import pytest
import torch
from torch.nn import functional as F

from conftest import assert_cached_equals_uncached, tiny_gpt, varied_gpt


def tiny(**kw):
    return tiny_gpt(**{'attention': 'infini', 'infini_segment': 4, **kw})


def layer(**kw):
    """One InfiniAttention layer of a tiny GPT,
    gates set away from 0.5 so that both paths are visible."""
    attn = tiny(**kw).transformer.h[0].attn
    with torch.no_grad():
        attn.beta.copy_(torch.randn(attn.n_head))
    return attn


def reference(attn, x):
    """Token by token, straight from docs/attention.md section 4 (fp32): A_dot = causal
    softmax inside the segment with RoPE written as complex rotation at in-segment
    positions, A_mem from the memory of earlier segments on un-rotated q, k, then the
    gate; the memory is updated once a segment is over."""
    B, T, C = x.shape
    H, N, eps = attn.n_head, attn.segment, attn.eps
    hd = C // H
    q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(C, dim=-1)
    q, k, v = (t.reshape(B, T, H, hd) for t in (q, k, v))  # head h = channels h·hd .. (h+1)·hd - 1
    theta = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)

    # pair (u_i, u_{i + hd/2}) is the complex number u_i + i·u_{i+hd/2}, turned by pos·θ_i
    def rot(u, pos):
        c = torch.complex(u[:hd // 2], u[hd // 2:]) * torch.exp(1j * pos * theta)
        return torch.cat([c.real, c.imag])

    sigma = lambda u: F.elu(u) + 1  # noqa: E731
    out = torch.zeros(B, T, H, hd)
    for b in range(B):
        for h in range(H):
            M, z = torch.zeros(hd, hd), torch.zeros(hd)
            g = torch.sigmoid(attn.beta[h])
            for s0 in range(0, T, N):
                seg = range(s0, min(s0 + N, T))
                for t in seg:
                    scores = torch.stack([rot(q[b, t, h], t - s0) @ rot(k[b, j, h], j - s0)
                                          / math.sqrt(hd) for j in range(s0, t + 1)])
                    a_dot = torch.softmax(scores, 0) @ v[b, s0:t + 1, h]
                    sq = sigma(q[b, t, h])
                    a_mem = (sq @ M) / (sq @ z + eps)
                    out[b, t, h] = g * a_mem + (1 - g) * a_dot if attn.memory else a_dot
                sk, vs = sigma(k[b, s0:s0 + N, h]), v[b, s0:s0 + N, h]  # (n, hd) each
                if attn.update == 'delta':
                    vs = vs - (sk @ M) / (sk @ z + eps)[:, None]
                M, z = M + sk.T @ vs, z + sk.sum(0)
    return out.reshape(B, T, C) @ attn.c_proj.weight.T + attn.c_proj.bias


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_segment_loop_matches_token_by_token_reference(update):
    attn = layer(infini_update=update)
    # 11 = 4 + 4 + 3: partial last segment
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(attn, x)
        torch.testing.assert_close(attn(x, None), ref, atol=1e-5, rtol=0)
        # the cached path, fed in pieces that straddle segment boundaries, continues the same loop
        cache = {}
        bounds = [(0, 3), (3, 4), (4, 9), (9, 10), (10, 11)]
        pieces = [attn(x[:, a:b], None, cache) for a, b in bounds]
        torch.testing.assert_close(torch.cat(pieces, 1), ref, atol=1e-5, rtol=0)
        # the memory is really exercised: the update rule changes the last segment's output
        attn.update = 'linear' if update == 'delta' else 'delta'
        assert (reference(attn, x)[:, 8:] - ref[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize('update', ['linear', 'delta'])
@pytest.mark.parametrize('prompt_len,chunk', [(3, None), (10, None), (10, 3)])
def test_cached_generation_equals_uncached(update, prompt_len, chunk):
    # prompts shorter and longer than N = 4; 20 new tokens cross several segment boundaries;
    # chunk 3 leaves a partial segment in the cache that the next chunk must first fill
    m = varied_gpt(attention='infini', infini_segment=4, infini_update=update)
    idx = torch.randint(0, 37, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    assert_cached_equals_uncached(m, idx, 30, prefill_chunk=chunk)


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_stepwise_logits_equal_full_forward(update):
    m = tiny(infini_update=update)
    idx = torch.randint(0, 37, (2, 23), generator=torch.Generator().manual_seed(2))
    full, _ = m(idx, idx)
    cache = m.new_cache()
    m.prefill(idx[:, :6], cache, chunk=5)  # leaves 2 tokens of an unfinished segment in the cache
    steps = [m(idx[:, t:t + 1], cache=cache)[0] for t in range(6, 23)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], atol=1e-5, rtol=0)


def test_causality_across_segments():
    # changing token j (of sequence 0 only) never changes
    # a logit before j, nor anything of sequence 1
    m = tiny()
    # 5 segments of N = 4
    idx = torch.randint(0, 37, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base, _ = m(idx, idx)
        for j in [0, 3, 4, 9, 18]:
            idx2 = idx.clone()
            idx2[0, j] = (idx[0, j] + 1) % 37
            logits, _ = m(idx2, idx2)
            torch.testing.assert_close(logits[0, :j], base[0, :j], atol=1e-6, rtol=0)
            torch.testing.assert_close(logits[1], base[1], atol=1e-6, rtol=0)
            # every later position moves
            assert (logits[0, j:] - base[0, j:]).abs().amax(-1).min() > 1e-5


def test_heads_are_split_without_leaking_time():
    # the known bug: (B, T, C).view(B, H, T, hd) mixes tokens. Head h of token t must be
    # channels h·hd.. of t, and the layer's output at t must not move when any later input moves
    attn = layer(infini_segment=3)
    B, T, C, H = 2, 7, 32, attn.n_head
    t = torch.arange(B * T * C, dtype=torch.float32).view(B, T, C)
    heads = attn.split_heads(t)
    for h in range(H):
        assert torch.equal(heads[:, h], t[:, :, h * C // H:(h + 1) * C // H])
    x = torch.randn(B, T, C)
    with torch.no_grad():
        y = attn(x, None)
        for j in range(T):
            x2 = x.clone()
            x2[:, j] += 1.0
            torch.testing.assert_close(attn(x2, None)[:, :j], y[:, :j], atol=1e-6, rtol=0)


def test_memory_never_reads_its_own_segment():
    # local attention knocked out: sigmoid(100) == 1 in fp32, so A = A_mem exactly
    attn = layer(infini_segment=4)
    with torch.no_grad():
        attn.beta.fill_(100.0)
        x = torch.randn(2, 12, 32)
        y = attn(x, None)
        empty_memory = attn.c_proj.bias.expand(2, 4, 32)
        torch.testing.assert_close(y[:, :4], empty_memory, atol=0, rtol=0)
        for j in [1, 5, 10]:
            x2 = x.clone()
            x2[:, j] += 1.0
            y2 = attn(x2, None)
            s0 = j // 4 * 4
            # token j's own query still reads the (old) memory
            others = [i for i in range(s0 + 4) if i != j]
            # its segment: untouched
            torch.testing.assert_close(y2[:, others], y[:, others], atol=0, rtol=0)
            if s0 + 4 < 12:
                # next segments read it
                assert (y2[:, s0 + 4:] - y[:, s0 + 4:]).abs().amax(-1).min() > 1e-5


def test_memory_only_model_sees_own_segment_only_through_the_residual():
    # whole GPT with every gate fully on the memory:
    # token j changes only its own logits within its segment
    m = tiny()
    for block in m.transformer.h:
        block.attn.beta.data.fill_(100.0)
    idx = torch.randint(0, 37, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base, _ = m(idx, idx)
        idx2 = idx.clone()
        idx2[0, 5] = (idx[0, 5] + 1) % 37
        logits, _ = m(idx2, idx2)
    same = [0, 1, 2, 3, 4, 6, 7]
    torch.testing.assert_close(logits[0, same], base[0, same], atol=0, rtol=0)
    assert (logits[0, 8:] - base[0, 8:]).abs().amax(-1).min() > 1e-5


def test_gradients_flow_through_the_memory_across_segments():
    attn = layer(infini_segment=4)
    x = torch.randn(1, 12, 32, requires_grad=True)
    # the last segment reaches segment 0 only through two memory updates
    attn(x, None)[:, 8:].sum().backward()
    assert x.grad[:, :4].abs().sum() > 0


def test_memory_knockout():
    # infini_memory=False: A = A_dot, the output changes
    # and segments no longer see each other at all
    on, off = tiny(), tiny(infini_memory=False)
    off.load_state_dict(on.state_dict())
    idx = torch.randint(0, 37, (1, 12), generator=torch.Generator().manual_seed(5))
    idx2 = idx.clone()
    idx2[0, 1] = (idx[0, 1] + 1) % 37
    with torch.no_grad():
        runs = [(on, idx), (off, idx), (on, idx2), (off, idx2)]
        a_on, a_off, b_on, b_off = (m(i, i)[0] for m, i in runs)
    assert (a_on - a_off).abs().max() > 1e-3
    torch.testing.assert_close(b_off[0, 4:], a_off[0, 4:], atol=0, rtol=0)
    assert (b_on[0, 4:] - a_on[0, 4:]).abs().max() > 1e-5


def test_decoding_state_is_bounded_and_matches_formula():
    # a 1-layer model generates 10,000 tokens one at a time:
    # the state is M, z plus < N tokens of K/V
    N = 8
    m = tiny(n_layer=1, n_head=2, n_embd=8, vocab_size=11, infini_segment=N)
    cache = m.new_cache()
    tok = torch.tensor([[1, 2]])  # 2-token prompt
    sizes = {}
    with torch.no_grad():
        logits = m.prefill(tok, cache)
        for _ in range(10_000):
            logits, _ = m(logits.argmax(-1), cache=cache)
            assert cache.nbytes() == m.decode_state_bytes(cache.pos)
            assert cache.layers[0].get('k', torch.zeros(1, 2, 0, 4)).size(2) == cache.pos % N
            sizes[cache.pos] = cache.nbytes()
    # 8 and 10,000 generated tokens, same phase
    assert 10 % N == 10_002 % N and sizes[10] == sizes[10_002]
    assert max(sizes.values()) == m.decode_state_bytes(N - 1)  # the bound: a segment short of full
    assert m.decode_state_bytes(10**9) <= m.decode_state_bytes(N - 1)


def test_state_keeps_memory_in_fp32():
    m = tiny().to(torch.bfloat16)
    cache = m.new_cache()
    with torch.no_grad():
        m.prefill(torch.randint(0, 37, (1, 6)), cache)
    layer0 = cache.layers[0]
    assert layer0['M'].dtype == layer0['z'].dtype == torch.float32
    assert layer0['k'].dtype == torch.bfloat16
    assert cache.nbytes() == m.decode_state_bytes(6, dtype=torch.bfloat16)


def test_gate_has_its_own_optimizer_group():
    m = tiny(infini_beta_lr=1e-2)
    betas = {id(b.attn.beta) for b in m.transformer.h}
    assert all(b.attn.beta.shape == (4,) and not b.attn.beta.any()
               for b in m.transformer.h)  # init 0
    assert {id(p) for n, p in m.named_parameters() if n.endswith('.beta')} == betas
    opt = m.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cpu')
    gate_groups = [g for g in opt.param_groups if any(id(p) in betas for p in g['params'])]
    assert len(gate_groups) == 1
    g = gate_groups[0]
    assert {id(p) for p in g['params']} == betas
    assert g['weight_decay'] == 0.0 and g['lr'] == pytest.approx(1e-2)
    assert g['lr_scale'] == pytest.approx(1e-2 / 6e-4)


def test_odd_head_size_is_rejected():
    with pytest.raises(ValueError, match='even head size'):
        tiny(n_head=4, n_embd=12)
