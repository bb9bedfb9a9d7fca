# staging file: LightningAttention is pasted verbatim into model.py's attention section, then this file goes
from model import torch, nn, F, ATTENTIONS


class LightningAttention(nn.Module):
    """Lightning attention (TransNormerLLM / Lightning Attention-2, REFERENCE section 3): linear attention with a
    fixed per-head decay λ, computed in blocks so that training cost per token does not depend on T:
        q, k = silu(x Wq), silu(x Wk);  v, u = x Wv, x Wu;  o_t = Σ_{s≤t} λ^(t-s) (q_t·k_s) v_s
        y = (rms_norm(o) ⊙ u) Wo      (no softmax, no 1/sqrt(hd): the RMS norm fixes the scale)
    Decoding keeps KV_t = Σ_{s≤t} λ^(t-s) k_sᵀ v_s (hd × hd per head, fp32): a state that never grows."""

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # q, k, v in c_attn exactly as GPT-2 (so GPT-2 weights still load by name); the output gate u separately
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_gate = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.block = config.n_head, config.lightning_block
        # The released TNL models' decay, not the paper's Eq. 10 (exp(-8h/H·(1-l/L)), whose head 0 never decays):
        # ALiBi slopes s_h = 2^(-8(h+1)/H), scaled per layer by 1 - l/(L-1) + 1e-5 (short memory in the first
        # layer, almost none forgotten in the last); a single layer gets the first layer's decay. Fixed, as
        # learned decays were unstable in the paper. Kept as the rate -log λ, so λ^n = exp(-rate·n) is exact.
        H, L = config.n_head, config.n_layer
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H)
        rate = slopes * (1 - layer_idx / max(L - 1, 1) + 1e-5)
        self.register_buffer('decay_rate', rate.float(), persistent=False)  # (H,): λ_h = exp(-decay_rate_h)

    def heads(self, t):  # (B, T, C) -> (B, H, T, hd)
        B, T, C = t.size()
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

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


ATTENTIONS['lightning'] = LightningAttention
