"""The CUDA cases: every attention variant in bfloat16 on the GPU, where kernels
(flash/efficient SDPA, bf16 matmuls) differ from the CPU's. Skipped without CUDA;
GPU_CHECK_DEVICE=cpu runs the same code on the CPU (in bfloat16 too), which CI does so
that these tests cannot rot. `bash .ci/gpu` runs them on a GPU.

Tolerance: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9), so two computations
that are equal in exact arithmetic but round differently agree only to about 1e-2 of the
values' scale after two layers (0.5e-2 to 1.4e-2 measured in CPU bfloat16; a missing value
bias in the absorbed step gives 0.6). Logits are compared with |a - b| <= REL_TOL *
max|reference|; greedy tokens must be equal, except where the reference's two best logits
are within TIE_TOL * max|logit| of each other (a near tie that either rounding may break),
after which the continuations may differ. The Lightning block form runs in float32 (as the
model always runs it): compared with the quadratic form in float64 to FP32_TOL."""
import os
from dataclasses import fields

import pytest
import torch

from model import GPT, GPTConfig
from test_lightning import inputs, naive  # the quadratic reference, straight from the equations

DEVICE = os.environ.get('GPU_CHECK_DEVICE', 'cuda')
pytestmark = pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(),
                                reason='needs a CUDA GPU '
                                       '(GPU_CHECK_DEVICE=cpu runs these cases on the CPU)')
REL_TOL, TIE_TOL, FP32_TOL = 5e-2, 5e-2, 1e-4

# every variant and cache layout;
# InAttention's absorbed step in each form the model has (GPTConfig.inattn_decode)
HAS_DECODE_FORMS = 'inattn_decode' in {f.name for f in fields(GPTConfig)}
DECODE_FORMS = ('gemm', 'stream', 'auto') if HAS_DECODE_FORMS else ()
ABSORBED = [dict(attention='inattention', inattn_cache='s', inattn_decode=f)
            for f in DECODE_FORMS] or [dict(attention='inattention', inattn_cache='s')]
VARIANTS = [dict(attention='causal'), *ABSORBED, dict(attention='inattention', inattn_cache='kv'),
            dict(attention='lightning'), dict(attention='infini'),
            dict(attention='infini', infini_update='delta')]


def name(kw):
    return '-'.join(str(v) for v in kw.values())


def bf16_model(attention, **kw):
    """A 2-layer GPT in bfloat16 on DEVICE. Its matrices are scaled up (x10, as in
    test_infini.py) from GPT-2's init, so that logits are of order 1 and greedy decoding
    follows the context instead of repeating one token."""
    cfg = dict(block_size=64, vocab_size=61, n_layer=2, n_head=4, n_embd=64, attention=attention,
               pos_emb='learned' if attention in ('causal', 'inattention') else 'none',
               lightning_block=16, infini_segment=8)  # 48 tokens: 3 blocks of Lightning,
                                                      # 6 Infini segments
    cfg.update(kw)
    torch.manual_seed(0)
    m = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(10)
            elif '.attn.' in n:  # attention biases and Infini gates,
                                 # zero at init: random, so that they count
                p.normal_(0.0, 0.5)
    return m.to(DEVICE, torch.bfloat16).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def assert_close_bf16(got, ref):
    err, scale = (got.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    assert err <= REL_TOL * scale, \
        f"max |difference| {err:.4g} > {REL_TOL} x max |reference| {scale:.4g}"


def stepwise_logits(m, idx, prompt_len, chunk):
    """Logits of every position from prompt_len - 1 on:
    the prompt prefilled in chunks, then one token at a time."""
    cache = m.new_cache()
    out = [m.prefill(idx[:, :prompt_len], cache, chunk)]
    out += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, idx.size(1))]
    return torch.cat(out, dim=1)


def assert_same_greedy(m, cached, uncached, prompt_len):
    """Equal tokens, or a first difference where the
    uncached path's two best logits were a near tie."""
    for b in range(cached.size(0)):
        differ = (cached[b] != uncached[b]).nonzero()
        if len(differ):
            t = differ[0].item()
            logits = m(uncached[b:b + 1, :t])[0][0, -1].float()
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] <= TIE_TOL * logits.abs().max(), \
                f"row {b}: token {t} differs ({cached[b, t]} vs {uncached[b, t]}) " \
                f"without a near tie: top-2 {top2}"
    # the tokens follow the context: the test can fail
    assert uncached[:, prompt_len:].unique().numel() > 2


@pytest.mark.parametrize('kw', VARIANTS, ids=name)
@pytest.mark.parametrize('prompt_len,chunk', [(5, None), (13, 4)])
def test_cached_greedy_decoding_equals_uncached(kw, prompt_len, chunk):
    m = bf16_model(**kw)
    idx = tokens(2, prompt_len)
    with torch.no_grad():
        cached = m.generate(idx, 48 - prompt_len, temperature=0, use_cache=True,
                            prefill_chunk=chunk)
        uncached = m.generate(idx, 48 - prompt_len, temperature=0, use_cache=False)
        assert_same_greedy(m, cached, uncached, prompt_len)
        # the logits themselves, on one fixed text: cached steps against one full forward
        full, _ = m(uncached, uncached)
        assert_close_bf16(stepwise_logits(m, uncached, prompt_len, chunk), full[:, prompt_len - 1:])


@pytest.mark.parametrize('kw', ABSORBED, ids=name)
def test_inattention_absorbed_decoding_equals_kv_layout(kw):
    # the same weights (same seed), two decoding states:
    # s with Wk, Wv absorbed, or K and V per layer
    absorbed, kv = bf16_model(**kw), bf16_model('inattention', inattn_cache='kv')
    idx = tokens(3, 40, seed=2)
    with torch.no_grad():
        assert_close_bf16(stepwise_logits(absorbed, idx, 7, 3), stepwise_logits(kv, idx, 7, 3))
        a = absorbed.generate(idx[:, :7], 40, temperature=0)
        assert_same_greedy(kv, a, kv.generate(idx[:, :7], 40, temperature=0), 7)


@pytest.fixture
def no_tf32():
    """Full float32 matmuls: train.py turns TF32 (10-bit
    mantissa) on for the process when it runs in it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize('T', [5, 16, 37, 64])  # block 16: below, equal, neither, a multiple
def test_lightning_block_form_equals_naive_quadratic_form(T, no_tf32):
    # inside a bf16 model the recurrence runs in float32 whatever the dtype:
    # compare that with the float64 equations
    attn = bf16_model('lightning').transformer.h[0].attn
    q, k, v, kv0 = inputs(T, B=2, H=4, hd=16)
    o, kv = attn.blockwise(*(t.to(DEVICE) for t in (q, k, v, kv0)))
    o_ref, kv_ref = naive(q.double(), k.double(), v.double(), attn.decay_rate.cpu(), kv0.double())
    torch.testing.assert_close(o.cpu().double(), o_ref, atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(kv.cpu().double(), kv_ref, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize('update', ['linear', 'delta'])
def test_infini_across_segments_cached_equals_whole_sequence(update):
    # 45 tokens = 5 full segments of 8 and a partial one;
    # the prefill chunk of 5 leaves a partial segment cached
    m = bf16_model('infini', infini_update=update)
    idx = tokens(2, 45, seed=3)
    with torch.no_grad():
        full, _ = m(idx, idx)
        assert_close_bf16(stepwise_logits(m, idx, 6, 5), full[:, 5:])
        # every token through the cache, including the first
        one_by_one = stepwise_logits(m, idx, 1, None)
        assert_close_bf16(one_by_one, full)


def test_the_heads_probe_fits_on_the_features_device():
    """eval_long.probe builds its read-out where the features are: it once built it on the CPU,
    and `eval_long.py --mode=heads --device=cuda` stopped with a device mismatch."""
    import eval_long
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(10, (400,), generator=generator)
    held = torch.eye(10)[labels] + 0.01 * torch.randn(400, 10, generator=generator)
    train = torch.arange(400) < 200
    got = eval_long.probe(held.to(DEVICE), labels.to(DEVICE), train.to(DEVICE))
    assert got == 1.0
