"""
One GPT, four attention mechanisms behind one flag (GPTConfig.attention); everything else is GPT-2:

  'causal'       GPT-2 causal self-attention (the baseline). Decoding keeps K and V of every layer.
  'inattention'  InAttention (Eisner 2024): every layer's keys and values come from the *initial states*
                 s = ln_in(wte + wpe), so decoding keeps only s: d numbers per token for the whole model.
  'lightning'    Lightning attention (Qin et al. 2024): linear attention with a fixed per-head decay, trained in
                 blocks; decoding keeps one hd x hd state per head, whatever the length.
  'infini'       Infini-attention (Munkhdalai et al. 2024): softmax attention inside segments of N tokens plus a
                 compressive memory of the earlier segments; decoding keeps the memory and the current segment.

Every attention class has the same interface, so an ablation changes exactly one thing:
  __init__(config, layer_idx)
  forward(x, s, cache) -> y   x: (B, T, C) the block's ln_1 output; s: (B, Tk, C) initial states (used by
                              InAttention only, None for the others); cache: this layer's decoding state (a dict
                              the class fills in) or None while training. Queries are the last T of Tk positions.
  state_bytes(config, T, dtype) -> int   formula: bytes of this layer's decoding state after T tokens, batch 1
Register a new class in ATTENTIONS, after the attention classes.

References: nanoGPT (model layout, names, init), ../shared/REFERENCE.md (equations and choices).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024        # longest sequence trained on; bounds the learned position table
    vocab_size: int = 50304       # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True             # biases in Linears and LayerNorms, like GPT-2
    attention: str = 'causal'     # a key of ATTENTIONS
    pos_emb: str = 'learned'      # 'learned' (GPT-2 wpe) or 'none' (no positions: length unbounded)
    sdpa: bool = True             # F.scaled_dot_product_attention; False = materialise the T x T matrix
    inattn_cache: str = 's'       # InAttention decoding state: 's' (initial states, absorbed decode) or 'kv'
    lightning_block: int = 64     # Lightning: block size of the tiled training form
    infini_segment: int = 64      # Infini-attention: segment length N
    infini_update: str = 'linear' # Infini-attention memory update: 'linear' or 'delta'
    infini_memory: bool = True    # False knocks the memory out (gate forced fully local), for evaluations
    infini_beta_lr: float = 1e-2  # learning rate of Infini-attention's per-head gates β (no weight decay)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def causal_mask(Tq, Tk, device):
    """(Tq, Tk) bool, True where query i (the (Tk-Tq+i)-th position) may see key j: j <= Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


def attend(q, k, v, dropout_p=0.0, sdpa=True):
    """softmax(q kᵀ / sqrt(hd) + mask) v for q (B,H,Tq,hd), k, v (B,H,Tk,hd); the queries are the *last* Tq
    positions of the Tk keys (mask aligned bottom-right), so the same call serves training, chunked prefill and
    one-token decode."""
    Tq, Tk = q.size(-2), k.size(-2)
    if sdpa:  # SDPA's own causal kernel for a square, no mask for one query, a mask only for a prefill chunk
        mask = None if Tq in (1, Tk) else causal_mask(Tq, Tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=Tq == Tk > 1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, Tq, Tk): the quadratic baseline
    if Tq > 1:
        att = att.masked_fill(~causal_mask(Tq, Tk, q.device), float('-inf'))
    att = F.dropout(F.softmax(att, dim=-1), p=dropout_p, training=dropout_p > 0)
    return att @ v


def append(cache, name, t):
    """Concatenate t (B, H, T, hd) onto cache[name] along time and return the whole."""
    cache[name] = t if name not in cache else torch.cat([cache[name], t], dim=2)
    return cache[name]


# ----------------------------------------------------------------------------------------------------------
# Attention variants

class CausalSelfAttention(nn.Module):
    """GPT-2: q, k, v = x Wq, x Wk, x Wv; y = softmax(q kᵀ / sqrt(hd) + causal) v. Cache: K, V per layer."""

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.sdpa = config.n_head, config.dropout, config.sdpa

    def heads(self, t):  # (B, T, C) -> (B, H, T, hd)
        B, T, C = t.size()
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        q, k, v = map(self.heads, self.c_attn(x).split(C, dim=2))
        if cache is not None:  # decoding: keys and values of all earlier tokens are kept
            k, v = append(cache, 'k', k), append(cache, 'v', v)
        y = attend(q, k, v, self.dropout if self.training else 0.0, self.sdpa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def state_bytes(config, T, dtype):
        return 2 * T * config.n_embd * dtype.itemsize  # K and V


class InAttention(CausalSelfAttention):
    """InAttention: queries from the stream, keys and values from the initial states s (REFERENCE section 2):
        q = x Wq,  k = s Wk,  v = s Wv,  y = softmax(q kᵀ / sqrt(hd) + causal) v
    Same parameters (and GPT-2 names) as causal attention; only the inputs of Wk and Wv change."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.cache_layout = config.inattn_cache

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        Wq, Wk, Wv = self.c_attn.weight.split(C)  # each (C, C)
        bq, bk, bv = self.c_attn.bias.split(C) if self.c_attn.bias is not None else (None, None, None)
        q = self.heads(F.linear(x, Wq, bq))
        if cache is not None and self.cache_layout == 'kv':  # per-layer K/V cache; s holds the new tokens only
            k = append(cache, 'k', self.heads(F.linear(s, Wk, bk)))
            v = append(cache, 'v', self.heads(F.linear(s, Wv, bv)))
            y = attend(q, k, v, 0.0, self.sdpa)
        elif T == 1:  # one-token decode from the initial-state cache: absorb Wk, Wv, never build K or V
            y = self.absorbed(q, s, Wk, Wv, bv)
        else:  # training, or a prefill chunk: K and V of every visible token, freed when this layer is done
            k, v = self.heads(F.linear(s, Wk, bk)), self.heads(F.linear(s, Wv, bv))
            y = attend(q, k, v, self.dropout if self.training else 0.0, self.sdpa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def absorbed(self, q, s, Wk, Wv, bv):
        """One query per head against the cache S = s (B, Tk, C): q·k_j = (Wk_hᵀ q_h)·s_j and
        Σ_j p_j v_j = Wv_h (Σ_j p_j s_j) + bv_h. The key bias adds the same q·bk to every score and cancels in the
        softmax; the value bias is added once because Σ_j p_j = 1. H times the attention FLOPs of a K/V cache,
        half the bytes read per layer. (For a prefill chunk of many queries, building K and V is cheaper.)"""
        B, H, _, hd = q.size()  # (B, H, 1, hd)
        C = s.size(-1)
        q_tilde = torch.einsum('bhtd,hdc->bhtc', q, Wk.view(H, hd, C)) / math.sqrt(hd)  # (B, H, 1, C)
        att = F.softmax(q_tilde @ s.unsqueeze(1).transpose(-2, -1), dim=-1)  # (B, H, 1, Tk): all tokens visible
        z = att @ s.unsqueeze(1)  # (B, H, 1, C): attention-weighted initial states
        y = torch.einsum('bhtc,hdc->bhtd', z, Wv.view(H, hd, C))  # (B, H, 1, hd)
        return y if bv is None else y + bv.view(1, H, 1, hd)

    @staticmethod
    def state_bytes(config, T, dtype):
        if config.inattn_cache == 'kv':
            return 2 * T * config.n_embd * dtype.itemsize
        return 0  # the initial states are shared by all layers: counted once by GPT.decode_state_bytes


class LightningAttention(CausalSelfAttention):
    """Lightning attention (TransNormerLLM / Lightning Attention-2, REFERENCE section 3): linear attention with a
    fixed per-head decay λ, computed in blocks so that training cost per token does not depend on T:
        q, k = silu(x Wq), silu(x Wk);  v, u = x Wv, x Wu;  o_t = Σ_{s≤t} λ^(t-s) (q_t·k_s) v_s
        y = (rms_norm(o) ⊙ u) Wo      (no softmax, no 1/sqrt(hd): the RMS norm fixes the scale)
    Decoding keeps KV_t = Σ_{s≤t} λ^(t-s) k_sᵀ v_s (hd × hd per head, fp32): a state that never grows."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)  # c_attn (q, k, v) and c_proj as GPT-2, so GPT-2 weights load by name
        self.c_gate = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # the output gate u
        self.block = config.lightning_block
        # The released TNL models' decay, not the paper's Eq. 10 (exp(-8h/H·(1-l/L)), whose head 0 never decays):
        # ALiBi slopes s_h = 2^(-8(h+1)/H), scaled per layer by 1 - l/(L-1) + 1e-5 (short memory in the first
        # layer, almost none forgotten in the last); a single layer gets the first layer's decay. Fixed, as
        # learned decays were unstable in the paper. Kept as the rate -log λ, so λ^n = exp(-rate·n) is exact.
        H, L = config.n_head, config.n_layer
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H)
        rate = slopes * (1 - layer_idx / max(L - 1, 1) + 1e-5)
        self.register_buffer('decay_rate', rate.float(), persistent=False)  # (H,): λ_h = exp(-decay_rate_h)

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        u = self.c_gate(x)
        # the recurrence runs in fp32 even under autocast: the state sums up to 1/(1-λ) terms
        q, k, v = self.heads(F.silu(q)).float(), self.heads(F.silu(k)).float(), self.heads(v).float()
        kv = None if cache is None else cache.get('kv')  # (B, H, hd, hd) state after the earlier tokens
        with torch.autocast(device_type=x.device.type, enabled=False):
            if T == 1 and kv is not None:  # one-token decode: the recurrent form
                kv = torch.exp(-self.decay_rate.float()).view(-1, 1, 1) * kv + k.transpose(-2, -1) @ v  # λ KV + kᵀv
                y = q @ kv  # (B, H, 1, hd)
            else:  # training or prefill: the block form
                y, kv = self.blockwise(q, k, v, kv)
        if cache is not None:
            cache['kv'] = kv
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        # RMS norm without a weight, then the gate u as is: the released TNL code multiplies by the linear u (no
        # silu or sigmoid: the norm already bounds the product's scale, and a linear gate keeps it a bilinear GLU)
        y = F.rms_norm(y, (C,), eps=1e-6).to(u.dtype) * u
        return self.resid_dropout(self.c_proj(y))

    def blockwise(self, q, k, v, kv=None):
        """Lightning Attention-2 for q, k, v (B, H, T, hd) and the state kv after the earlier tokens (or None).
        Block b holds rows t, s = 0..n-1 (n = C, or fewer in the last block):
            intra  ((Q_b K_bᵀ) ⊙ M) V_b     M_ts = λ^(t-s) for t ≥ s, else 0   (causal part, quadratic in C only)
            inter  diag(λ^(t+1)) Q_b KV_b    (every earlier block, through the state KV_b before block b)
            state  KV_b+1 = λ^n KV_b + (λ^(n-1-s) K_b)ᵀ V_b   (only non-negative powers: nothing divided by λ^s)
        The intra, inter and state-increment products of all blocks are single batched matmuls; only the scan
        over the hd × hd states is a Python loop. Returns o (B, H, T, hd) and the state after the last token."""
        B, H, T, hd = q.size()
        C = min(self.block, T)
        nb = -(-T // C)  # number of blocks; the last one is zero-padded to C rows
        rate = self.decay_rate.to(q.dtype).view(H, 1, 1)  # -log λ
        i = torch.arange(C, device=q.device, dtype=q.dtype)  # row inside a block
        M = torch.exp(-rate * (i[:, None] - i[None, :]).clamp(min=0)).tril()  # (H, C, C)
        n = (T - C * torch.arange(nb, device=q.device, dtype=q.dtype)).clamp(max=C)  # (nb,) block lengths
        k_decay = torch.exp(-rate * (n[:, None] - 1 - i).clamp(min=0))  # (H, nb, C): λ^(n-1-s); 0-padded k rows
        q, k, v = (F.pad(t, (0, 0, 0, nb * C - T)).view(B, H, nb, C, hd) for t in (q, k, v))
        o = ((q @ k.transpose(-2, -1)) * M.unsqueeze(1)) @ v  # (B, H, nb, C, hd): intra
        dkv = (k * k_decay.unsqueeze(-1)).transpose(-2, -1) @ v  # (B, H, nb, hd, hd): each block's increment
        kv = q.new_zeros(B, H, hd, hd) if kv is None else kv
        states = []
        for dkv_b, decay_b in zip(dkv.unbind(2), torch.exp(-rate * n).unbind(-1)):  # decay_b (H, 1): λ^n
            states.append(kv)
            kv = torch.addcmul(dkv_b, decay_b.unsqueeze(-1), kv)  # λ^n KV + increment
        o = o + (q * torch.exp(-rate * (i[:, None] + 1)).unsqueeze(1)) @ torch.stack(states, dim=2)  # inter
        return o.view(B, H, nb * C, hd)[:, :, :T], kv

    @staticmethod
    def state_bytes(config, T, dtype):
        hd = config.n_embd // config.n_head
        return config.n_head * hd * hd * 4  # KV per head, fp32 whatever the dtype; independent of T


class InfiniAttention(CausalSelfAttention):
    """Infini-attention (Munkhdalai et al. 2024; REFERENCE section 4). The sequence is cut into segments of N
    tokens. Inside a segment: causal softmax attention A_dot, RoPE on q, k at positions 0..N-1 of the segment.
    Across segments: per head a compressive memory M (hd×hd), z (hd), fp32, read before it is written, on q, k
    WITHOUT positions (σ = ELU + 1, so every term is positive):
        A_mem = σ(Q) M / (σ(Q) z + eps)                           (from the empty memory: 0 / eps = 0)
        linear: M += σ(K)ᵀ V    delta: M += σ(K)ᵀ (V − σ(K) M / (σ(K) z + eps))    both: z += Σ_t σ(K_t)
        A = sigmoid(β) A_mem + (1 − sigmoid(β)) A_dot              β one scalar per head, init 0
    A token reads its own segment only through A_dot: the memory holds earlier segments only. Training
    backpropagates through the memory across all segments. infini_memory=False knocks the memory out (A = A_dot).
    Why RoPE: the GPT has no wpe here (pos_emb='none'), so without it the local attention sees no order but the
    causal mask. RoPE restarts at every segment, is cheap (elementwise), and measured better: val loss 2.15 vs
    2.30 without positions (char-level Shakespeare, 2 layers × 64 wide, T = 128, N = 16, 300 iterations).
    Decoding state per layer: M, z (fp32) and the raw (unrotated) K, V of the unfinished segment, < N tokens, so
    the state is bounded whatever the length. A multi-token call continues exactly where the cache stopped."""

    eps = 1e-6  # only matters for the empty memory (z = 0); afterwards σ(q)·z > 0 grows with every token

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if (config.n_embd // config.n_head) % 2:
            raise ValueError(f"Infini-attention's RoPE needs an even head size, got n_embd/n_head="
                             f"{config.n_embd // config.n_head}; change n_embd or n_head")
        self.beta = nn.Parameter(torch.zeros(config.n_head))  # gate logit per head: sigmoid(0) = half memory
        self.segment, self.update, self.memory = config.infini_segment, config.infini_update, config.infini_memory

    def forward(self, x, s, cache=None):
        B, T, C = x.size()
        q, k, v = map(self.heads, self.c_attn(x).split(C, dim=2))  # (B, H, T, hd) each
        cache = {} if cache is None else cache  # training: a fresh memory, dropped after this call
        H, hd, N = self.n_head, C // self.n_head, self.segment
        M = cache['M'] if 'M' in cache else torch.zeros(B, H, hd, hd, dtype=torch.float32, device=x.device)
        z = cache['z'] if 'z' in cache else torch.zeros(B, H, hd, dtype=torch.float32, device=x.device)
        gate = torch.sigmoid(self.beta).view(1, H, 1, 1)
        ys, t = [], 0
        while t < T:  # one piece per segment: the first piece fills the cached partial segment, if any
            P = cache['k'].size(2) if 'k' in cache else 0  # tokens of the current segment already seen
            n = min(N - P, T - t)
            qs = q[:, :, t:t + n]
            ks, vs = append(cache, 'k', k[:, :, t:t + n]), append(cache, 'v', v[:, :, t:t + n])  # (B, H, P+n, hd)
            y = attend(self.rope(qs, P), self.rope(ks, 0), vs, self.dropout if self.training else 0.0, self.sdpa)
            if self.memory:
                y = gate * self.retrieve(qs, M, z).to(y.dtype) + (1 - gate) * y
            if P + n == N:  # the segment is complete: fold it into the memory and forget its keys and values
                M, z = self.fold(ks, vs, M, z)
                del cache['k'], cache['v']
            ys.append(y)
            t += n
        cache['M'], cache['z'] = M, z
        y = torch.cat(ys, dim=2).transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def rope(t, pos0):
        """Rotary positions (Su et al. 2021) on t (B, H, n, hd) at positions pos0..pos0+n-1: rotate each pair
        (t_i, t_{i+hd/2}) by the angle pos·10000^(-2i/hd), so q·k depends only on the distance of the positions."""
        n, hd = t.size(-2), t.size(-1)
        inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, device=t.device, dtype=torch.float32) / hd)
        angle = torch.arange(pos0, pos0 + n, device=t.device, dtype=torch.float32)[:, None] * inv_freq  # (n, hd/2)
        cos, sin = angle.cos().to(t.dtype), angle.sin().to(t.dtype)
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    def retrieve(self, q, M, z):
        """A_mem = σ(q) M / (σ(q) z + eps) for q (B, H, n, hd), in fp32 (autocast off: M must not be rounded)."""
        with torch.autocast(q.device.type, enabled=False):
            sq = F.elu(q.float()) + 1
            return (sq @ M) / (sq @ z.unsqueeze(-1) + self.eps)

    def fold(self, k, v, M, z):
        """Write a complete segment's K, V (B, H, N, hd) into the memory; returns the new M, z (fp32)."""
        with torch.autocast(k.device.type, enabled=False):
            sk, v = F.elu(k.float()) + 1, v.float()
            if self.update == 'delta':  # write only what the memory does not already return for these keys
                v = v - self.retrieve(k, M, z)
            return M + sk.transpose(-2, -1) @ v, z + sk.sum(dim=2)

    @staticmethod
    def state_bytes(config, T, dtype):
        H, hd = config.n_head, config.n_embd // config.n_head
        memory = 4 * H * hd * (hd + 1) if T > 0 else 0  # M and z in fp32, created by the first token
        return memory + 2 * (T % config.infini_segment) * config.n_embd * dtype.itemsize  # unfinished segment


ATTENTIONS = {'causal': CausalSelfAttention, 'inattention': InAttention, 'lightning': LightningAttention,
              'infini': InfiniAttention}


# ----------------------------------------------------------------------------------------------------------
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

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = ATTENTIONS[config.attention](config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, s, cache=None):
        x = x + self.attn(self.ln_1(x), s, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class Cache:
    """Everything a decoder keeps between steps, and nothing else:
    pos: tokens processed so far; s: InAttention's initial states (B, T, C), shared by every layer;
    layers: one dict per layer that its attention class fills (K/V, recurrent state, memory, ...)."""

    def __init__(self, n_layer):
        self.pos, self.s, self.layers = 0, None, [{} for _ in range(n_layer)]

    def tensors(self):
        return ([self.s] if self.s is not None else []) + [t for d in self.layers for t in d.values()
                                                           if torch.is_tensor(t)]

    def nbytes(self):
        """Bytes actually held, measured from the tensors (a formula is GPT.decode_state_bytes)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == 'learned' else None,
            drop=nn.Dropout(config.dropout),
            ln_in=LayerNorm(config.n_embd, bias=config.bias) if config.attention == 'inattention' else None,
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
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
        """Parameter count; by default without the position table (the token table is tied to lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> (logits, loss). With targets: logits at every position and the mean cross-entropy
        (targets of -1 are ignored). Without: logits of the last position only (B, 1, V), which is all that
        sampling needs. With a cache: idx are the next T tokens after cache.pos, and the cache is extended."""
        B, T = idx.size()
        pos0 = 0 if cache is None else cache.pos
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            if pos0 + T > self.config.block_size:
                raise ValueError(f"position {pos0 + T - 1} is past the position table (block_size="
                                 f"{self.config.block_size}); crop the context or extend_block_size()")
            x = x + self.transformer.wpe(torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)  # the initial states, input of block 0
        s = None
        if self.transformer.ln_in is not None:  # InAttention: every layer reads s = ln_in(x0)
            s = self.transformer.ln_in(x)
            if cache is not None and self.config.inattn_cache == 's':
                cache.s = s = s if cache.s is None else torch.cat([cache.s, s], dim=1)  # (B, pos0 + T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, s, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- context length ---------------------------------------------------------------------------------

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to fine-tune a pretrained model at a smaller one): keep the first rows."""
        assert 0 < block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.transformer.wpe is not None:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def extend_block_size(self, block_size, method='interpolate'):
        """Grow the learned position table from T0 to T1 = block_size rows (REFERENCE section 6).
        'interpolate': position interpolation (Chen et al. 2023): new row m = old table read at m·(T0-1)/(T1-1),
                       linearly between neighbouring rows; the model sees familiar positions, more densely. The end
                       points are aligned (row T1-1 = old row T0-1): reading at m·T0/T1 would make the last T1/T0
                       rows identical copies of old row T0-1, positions the model cannot tell apart.
        'copy':        new row m = old row m mod T0 (the learned rows tiled)."""
        T0, T1 = self.config.block_size, block_size
        if T1 < T0:
            raise ValueError(f"extend_block_size({T1}) is smaller than block_size={T0}: use crop_block_size")
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
            frac = (src - lo).unsqueeze(1).to(old.dtype)
            new = (1 - frac) * old[lo] + frac * old[(lo + 1).clamp(max=T0 - 1)]
        self.transformer.wpe = nn.Embedding(T1, old.size(1), device=old.device, dtype=old.dtype)
        self.transformer.wpe.weight.data.copy_(new)

    # --- loading GPT-2 ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """Hugging Face GPT-2 weights ('gpt2', 'gpt2-medium', ... or a local directory) loaded by name.
        override_args may set dropout and attention. With attention='inattention' the weights are only an
        initialisation: the same Wk, Wv then read the initial states instead of the stream, so the model
        computes something different until it is fine-tuned; ln_in starts as identity-like LayerNorm."""
        from transformers import GPT2LMHeadModel
        override_args = override_args or {}
        assert set(override_args) <= {'dropout', 'attention'}, "only dropout and attention can be overridden"
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd, bias=True, **override_args)
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf.state_dict()
        # HF uses Conv1D modules: their weights are the transpose of nn.Linear's
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        for k, v in sd_hf.items():
            if k.endswith('.attn.bias') or k.endswith('.attn.masked_bias'):
                continue  # causal-mask buffers of older checkpoints, not parameters
            if k not in sd:
                raise KeyError(f"{name_or_path}: parameter {k} has no counterpart in this GPT")
            v = v.t() if k.endswith(transposed) else v
            assert v.shape == sd[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}"
            with torch.no_grad():
                sd[k].copy_(v)
        return model

    # --- training helpers ---------------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on every matrix (Linear weights, embeddings), none on biases and norm gains."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        gates = [p for n, p in named if n.endswith('.beta')]  # Infini-attention gates: their own learning rate
        params = [p for n, p in named if not n.endswith('.beta')]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        if gates:  # lr_scale: the training loop sets lr = schedule(it) * lr_scale for every group
            scale = self.config.infini_beta_lr / learning_rate if learning_rate > 0 else 0.0  # lr 0 freezes all
            groups.append({'params': gates, 'weight_decay': 0.0, 'lr': learning_rate * scale, 'lr_scale': scale})
        fused = device_type == 'cuda'  # fused AdamW kernel exists on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation: achieved FLOP/s over peak_flops (default: A100 bf16, 312 TFLOP/s).
        FLOPs per token = 6N + 12·L·H·hd·T (PaLM appendix B), as for full softmax attention: the same count for
        every variant, so it overstates the attention work of Lightning and Infini-attention at long T."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_iter = (6 * self.get_num_params() + 12 * L * H * Q * T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # --- decoding -----------------------------------------------------------------------------------------

    def new_cache(self):
        return Cache(self.config.n_layer)

    def decode_state_bytes(self, T, dtype=torch.float32, batch_size=1):
        """Formula for the decoding state after T tokens; Cache.nbytes() measures the real one."""
        attn = ATTENTIONS[self.config.attention]
        n = sum(attn.state_bytes(self.config, T, dtype) for _ in range(self.config.n_layer))
        if self.config.attention == 'inattention' and self.config.inattn_cache == 's':
            n += T * self.config.n_embd * dtype.itemsize  # s: d numbers per token for the whole model
        return n * batch_size

    @torch.no_grad()
    def prefill(self, idx, cache, chunk=None):
        """Feed idx (B, T) into the cache in pieces of `chunk` tokens; return the last position's logits.
        For InAttention this is the linear-memory prefill: a chunk's queries only need earlier initial states."""
        chunk = chunk or idx.size(1)
        for i in range(0, idx.size(1), chunk):
            logits, _ = self(idx[:, i:i + chunk], cache=cache)
        return logits

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, prefill_chunk=None):
        """Yield the next token (B, 1) max_new_tokens times, sampling from the model given idx (B, T).
        temperature 0 is greedy decoding. Past block_size a model with learned positions cannot see the whole
        text: when the window would overflow it slides to the last block_size // 2 tokens, which are re-read
        (one prefill), and decoding goes on from there; uncached generation uses the very same windows, so both
        give identical tokens. Models without positions (pos_emb='none') see the whole text."""
        limit = self.config.block_size if self.transformer.wpe is not None else None
        start, cache = 0, None
        for _ in range(max_new_tokens):
            if limit is not None and idx.size(1) - start > limit:
                start, cache = idx.size(1) - limit // 2, None  # slide the window; the cache is rebuilt
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif cache is None:
                cache = self.new_cache()
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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, prefill_chunk=None):
        """idx (B, T) -> (B, T + max_new_tokens): the prompt followed by the sampled tokens."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, use_cache, prefill_chunk))
        return torch.cat([idx] + new, dim=1)


def check_config(config):
    """Reject impossible configurations with one line that says how to fix them."""
    if config.attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {config.attention!r}; valid: {', '.join(ATTENTIONS)}")
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    if config.pos_emb not in ('learned', 'none'):
        raise ValueError(f"unknown pos_emb {config.pos_emb!r}; valid: learned, none")
    if config.inattn_cache not in ('s', 'kv'):
        raise ValueError(f"unknown inattn_cache {config.inattn_cache!r}; valid: s, kv")
    if config.infini_update not in ('linear', 'delta'):
        raise ValueError(f"unknown infini_update {config.infini_update!r}; valid: linear, delta")
    for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'lightning_block', 'infini_segment'):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
