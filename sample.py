"""
Sample from a trained model, printing the text as it is generated (nanoGPT's sample.py, streaming).

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --stats

The text is decoded with the vocabulary saved in the checkpoint (characters, or GPT-2 BPE via
tiktoken). A prompt longer than the context of a model with learned positions is cut to its last
block_size tokens (a note on stderr says so); characters outside a character vocabulary are an
error. --stats adds decode and prefill speed, and the memory of the decoding state: the bytes a
cache really holds after the final context, beside the model's formula for them. --gates prints an
Infini-attention model's gates.
"""
import codecs
import os
import sys
import time

import torch

from checkpoint import autocast_context, load_model, load_tokenizer
from configurator import configure_or_exit, die

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a checkpoint file or folder, or 'gpt2*'
out_dir = 'out'  # the folder train.py wrote ckpt.pt to
start = ''  # the prompt, or "FILE:path"; empty: "\n" for characters, <|endoftext|> for BPE
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = the model's distribution, < 1.0 = more conservative, 0 = greedy (argmax)
top_k = 200  # sample among the top_k most likely tokens only; 0 = all
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # or 'cpu', 'cuda:1', 'mps'
dtype = 'auto'  # 'float32' | 'bfloat16' | 'float16'; auto: bfloat16 on a GPU that has it, else fp32
use_cache = True  # decode from the model's cache (False: re-read the whole context for every token)
prefill_chunk = 0  # feed the prompt into the cache this many tokens at a time; 0 = all at once
stats = False  # print decode and prefill tokens/s, and the decoding state's memory
gates = False  # Infini-attention: print the memory's share sigmoid(β) per layer and head, and exit
compile = False  # torch.compile the model's forward (PyTorch 2; slow to start, for long samples)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def tokenizer(meta):
    """-> (encode: text -> ids, decode_stream: ids -> text pieces, the prompt for an empty one), by
    checkpoint.load_tokenizer's rule. A token can end in the middle of a UTF-8 character (BPE): its
    bytes wait in an incremental decoder until the character is complete."""
    name, encode, token_bytes = load_tokenizer(meta)  # MQAR's ids, no tokenizer named: one line

    def decode_stream(ids):
        utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
        for i in ids:
            yield utf8.decode(token_bytes(i))
        yield utf8.decode(b'', final=True)

    return encode, decode_stream, '\n' if name == 'char' else '<|endoftext|>'


def record(tokens, new_ids, times):
    """Pass on the ids of generate_tokens' (1, 1) tensors; note each id and its arrival time."""
    for idx_next in tokens:
        times.append(time.perf_counter())
        new_ids.append(idx_next.item())
        yield new_ids[-1]


def print_stats(model, x, new_ids, t0, times):
    """Prefill speed from the time to the first token, decode speed from the rest, and the decoding
    state generation held for its last token: measured from a cache filled with the same window,
    beside the model's formula."""
    n_prompt, n_new = x.size(1), len(new_ids)
    prefill = f"{n_prompt / (times[0] - t0):,.0f}"
    decode = f"{(n_new - 1) / (times[-1] - times[0]):,.0f}" if n_new > 1 else "n/a"
    print(f"stats: prefill {prefill} tokens/s ({n_prompt} prompt tokens, time to first token "
          f"{(times[0] - t0) * 1000:.1f}ms), decode {decode} tokens/s ({n_new} tokens)")
    # the window generation read when it drew the last token: every token but that last one, from
    # where the window rule (GPT.window_start) had slid to
    fed = torch.cat([x, torch.tensor([new_ids[:-1]], dtype=torch.long, device=x.device)], dim=1)
    start = 0
    for length in range(n_prompt, fed.size(1) + 1):
        start = model.window_start(length, start)
    context = fed[:, start:]
    cache = model.new_cache()
    model.prefill(context, cache, prefill_chunk or None)
    T = context.size(1)
    cache_dtype = cache.tensors()[0].dtype if cache.tensors() else torch.float32
    print(f"stats: decoding state after {T} tokens ({model.config.attention}, {cache_dtype}): "
          f"measured cache.nbytes() = {cache.nbytes():,} bytes, formula decode_state_bytes({T}) = "
          f"{model.decode_state_bytes(T, dtype=cache_dtype):,} bytes")


if __name__ == '__main__':
    globals().update(configure_or_exit(DEFAULTS, sys.argv[1:]))
    if max_new_tokens <= 0:
        die(f"max_new_tokens={max_new_tokens}: it must be at least 1", status=2)
    if num_samples <= 0:
        die(f"num_samples={num_samples}: it must be at least 1", status=2)
    if temperature < 0:
        die(f"temperature={temperature}: use 0 (greedy) or more", status=2)
    if top_k < 0:
        die(f"top_k={top_k}: use 0 (all tokens) or more", status=2)
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        die(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16", status=2)
    if start.startswith('FILE:'):
        if not os.path.isfile(start[5:]):
            die(f"--start={start}: no file {start[5:]!r}; pass FILE:path of a text file, or the "
                f"prompt itself")
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()

    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
    torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
    device_type = 'cuda' if 'cuda' in device else 'cpu'  # for autocast
    dtype, ctx = autocast_context(device_type, dtype)

    model, meta = load_model(init_from, out_dir)
    model.eval()
    if gates:  # A = sigmoid(β) A_mem + (1 - sigmoid(β)) A_dot: 0 = local only, 1 = memory only
        betas = [block.attn.beta for block in model.transformer.h if hasattr(block.attn, 'beta')]
        if not betas:
            die(f"--gates: a {model.config.attention!r} model has no memory gates (only "
                f"attention='infini' has)")
        for i, beta in enumerate(betas):
            shares = ' '.join(f"{g:.3f}" for g in torch.sigmoid(beta).tolist())
            print(f"layer {i}: sigmoid(beta) = {shares}")
        sys.exit(0)
    model.to(device)
    if compile:  # the forward that generation calls (dynamic: the context grows every token)
        model.forward = torch.compile(model.forward, dynamic=True)
    encode, decode_stream, empty_prompt = tokenizer(meta)
    ids = encode(start or empty_prompt)
    limit = model.config.block_size
    if model.transformer.wpe is not None and len(ids) > limit:  # learned positions: a bounded view
        print(f"note: the prompt has {len(ids)} tokens, more than the model's context of {limit}: "
              f"it is generated from the last {limit}", file=sys.stderr)
        ids = ids[-limit:]
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)

    with torch.no_grad(), ctx:
        for k in range(num_samples):
            print(start, end='', flush=True)
            new_ids, times = [], []  # the sampled token ids, and when each arrived
            t0 = time.perf_counter()
            tokens = model.generate_tokens(x, max_new_tokens, temperature, top_k or None, use_cache,
                                           prefill_chunk or None)
            for piece in decode_stream(record(tokens, new_ids, times)):
                print(piece, end='', flush=True)
            print('\n---------------')
            if stats:
                print_stats(model, x, new_ids, t0, times)
