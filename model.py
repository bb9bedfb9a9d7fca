"""
One GPT, four attention mechanisms behind one flag (GPTConfig.attention); everything else is GPT-2.

  'causal'       GPT-2 causal self-attention, the baseline. Decoding keeps K and V of every layer.
  'inattention'  InAttention (Eisner 2024): every layer's keys and values come from the *initial
                 states* s = ln_in(wte + wpe), so decoding keeps only s: d numbers per token in all.
  'lightning'    Lightning attention (Qin et al. 2024): linear attention with a fixed decay per
                 head, trained in blocks; decoding keeps one hd x hd state per head at any length.
  'infini'       Infini-attention (Munkhdalai et al. 2024): softmax attention inside segments of N
                 tokens plus a compressive memory of the earlier segments.

Every attention class has the same interface, so an ablation changes exactly one thing:
  __init__(config, layer_idx)
  forward(x, s, cache) -> y      x (B, T, C): the block's ln_1 output; s (B, Tk, C): the initial
                                 states, or None when the class does not read them; cache: this
                                 layer's decoding state (a dict the class fills; grow() appends
                                 along time without copying what it holds), None in training.
                                 The queries are the last T of the Tk positions.
  state_bytes(config, T, dtype)  formula: bytes of one layer's decoding state after T tokens
  pos_emb                        what the GPT must add to the token embeddings: 'learned' or 'none'
  reads_s                        True if forward() needs the initial states s
  caches_s(config)               True if the decoder must keep s for this class (shared by layers)
Register a new class in ATTENTIONS, after the attention classes.

The equations and the choices the papers leave open: docs/attention.md (section numbers below).
Model layout, names and initialisation follow nanoGPT.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence trained on; bounds the learned position table
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in Linears and LayerNorms, like GPT-2
    attention: str = 'causal'  # a key of ATTENTIONS
    pos_emb: str = 'auto'    # 'auto': the attention class's choice; 'learned' (wpe) or 'none'
    sdpa: bool = True        # fused kernels; False = the readable quadratic form (T x T matrix)
    inattn_cache: str = 's'  # InAttention's decoding state: 's' (absorbed decode) or 'kv'
    inattn_decode: str = 'auto'  # absorbed decode: 'gemm' (two passes over s), 'stream' (one pass)
    inattn_prefix: int = 0   # InAttention: the first m blocks are causal, s is taken after them
    inattn_shift: int = 0    # InAttention: s also sees the previous k positions (token shift)
    grad_checkpoint: bool = False  # training: recompute each block in backward (less memory)
    lightning_block: int = 64     # Lightning: block length of the tiled training form
    infini_segment: int = 64      # Infini-attention: segment length N
    infini_update: str = 'linear'  # Infini-attention memory update: 'linear' or 'delta'
    infini_memory: bool = True    # False knocks the memory out (local attention only)
    infini_beta_lr: float = 1e-2  # learning rate of Infini-attention's gates β (no weight decay)


def check_config(config):
    """Reject impossible configurations with one line that says how to fix them."""
    if config.attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {config.attention!r}; valid: {', '.join(ATTENTIONS)}")
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    choices = dict(pos_emb=('auto', 'learned', 'none'), inattn_cache=('s', 'kv'),
                   inattn_decode=('auto', 'gemm', 'stream'), infini_update=('linear', 'delta'))
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise ValueError(f"unknown {name} {getattr(config, name)!r}; valid: {', '.join(valid)}")
    m = config.inattn_prefix
    if m and not ATTENTIONS[config.attention].reads_s:
        raise ValueError(f"inattn_prefix={m} needs an attention that reads initial states "
                         f"(inattention), not {config.attention!r}: drop it or use 0")
    k = config.inattn_shift
    if k and not ATTENTIONS[config.attention].reads_s:
        raise ValueError(f"inattn_shift={k} needs an attention that reads initial states "
                         f"(inattention), not {config.attention!r}: drop it or use 0")
    if k < 0:
        raise ValueError(f"inattn_shift={k} must be 0 (off) or the number of previous positions")
    if not 0 <= m < config.n_layer:
        raise ValueError(f"inattn_prefix={m} must be in 0..n_layer-1 = {config.n_layer - 1}: "
                         f"blocks 0..m-1 are causal and at least one reads the initial states")
    positive = ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'lightning_block',
                'infini_segment')
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def causal_mask(Tq, Tk, device):
    """(Tq, Tk) bool: query i, the (Tk - Tq + i)-th position, may see key j iff j <= Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


def attend(q, k, v, dropout_p=0.0, sdpa=True):
    """softmax(q kᵀ / sqrt(hd) + mask) v for q (B, H, Tq, hd) and k, v (B, H, Tk, hd).
    The queries are the *last* Tq of the Tk positions (the mask is aligned bottom-right), so the
    same call serves training (Tq = Tk), a chunk of a prefill, and a one-token decode (Tq = 1)."""
    Tq, Tk = q.size(-2), k.size(-2)
    if sdpa:  # SDPA's causal kernel for a square; one query sees everything; a mask for a chunk
        mask = None if Tq in (1, Tk) else causal_mask(Tq, Tk, q.device)
        is_causal = Tq == Tk > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal)
    att = F.dropout(attention_weights(q, k), p=dropout_p, training=dropout_p > 0)
    return att @ v


def attention_weights(q, k):
    """softmax(q kᵀ / sqrt(hd) + mask): (B, H, Tq, Tk), the queries the last Tq positions."""
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, Tq, Tk)
    if Tq > 1:
        att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
    return F.softmax(att, dim=-1)


def grow(state, name, t, dim=2, capacity=None):
    """Append t to state[name] along dim (time) and return all of it. state[name] holds exactly the
    tokens kept (what Cache.nbytes() counts): a view of the first tokens of a longer tensor,
    state['room'][name]. A new token is written in place; only a full room is copied, once, into
    one twice as long. (torch.cat copies everything held at every token, O(T) per token; doubling
    costs O(1) per token, amortised.) The first room has space for capacity tokens, by default
    state['capacity'] (see Cache), or for what the first write needs."""
    held = state[name].size(dim) if name in state else 0
    n = held + t.size(dim)
    rooms = state.setdefault('room', {})
    room = rooms.get(name)
    if room is None or room.size(dim) < n:  # no room yet, or full: a longer one
        size = max(n, capacity or state.get('capacity') or 0)
        if room is not None:
            size = max(size, 2 * room.size(dim))
        shape = list(t.shape)
        shape[dim] = size
        room = t.new_empty(shape)
        if held:
            room.narrow(dim, 0, held).copy_(state[name])
        rooms[name] = room
    room.narrow(dim, held, t.size(dim)).copy_(t)
    state[name] = room.narrow(dim, 0, n)
    return state[name]


# -------------------------------------------------------------------------------------------------
# Attention variants

class CausalSelfAttention(nn.Module):
    """GPT-2 (docs/attention.md section 1):
        q, k, v = x Wq, x Wk, x Wv;  y = softmax(q kᵀ / sqrt(hd) + causal mask) v
    Decoding state: K and V of every earlier token, per layer."""

    pos_emb = 'learned'  # attention is blind to order: the GPT adds a learned position table
    reads_s = False

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.sdpa = config.sdpa

    def split_heads(self, t):
        """(B, T, C) -> (B, H, T, hd)"""
        B, T, C = t.size()
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def merge_heads(self, y):
        """(B, H, T, hd) -> (B, T, C): the heads side by side again"""
        B, H, T, hd = y.size()
        return y.transpose(1, 2).contiguous().view(B, T, H * hd)

    def attn_dropout(self):
        return self.dropout if self.training else 0.0

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        q, k, v = map(self.split_heads, self.c_attn(x).split(C, dim=2))
        if cache is not None:  # decoding: the keys and values of all earlier tokens are kept
            k = grow(cache, 'k', k)
            v = grow(cache, 'v', v)
        y = attend(q, k, v, self.attn_dropout(), self.sdpa)
        return self.resid_dropout(self.c_proj(self.merge_heads(y)))

    @staticmethod
    def caches_s(config):
        return False

    @staticmethod
    def state_bytes(config, T, dtype):
        return 2 * T * config.n_embd * dtype.itemsize  # K and V


class InAttention(CausalSelfAttention):
    """InAttention (docs/attention.md section 2): queries from the stream, keys and values from the
    initial states s, the same s for every layer:
        q = x Wq,  k = s Wk,  v = s Wv,  y = softmax(q kᵀ / sqrt(hd) + causal mask) v
    The same parameters (and GPT-2 names) as causal attention: only the input of Wk and Wv changes.
    Decoding state: s alone (inattn_cache='s'), or K and V per layer like GPT-2 ('kv')."""

    reads_s = True

    stream_block = 1024  # tokens of s per block of the one-pass decode: few enough to stay in cache
    stream_from = 4096  # inattn_decode='auto' on a CPU: one pass from this many tokens of s on

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.cache_layout = config.inattn_cache
        self.decode = config.inattn_decode

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        Wq, Wk, Wv = self.c_attn.weight.split(C)  # each (C, C)
        bq, bk, bv = (None, None, None)
        if self.c_attn.bias is not None:
            bq, bk, bv = self.c_attn.bias.split(C)
        q = self.split_heads(F.linear(x, Wq, bq))
        if cache is not None and self.cache_layout == 'kv':  # s holds the new tokens only
            k = grow(cache, 'k', self.split_heads(F.linear(s, Wk, bk)))
            v = grow(cache, 'v', self.split_heads(F.linear(s, Wv, bv)))
            y = attend(q, k, v, 0.0, self.sdpa)
        elif T == 1:  # one-token decode from the cache of s: Wk and Wv absorbed, no K or V built
            y = self.absorbed(q, s, Wk, Wv, bv)
        else:  # training or a prefill chunk: K and V of every visible token, freed after the layer
            k = self.split_heads(F.linear(s, Wk, bk))
            v = self.split_heads(F.linear(s, Wv, bv))
            y = attend(q, k, v, self.attn_dropout(), self.sdpa)
        return self.resid_dropout(self.c_proj(self.merge_heads(y)))

    def absorbed(self, q, s, Wk, Wv, bv):
        """One query per head against all of s (B, Tk, C), without building K or V:
            q·k_j = (Wk_hᵀ q_h)·s_j          Σ_j p_j v_j = Wv_h (Σ_j p_j s_j) + bv_h
        The key bias adds the same q·bk to every score, which the softmax cancels; the value bias
        is added once because Σ_j p_j = 1. H times the attention FLOPs of a K/V cache, on the
        bytes of one layer's K and V (two passes over s) or K alone (one pass); the H absorbed
        queries q̃_h = Wk_hᵀ q_h / sqrt(hd) are the rows of one GEMM."""
        B, H, _, hd = q.size()  # (B, H, 1, hd)
        C = s.size(-1)
        q_tilde = torch.einsum('bhd,hdc->bhc', q[:, :, 0], Wk.view(H, hd, C)) / math.sqrt(hd)
        if self.decode_form(self.decode, s.size(1), s.device.type) == 'stream':
            z = self.weighted_s_stream(q_tilde, s, self.stream_block)  # (B, H, C)
        else:
            z = self.weighted_s_gemm(q_tilde, s)
        y = torch.einsum('bhc,hdc->bhd', z, Wv.view(H, hd, C))  # (B, H, hd)
        if bv is not None:
            y = y + bv.view(1, H, hd)
        return y.unsqueeze(2)  # (B, H, 1, hd)

    @staticmethod
    def weighted_s_gemm(q, s):
        """z_h = softmax(q_h sᵀ) s for q (B, H, C), s (B, Tk, C), in two passes over s, each one
        GEMM with the heads as rows: scores (B,H,C) @ (B,C,Tk), then weights (B,H,Tk) @ (B,Tk,C)."""
        att = F.softmax(q @ s.transpose(1, 2), dim=-1)  # (B, H, Tk)
        return att @ s  # (B, H, C): the attention-weighted initial states

    @staticmethod
    def weighted_s_stream(q, s, block):
        """The same z in one pass over s, `block` tokens at a time, each block scored and summed
        while it is in cache (online softmax, as flash-decoding). Running max m, l = Σ_j e^(a_j-m),
        z = Σ_j e^(a_j-m) s_j; a block with scores a and new max m' rescales l, z by e^(m-m')."""
        B, H, C = q.size()
        acc = dict(dtype=torch.float32, device=q.device)  # running sums in fp32 whatever the dtype
        m = torch.full((B, H, 1), -math.inf, **acc)
        l = torch.zeros(B, H, 1, **acc)
        z = torch.zeros(B, H, C, **acc)
        for s_b in s.split(block, dim=1):  # (B, n, C)
            a = (q @ s_b.transpose(1, 2)).float()  # (B, H, n): this block's scores
            m_new = torch.maximum(m, a.amax(dim=-1, keepdim=True))
            p = torch.exp(a - m_new)  # (B, H, n)
            r = torch.exp(m - m_new)  # (B, H, 1): rescales what was summed under the old max
            l = l * r + p.sum(dim=-1, keepdim=True)
            z = z * r + (p.to(s.dtype) @ s_b).float()
            m = m_new
        return (z / l).to(q.dtype)

    @classmethod
    def decode_form(cls, inattn_decode, T, device_type):
        """The absorbed step's form at T tokens of s: inattn_decode, where 'auto' is 'stream' on a
        CPU from stream_from tokens on, where one pass was measured faster (docs/results.md); else
        'gemm': a shorter s stays in cache between the two passes, and on a GPU the loop over blocks
        would launch a dozen small kernels per block."""
        if inattn_decode != 'auto':
            return inattn_decode
        return 'stream' if device_type == 'cpu' and T >= cls.stream_from else 'gemm'

    @staticmethod
    def caches_s(config):
        return config.inattn_cache == 's'

    @staticmethod
    def state_bytes(config, T, dtype):
        if config.inattn_cache == 'kv':
            return 2 * T * config.n_embd * dtype.itemsize
        return 0  # s is shared by every layer: GPT.decode_state_bytes counts it once


class LightningAttention(CausalSelfAttention):
    """Lightning attention (TransNormerLLM, Lightning Attention-2; docs/attention.md section 3):
    linear attention with a fixed decay λ per head:
        q, k = silu(x Wq), silu(x Wk);  v, u = x Wv, x Wu;  o_t = Σ_{s≤t} λ^(t-s) (q_t·k_s) v_s
        y = (rms_norm(o) ⊙ u) Wo     (no softmax and no 1/sqrt(hd): the RMS norm fixes the scale)
    Training uses the block form (cost per token independent of T), or the quadratic form with
    sdpa=False. Decoding keeps KV_t = Σ_{s≤t} λ^(t-s) k_sᵀ v_s, hd × hd per head in fp32."""

    pos_emb = 'none'  # the decay carries the order: no position table, so no length limit

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)  # c_attn and c_proj named as GPT-2's
        self.c_gate = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # the gate u
        self.block = config.lightning_block
        # The released TNL models' decay (the paper's formula never decays head 0): ALiBi slopes
        # 2^(-8(h+1)/H), times 1 - l/(L-1) + 1e-5 for layer l (a single layer: the first layer's).
        # Kept as the rate -log λ, so that λ^n = exp(-rate·n) is exact.
        H, L = config.n_head, config.n_layer
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H)
        rate = slopes * (1 - layer_idx / max(L - 1, 1) + 1e-5)
        self.register_buffer('decay_rate', rate.float(), persistent=False)  # (H,)

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        u = self.c_gate(x)
        # the recurrence runs in fp32 even under autocast: the state sums up to 1/(1-λ) terms
        q = self.split_heads(F.silu(q)).float()
        k = self.split_heads(F.silu(k)).float()
        v = self.split_heads(v).float()
        kv = None if cache is None else cache.get('kv')  # (B, H, hd, hd) after the earlier tokens
        with torch.autocast(device_type=x.device.type, enabled=False):
            if T == 1 and kv is not None:  # one-token decode: the recurrent form
                y, kv = self.recurrent(q, k, v, kv)
            elif cache is None and not self.sdpa:  # training, readable: the T x T matrix
                y = self.quadratic(q, k, v)
            else:  # training or prefill: the block form
                y, kv = self.blockwise(q, k, v, kv)
        if cache is not None:
            cache['kv'] = kv
        y = self.merge_heads(y)
        # RMS norm without a weight, then the gate u as it is (linear, as in the released TNL code)
        y = F.rms_norm(y, (C,), eps=1e-6).to(u.dtype) * u
        return self.resid_dropout(self.c_proj(y))

    def recurrent(self, q, k, v, kv):
        """One token: KV = λ KV + kᵀ v, y = q KV; q, k, v (B, H, 1, hd)."""
        decay = torch.exp(-self.decay_rate.float()).view(-1, 1, 1)  # (H, 1, 1): λ
        kv = decay * kv + k.transpose(-2, -1) @ v
        return q @ kv, kv

    def quadratic(self, q, k, v):
        """The equations as written, o = ((q kᵀ) ⊙ D) v with D_ts = λ^(t-s) for t ≥ s, else 0.
        O(T²) memory: the reference that blockwise() computes in pieces."""
        T = q.size(-2)
        t = torch.arange(T, device=q.device, dtype=q.dtype)
        rate = self.decay_rate.to(q.dtype).view(-1, 1, 1)  # (H, 1, 1)
        D = torch.exp(-rate * (t[:, None] - t[None, :]).clamp(min=0)).tril()  # (H, T, T)
        return ((q @ k.transpose(-2, -1)) * D) @ v

    def blockwise(self, q, k, v, kv=None):
        """Lightning Attention-2 for q, k, v (B, H, T, hd) and the state kv after the earlier tokens
        (or None). Blocks of W tokens; inside block b, rows t, s = 0..n-1 (n = W, less at the end):
            intra  ((Q_b K_bᵀ) ⊙ M) V_b      M_ts = λ^(t-s) for t ≥ s, else 0
            inter  diag(λ^(t+1)) Q_b KV_b     every earlier block, through the state KV_b
            state  KV_b+1 = λ^n KV_b + (λ^(n-1-s) K_b)ᵀ V_b   (powers ≥ 0: nothing divided by λ)
        The intra, inter and increment products of all blocks are single batched matmuls; only the
        scan over the hd × hd states is a Python loop. -> (o (B, H, T, hd), state after token T)."""
        B, H, T, hd = q.size()
        W = min(self.block, T)  # block length
        nb = -(-T // W)  # number of blocks; the last one is zero-padded to W rows
        rate = self.decay_rate.to(q.dtype).view(H, 1, 1)  # -log λ
        i = torch.arange(W, device=q.device, dtype=q.dtype)  # row inside a block
        M = torch.exp(-rate * (i[:, None] - i[None, :]).clamp(min=0)).tril()  # (H, W, W)
        starts = W * torch.arange(nb, device=q.device, dtype=q.dtype)
        n = (T - starts).clamp(max=W)  # (nb,) block lengths
        k_decay = torch.exp(-rate * (n[:, None] - 1 - i).clamp(min=0))  # (H, nb, W): λ^(n-1-s)
        q, k, v = (F.pad(t, (0, 0, 0, nb * W - T)).view(B, H, nb, W, hd) for t in (q, k, v))
        o = ((q @ k.transpose(-2, -1)) * M.unsqueeze(1)) @ v  # (B, H, nb, W, hd): intra
        dkv = (k * k_decay.unsqueeze(-1)).transpose(-2, -1) @ v  # (B, H, nb, hd, hd): increments
        kv = q.new_zeros(B, H, hd, hd) if kv is None else kv
        block_decay = torch.exp(-rate * n).unbind(-1)  # nb tensors (H, 1): λ^n
        states = []
        for dkv_b, decay_b in zip(dkv.unbind(2), block_decay):
            states.append(kv)
            kv = torch.addcmul(dkv_b, decay_b.unsqueeze(-1), kv)  # λ^n KV + increment
        q_decay = torch.exp(-rate * (i[:, None] + 1)).unsqueeze(1)  # (H, 1, W, 1): λ^(t+1)
        o = o + (q * q_decay) @ torch.stack(states, dim=2)  # inter
        return o.view(B, H, nb * W, hd)[:, :, :T], kv

    @staticmethod
    def state_bytes(config, T, dtype):
        hd = config.n_embd // config.n_head
        return config.n_head * hd * hd * 4  # KV per head in fp32, whatever the dtype and T


class InfiniAttention(CausalSelfAttention):
    """Infini-attention (docs/attention.md section 4). The sequence is cut into segments of N
    tokens. Inside a segment: causal softmax attention A_dot, with RoPE on q, k at positions
    0..N-1. Across segments: per head a compressive memory M (hd × hd) and z (hd) in fp32, read
    before it is written, on q and k without positions (σ = ELU + 1 keeps every term positive):
        A_mem = σ(Q) M / (σ(Q) z + eps)                   (the empty memory gives 0 / eps = 0)
        linear: M += σ(K)ᵀ V;   delta: M += σ(K)ᵀ (V − σ(K) M / (σ(K) z + eps));   z += Σ_t σ(K_t)
        A = sigmoid(β) A_mem + (1 − sigmoid(β)) A_dot      β: one scalar per head, initially 0
    A token sees its own segment only through A_dot; training backpropagates through the memory.
    RoPE, because the GPT around it has no position table: without it the local attention would
    see no order but the mask. infini_memory=False knocks the memory out (A = A_dot).
    Decoding state per layer: M, z and the raw K, V of the unfinished segment (< N tokens)."""

    pos_emb = 'none'  # RoPE inside each segment: no position table, so no length limit
    eps = 1e-6  # matters only for the empty memory; later σ(q)·z > 0 grows with every token

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if (config.n_embd // config.n_head) % 2:
            raise ValueError(f"Infini-attention's RoPE needs an even head size, got n_embd/n_head="
                             f"{config.n_embd // config.n_head}; change n_embd or n_head")
        self.beta = nn.Parameter(torch.zeros(config.n_head))  # sigmoid(0): half memory
        self.segment = config.infini_segment
        self.update = config.infini_update
        self.memory = config.infini_memory

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        q, k, v = map(self.split_heads, self.c_attn(x).split(C, dim=2))  # (B, H, T, hd) each
        state = {} if cache is None else cache  # training: a fresh memory, dropped afterwards
        H, hd, N = self.n_head, C // self.n_head, self.segment
        zeros = dict(dtype=torch.float32, device=x.device)
        M = state['M'] if 'M' in state else torch.zeros(B, H, hd, hd, **zeros)
        z = state['z'] if 'z' in state else torch.zeros(B, H, hd, **zeros)
        gate = torch.sigmoid(self.beta).view(1, H, 1, 1)
        ys = []
        t = 0
        while t < T:  # one piece per segment; the first completes the cached segment, if any
            P = state['k'].size(2) if 'k' in state else 0  # tokens of this segment already seen
            n = min(N - P, T - t)
            qs = q[:, :, t:t + n]
            if cache is None:  # training: every segment starts empty; its K, V are slices
                ks = k[:, :, t:t + n]
                vs = v[:, :, t:t + n]
            else:  # decoding: after the segment's earlier tokens, in a room of N tokens
                ks = grow(cache, 'k', k[:, :, t:t + n], capacity=N)  # (B, H, P + n, hd)
                vs = grow(cache, 'v', v[:, :, t:t + n], capacity=N)
            y = attend(self.rope(qs, P), self.rope(ks, 0), vs, self.attn_dropout(), self.sdpa)
            if self.memory:
                y = gate * self.retrieve(qs, M, z).to(y.dtype) + (1 - gate) * y
            if P + n == N:  # the segment is complete: fold it into the memory, forget its K, V
                M, z = self.fold(ks, vs, M, z)
                if cache is not None:  # the room stays, for the next segment
                    del cache['k'], cache['v']
            ys.append(y)
            t += n
        state['M'] = M
        state['z'] = z
        y = self.merge_heads(torch.cat(ys, dim=2))
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def rope(t, pos0):
        """Rotary positions (Su et al. 2021) on t (B, H, n, hd) at positions pos0..pos0+n-1: rotate
        each pair (t_i, t_{i+hd/2}) by pos·10000^(-2i/hd), so q·k depends on the distance alone."""
        n, hd = t.size(-2), t.size(-1)
        freq = torch.arange(0, hd, 2, device=t.device, dtype=torch.float32) / hd
        inv_freq = 10000.0 ** (-freq)
        pos = torch.arange(pos0, pos0 + n, device=t.device, dtype=torch.float32)
        angle = pos[:, None] * inv_freq  # (n, hd/2)
        cos = angle.cos().to(t.dtype)
        sin = angle.sin().to(t.dtype)
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    def retrieve(self, q, M, z):
        """A_mem = σ(q) M / (σ(q) z + eps) for q (B, H, n, hd), in fp32 (M must not be rounded)."""
        with torch.autocast(q.device.type, enabled=False):
            sq = F.elu(q.float()) + 1
            return (sq @ M) / (sq @ z.unsqueeze(-1) + self.eps)

    def fold(self, k, v, M, z):
        """Write a complete segment's K, V (B, H, N, hd) into the memory: -> new M, z (fp32)."""
        with torch.autocast(k.device.type, enabled=False):
            sk = F.elu(k.float()) + 1
            v = v.float()
            if self.update == 'delta':  # write only what the memory does not already return
                v = v - self.retrieve(k, M, z)
            return M + sk.transpose(-2, -1) @ v, z + sk.sum(dim=2)

    @staticmethod
    def state_bytes(config, T, dtype):
        H, hd = config.n_head, config.n_embd // config.n_head
        memory = 4 * H * hd * (hd + 1) if T > 0 else 0  # M and z in fp32, from the first token
        unfinished = T % config.infini_segment
        return memory + 2 * unfinished * config.n_embd * dtype.itemsize  # + its K and V


ATTENTIONS = {
    'causal': CausalSelfAttention,
    'inattention': InAttention,
    'lightning': LightningAttention,
    'infini': InfiniAttention,
}


# -------------------------------------------------------------------------------------------------
# The shared transformer

class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer_idx, attention):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention(config, layer_idx)  # a class of ATTENTIONS
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, s, cache=None):
        x = x + self.attn(self.ln_1(x), s, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class Cache:
    """Everything a decoder keeps between steps, and nothing else:
    pos       the number of tokens processed so far
    shared    the state every layer reads: the initial states 's' (B, pos, C), kept once for all
              layers when the attention asks for them
    layers    one dict per layer, filled by its attention class (K/V, recurrent state, memory, ...)
    capacity  the tokens each growing tensor gets room for at its first write (see grow): the
              text's final length when it is known (generate_tokens), so that decoding never
              copies a cache; None: room for what the first write needs, doubled whenever full
    In each dict the tensors are the state; 'capacity' and 'room' (what the growing tensors are
    views of) are bookkeeping, not counted by nbytes()."""

    def __init__(self, n_layer, capacity=None):
        self.pos = 0
        self.shared = dict(capacity=capacity)
        self.layers = [dict(capacity=capacity) for _ in range(n_layer)]

    def states(self):
        return [self.shared] + self.layers

    def tensors(self):
        """The state held: of a growing tensor, the view of its tokens."""
        return [t for state in self.states() for t in state.values() if torch.is_tensor(t)]

    def nbytes(self):
        """Bytes held, measured from the tensors (decode_state_bytes is the formula)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def allocated_nbytes(self):
        """Bytes allocated: the rooms whole (spare space included), and the other tensors."""
        n = 0
        for state in self.states():
            rooms = state.get('room', {})
            n += sum(t.nbytes for t in rooms.values())
            held = [t for name, t in state.items() if torch.is_tensor(t) and name not in rooms]
            n += sum(t.nbytes for t in held)
        return n


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        attn = ATTENTIONS[config.attention]  # the class says what it needs from the model around it
        if config.pos_emb == 'auto':
            config.pos_emb = attn.pos_emb
        learned_positions = config.pos_emb == 'learned'
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if learned_positions else None,
            drop=nn.Dropout(config.dropout),
            ln_in=LayerNorm(config.n_embd, bias=config.bias) if attn.reads_s else None,
            # W_1..W_k of the token shift, as one (C, k·C) matrix over [h_{t-1}, ..., h_{t-k}]
            shift=nn.Linear(config.inattn_shift * config.n_embd, config.n_embd, bias=False)
            if config.inattn_shift else None,
            h=nn.ModuleList([Block(config, i, self.attention(i)) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2L)
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count, by default without the position table (wte is tied to lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> (logits, loss). With targets: logits at every position and the mean
        cross-entropy (targets of -1 are ignored). Without: the last position's logits (B, 1, V),
        all that sampling needs. With a cache: idx are the T tokens after cache.pos."""
        B, T = idx.size()
        pos0 = 0 if cache is None else cache.pos
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            if pos0 + T > self.config.block_size:
                raise ValueError(f"position {pos0 + T - 1} is past the position table (block_size="
                                 f"{self.config.block_size}); crop the context or "
                                 f"extend_block_size()")
            pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)  # the input of block 0
        s = None
        for i, block in enumerate(self.transformer.h):
            if i == self.config.inattn_prefix and self.transformer.ln_in is not None:
                s = self.initial_states(x, cache)  # from the stream entering block m
            if self.config.grad_checkpoint and cache is None and self.training \
                    and torch.is_grad_enabled():
                # activation checkpointing: keep only the block's input, rerun its forward in
                # backward (same dropout masks: the RNG state is saved and restored)
                x = torch.utils.checkpoint.checkpoint(block, x, s, use_reentrant=False,
                                                      preserve_rng_state=True)
            else:
                x = block(x, s, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def attention(self, layer_idx):
        """The attention class of a block: config.attention, but causal in the first inattn_prefix
        blocks (InAttention over a causal prefix, docs/attention.md section 9)."""
        if layer_idx < self.config.inattn_prefix:
            return CausalSelfAttention
        return ATTENTIONS[self.config.attention]

    def initial_states(self, x, cache=None):
        """s = ln_in(h_m), h_m (B, T, C) the stream entering block m = inattn_prefix (m = 0: the
        embeddings). With the token shift of k positions (docs/attention.md section 11):
            s_t = ln_in(h_t + Σ_{i=1..k} W_i h_{t-i}),   h_t = 0 for t < 0
        A decoder that keeps s appends the new tokens': -> (B, pos0 + T, C)."""
        if self.transformer.shift is not None:
            x = x + self.transformer.shift(self.previous_inputs(x, cache))
        s = self.transformer.ln_in(x)
        if cache is not None and ATTENTIONS[self.config.attention].caches_s(self.config):
            s = grow(cache.shared, 's', s, dim=1)
        return s

    def previous_inputs(self, x, cache=None):
        """x (B, T, C) -> (B, T, k·C): [h_{t-1}, ..., h_{t-k}] at every t. The k inputs before
        x are zeros at the start, else the decoder's cache.shared['shift'] (its last k inputs,
        a constant k·d numbers per sequence, which this call updates)."""
        B, T, C = x.size()
        k = self.config.inattn_shift
        before = x.new_zeros(B, k, C)
        if cache is not None and 'shift' in cache.shared:
            before = cache.shared['shift']
        h = torch.cat([before, x], dim=1)  # (B, k + T, C): h_{t-k} .. h_{T-1}
        if cache is not None:
            cache.shared['shift'] = h[:, -k:].clone()  # the next call's k previous inputs
        return torch.cat([h[:, k - i:k - i + T] for i in range(1, k + 1)], dim=2)

    # --- context length ------------------------------------------------------------------------

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to fine-tune GPT-2 at a smaller one): keep the first rows."""
        assert 0 < block_size <= self.config.block_size
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        if wpe is not None:
            wpe.weight = nn.Parameter(wpe.weight[:block_size].detach().clone())

    def extend_block_size(self, block_size, method='interpolate'):
        """Grow the learned position table from T0 to T1 = block_size rows (docs/attention.md 6).
        'interpolate': position interpolation (Chen et al. 2023): new row m is the old table read at
                       m·(T0-1)/(T1-1), linearly between rows. The end points are aligned:
                       reading at m·T0/T1 would make the last T1/T0 rows copies of row T0-1.
        'copy':        new row m = old row m mod T0 (the learned rows tiled)."""
        T0, T1 = self.config.block_size, block_size
        if T1 < T0:
            raise ValueError(f"extend_block_size({T1}) is smaller than block_size={T0}: "
                             f"use crop_block_size")
        if method not in ('interpolate', 'copy'):
            raise ValueError(f"unknown extension method {method!r}: use 'interpolate' or 'copy'")
        self.config.block_size = T1
        if self.transformer.wpe is None or T1 == T0:
            return
        old = self.transformer.wpe.weight.detach()
        if method == 'copy':
            new = old[torch.arange(T1, device=old.device) % T0]
        else:
            src = torch.arange(T1, device=old.device, dtype=torch.float32) * ((T0 - 1) / (T1 - 1))
            lo = src.floor().long().clamp(max=T0 - 1)
            hi = (lo + 1).clamp(max=T0 - 1)
            frac = (src - lo).unsqueeze(1).to(old.dtype)
            new = (1 - frac) * old[lo] + frac * old[hi]
        self.transformer.wpe = nn.Embedding(T1, old.size(1), device=old.device, dtype=old.dtype)
        self.transformer.wpe.weight.data.copy_(new)

    # --- loading GPT-2 -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """Hugging Face GPT-2 weights ('gpt2', 'gpt2-medium', ..., or a local folder), by name.
        override_args may set dropout, attention, inattn_prefix and inattn_shift. With
        attention='inattention' the weights are only a start: the same Wk, Wv then read the initial
        states instead of the stream, so the model computes something else until it is fine-tuned;
        ln_in starts as the identity norm, and the token shift (if any) at its random init."""
        from transformers import GPT2LMHeadModel
        override_args = override_args or {}
        allowed = {'dropout', 'attention', 'inattn_prefix', 'inattn_shift'}
        assert set(override_args) <= allowed, f"only these: {sorted(allowed)}"
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, bias=True, **override_args)
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf.state_dict()
        # HF uses Conv1D modules: their weights are the transpose of nn.Linear's
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight',
                      'mlp.c_proj.weight')
        for k, v in sd_hf.items():
            if k.endswith('.attn.bias') or k.endswith('.attn.masked_bias'):
                continue  # the causal-mask buffers of older checkpoints, not parameters
            if k not in sd:
                raise KeyError(f"{name_or_path}: parameter {k} has no counterpart in this GPT")
            if k.endswith(transposed):
                v = v.t()
            assert v.shape == sd[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}"
            with torch.no_grad():
                sd[k].copy_(v)
        return model

    # --- training helpers ----------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on every matrix (Linear weights, embeddings), not on biases and
        norm gains. Infini-attention's gates β get their own group, learning rate and no decay."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        gates = [p for n, p in named if n.endswith('.beta')]
        params = [p for n, p in named if not n.endswith('.beta')]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        if gates:  # lr_scale: the training loop sets lr = schedule(it) * lr_scale in every group
            scale = 0.0  # learning_rate 0 freezes every group
            if learning_rate > 0:
                scale = self.config.infini_beta_lr / learning_rate
            groups.append({'params': gates, 'weight_decay': 0.0, 'lr': learning_rate * scale,
                           'lr_scale': scale})
        fused = device_type == 'cuda'  # the fused AdamW kernel exists on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation: achieved FLOP/s over peak_flops (default: A100 bf16, 312e12).
        FLOPs per token = 6N + 12·L·H·hd·T (PaLM, appendix B), full softmax attention's count for
        every variant, so it overstates the attention work of Lightning and Infini at long T."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # --- decoding ------------------------------------------------------------------------------

    def new_cache(self, capacity=None):
        """An empty decoding state; capacity: the tokens it will hold, when known (see Cache)."""
        return Cache(self.config.n_layer, capacity)

    def decode_state_bytes(self, T, dtype=torch.float32, batch_size=1):
        """Formula for the decoding state after T tokens; Cache.nbytes() measures the real one."""
        attn = ATTENTIONS[self.config.attention]
        n = sum(type(b.attn).state_bytes(self.config, T, dtype) for b in self.transformer.h)
        if attn.caches_s(self.config):
            n += T * self.config.n_embd * dtype.itemsize  # s: d numbers per token, for all layers
        if self.config.inattn_shift and T > 0:  # the last k inputs of the token shift
            n += self.config.inattn_shift * self.config.n_embd * dtype.itemsize
        return n * batch_size

    @torch.no_grad()
    def prefill(self, idx, cache, chunk=None):
        """Feed idx (B, T) into the cache `chunk` tokens at a time; -> the last position's logits.
        For InAttention it is the linear-memory prefill: a chunk needs only the earlier s."""
        chunk = chunk or idx.size(1)
        for i in range(0, idx.size(1), chunk):
            logits, _ = self(idx[:, i:i + chunk], cache=cache)
        return logits

    def window_start(self, length, start):
        """The first of `length` tokens that generation reads, its window having begun at `start`:
        with learned positions, a window of more than block_size tokens slides to the last
        block_size // 2 (read again in one prefill); without, the window never slides."""
        limit = self.config.block_size
        if self.transformer.wpe is not None and length - start > limit:
            return length - limit // 2
        return start

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                        prefill_chunk=None):
        """Yield the next token (B, 1) max_new_tokens times, sampled from the model given idx (B,T).
        temperature 0 is greedy decoding. A model with learned positions sees at most block_size
        tokens: when the window would overflow, it slides to the last block_size // 2 tokens, which
        are read again (one prefill). Uncached generation uses the very same windows, so both give
        identical tokens. Models without positions (pos_emb='none') see the whole text."""
        limit = self.config.block_size if self.transformer.wpe is not None else None
        start = 0
        cache = None
        for step in range(max_new_tokens):
            slid = self.window_start(idx.size(1), start)
            if slid != start:  # the window slid: the cache is rebuilt
                start, cache = slid, None
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif cache is None:  # room for every token it will hold: decoding copies no cache
                length = idx.size(1) - start + max_new_tokens - 1 - step  # the last is not fed
                cache = self.new_cache(min(length, limit or length))
                logits = self.prefill(idx[:, start:], cache, prefill_chunk)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                 prefill_chunk=None):
        """idx (B, T) -> (B, T + max_new_tokens): the prompt followed by the sampled tokens."""
        new = self.generate_tokens(idx, max_new_tokens, temperature, top_k, use_cache,
                                   prefill_chunk)
        return torch.cat([idx, *new], dim=1)
