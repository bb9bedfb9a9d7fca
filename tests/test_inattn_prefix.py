"""InAttention over a causal prefix (GPTConfig.inattn_prefix = m): m = 0 is the InAttention of
before, bit for bit; for every m, causality, cached = uncached, chunked = whole, state formula."""
from pathlib import Path

import torch

from conftest import tiny_gpt

REFERENCE = Path(__file__).parent / 'reference' / 'inattention_logits.pt'


def test_inattention_is_bit_identical_to_the_stored_reference():
    """tests/reference/inattention_logits.pt was written by the InAttention code before the prefix
    existed (tiny_gpt, seed 0): the same parameters and the same logits, to the bit."""
    ref = torch.load(REFERENCE)
    model = tiny_gpt(attention='inattention')
    logits, _ = model(ref['idx'], ref['idx'])
    assert sum(p.numel() for p in model.parameters()) == ref['n_params']
    assert torch.equal(logits, ref['logits'])
