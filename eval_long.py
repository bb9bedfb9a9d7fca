"""
Does a model use a long context, and can it recall? Four measurements for any checkpoint
written by train.py (docs/attention.md sections 5, 6, 9 and 10):

  loss     validation loss by position bucket at a chosen context length: does the loss keep
           falling as the model sees more of the text, and where does it stop improving?
  passkey  a 5-digit key hidden in filler text (prepare_data.passkey_sample), by total length and
           needle depth: exact match of the greedy decode of the key, and per-digit accuracy under
           teacher forcing
  mqar     multi-query associative recall (prepare_data.mqar_sample) on the validation sequences
           of an MQAR dataset: the share of queries whose value is the argmax, and the loss there
  curves   the training and validation loss curves of runs, read from the log.jsonl train.py
           writes beside each ckpt.pt: a table and, with --plot, one PNG to compare them
  gain     which tokens gain from a long context: every validation token scored with its long
           context (up to the model's window) and with only the last --short tokens; the mean
           gain, and the gain of the tokens that gain most, chosen on one half of the split and
           reported on the other
  heads    why a model recalls or not: per block and head, the attention weight on the previous
           token (a previous-token head, the first half of an induction head) and, on MQAR, on the
           value a query must fetch; and a linear probe of the initial states s for the previous
           token (does s carry it, as InAttention over a causal prefix needs?)

    python eval_long.py --ckpt=out-inattn-long --context=256 --plot=loss_by_position.png
    python eval_long.py --ckpt=out-inattn-shakespeare-char,out-inattn-long --context=256 \
        --extend=interpolate
    python eval_long.py --ckpt=out-inattn-passkey --mode=passkey --lengths=[256,512,1024]
    python eval_long.py --ckpt=out-mqar,out-inattn-mqar --mode=mqar
    python eval_long.py --ckpt=out-mqar,out-inattn-mqar --mode=heads
    python eval_long.py --ckpt=out-shakespeare-char,out-inattn-shakespeare-char --mode=curves \
        --plot=curves.png
    python eval_long.py --ckpt=out-long,out-inattn-long --mode=gain --short=64

Several checkpoints (comma-separated) are compared side by side on the same windows and the
same keys. The loss windows start every --stride tokens (default: the bucket width) over
val.bin, so every bucket scores the same text and a difference between buckets is the effect
of the context alone. A model with learned positions cannot read past its block_size:
--extend=interpolate|copy grows its position table in memory first (no training); without
it, longer passkey lengths are reported as n/a and a longer loss context is an error. Models
without positions (pos_emb='none': Lightning, Infini-attention) run at any length. The
passkey keys are the evaluation keys (prepare_data.is_eval_key), never seen in training.
"""
import copy
import json
import os
import sys

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

import prepare_data
from checkpoint import (build_model, data_folder, dataset_meta, load_checkpoint, load_tokenizer,
                        prepare_dataset)
from configurator import configure_or_exit, die
from model import CausalSelfAttention, InAttention, attention_weights

DEPTH_NAMES = {0.0: 'start', 0.5: 'middle', 1.0: 'end'}

defaults = dict(
    ckpt='out-inattn-long',  # a checkpoint folder (holding ckpt.pt) or file;
                             # several, comma-separated
    mode='loss',             # 'loss' | 'passkey' | 'both' (loss and passkey) | 'mqar' |
                             # 'heads' (previous-token heads, recall, probes of s) |
                             # 'curves' (loss curves from each run's log.jsonl)
    dataset='',              # loss, mqar: validation data; '' = each checkpoint's own dataset
    context=0,               # loss: window length in tokens; 0 = the first checkpoint's block_size
    bucket=0,                # loss: positions per bucket; 0 = context // 8;
                             # mqar: distance per bucket; 0 = 64
    stride=0,                # loss: tokens between window starts;
                             # 0 = the bucket width (see loss_by_position)
    offset=0,                # loss: read the windows at positions offset.. (empty context
                             # before them): later positions, the same context
    short=64,                # gain: the short context, in tokens
    windows=0,               # loss, gain: at most this many windows from
                             # the start of val.bin; 0 = all that fit
    plot='',                 # loss: write the loss-by-position curves to this PNG;
                             # mqar: accuracy by distance;
                             # heads: the attention maps of the first sequence;
                             # curves: the runs' train and val loss curves
    mark=0,                  # loss: draw a vertical line at this position
                             # in the plot (e.g. the original block)
    extend='',               # '' | 'interpolate' | 'copy':
                             # grow learned positions in memory to reach a length
    lengths=[],              # passkey: total lengths (prompt + key);
                             # [] = 1x, 2x, 4x the first block_size
    depths=[0.0, 0.5, 1.0],  # passkey: needle depth, 0 = start of the text,
                             # 1 = right before the question
    samples=50,              # passkey: keys per (length, depth) cell
    sequences=0,             # mqar: score the first N validation sequences; 0 = all
                             # heads: look at N sequences or windows; 0 = 256
    batch_size=16,
    seed=1337,               # passkey: the keys and the filler cut of every cell
    device='cpu',
)


def load(path, device):
    """A GPT (eval mode) and its checkpoint dict from a
    train.py checkpoint file or a folder holding ckpt.pt."""
    file = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        die(f"no checkpoint at {file}: train one with train.py, or pass --ckpt=FOLDER_OR_FILE")
    ckpt = load_checkpoint(file)  # a truncated or foreign file is a one-line error
    return build_model(ckpt, file).eval().to(device), ckpt


def at_length(model, length, extend):
    """The model able to read `length` tokens: itself, a copy whose position table is extended
    in memory, or None when its learned positions stop short and no extension was asked for."""
    if model.transformer.wpe is None or length <= model.config.block_size:
        return model
    if not extend:
        return None
    model = copy.deepcopy(model)
    model.extend_block_size(length, extend)
    return model


def dataset_dir(ckpt, dataset):
    """The folder of `dataset`, or of the checkpoint's own dataset; prepared if it is not yet."""
    name = dataset or ckpt['config']['dataset']
    data_dir = data_folder(name)
    if not prepare_data.is_prepared(data_dir):
        prepare_dataset(name)
    return data_dir


def val_data(ckpt, dataset):
    """The validation tokens (np.memmap) of `dataset`, or of the checkpoint's own dataset."""
    return np.memmap(os.path.join(dataset_dir(ckpt, dataset), 'val.bin'), dtype=np.uint16, mode='r')


def encoder(meta):
    """text -> token ids in the checkpoint's vocabulary;
    a character vocabulary must hold the passkey's characters."""
    name, encode, _ = load_tokenizer(meta)
    missing = ''.join(sorted(prepare_data.PASSKEY_CHARS - set(meta.get('stoi', ()))))
    if name == 'char' and missing:
        raise ValueError(f"the model's vocabulary has no {missing!r}: passkey needs a model "
                         f"trained on a vocabulary with digits, e.g. "
                         f"dataset='shakespeare_char_passkey'")
    return encode


def save_png(fig, path, dpi=130):
    """Write a matplotlib figure to path as a PNG, whole (a temp file, then renamed), and close it."""
    import matplotlib.pyplot as plt
    tmp = f'{path}.{os.getpid()}.tmp'
    fig.savefig(tmp, dpi=dpi, format='png')
    plt.close(fig)
    os.replace(tmp, path)
    print(f'wrote {path}')


# -----------------------------------------------------------------------------
# loss by position

def window_starts(n_tokens, context, stride, windows):
    """Start of every `stride`-th window of `context` tokens from the
    beginning of the data; the first `windows` of them (0 = all that fit)."""
    return torch.arange(0, n_tokens - context, stride)[:windows or None]


@torch.no_grad()
def loss_by_position(model, data, context, stride, windows, batch_size, device='cpu', offset=0):
    """Mean next-token loss at each position 0..context-1 (a (context,) tensor) over
    windows that start every `stride` tokens from the beginning of `data` (`windows` of
    them; 0 = all that fit). With the stride dividing the bucket width, every bucket of
    positions scores the same tokens, each the same number of times (but for the first
    and last `context` tokens of the span), so a difference between buckets comes from
    the context alone, not from which text happened to land there. With an offset, the windows
    are read at positions offset .. offset + context - 1, as if offset tokens came before that
    the model cannot see: the same context at later positions."""
    if len(data) <= context:
        raise ValueError(f"the validation data has {len(data)} tokens, "
                         f"too few for context={context}")
    ix = window_starts(len(data), context, stride, windows)
    total = torch.zeros(context)
    for i in tqdm(range(0, len(ix), batch_size), desc=f'loss at context {context}', leave=False,
                  disable=None):
        starts = ix[i:i + batch_size]
        x = torch.stack([torch.from_numpy(data[j:j + context].astype(np.int64)) for j in starts])
        y = torch.stack([torch.from_numpy(data[j + 1:j + 1 + context].astype(np.int64))
                         for j in starts])
        cache = None
        if offset:  # an empty decoding state that starts counting positions at offset
            cache = model.new_cache()
            cache.pos = offset
        logits, _ = model(x.to(device), y.to(device), cache=cache)  # (B, T, V)
        loss = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction='none')  # (B, T)
        total += loss.sum(0).cpu()  # (T,)
    return total / len(ix)


@torch.no_grad()
def token_losses(model, data, context, short, windows, batch_size, device='cpu'):
    """-> (index, long, short_loss), (n,) each: for the tokens data[index], the loss read with a
    long context and with only the `short` tokens before each. Long: windows of `context` tokens
    every context - short tokens, each scoring its positions short .. context-1, so every token
    is scored once, with short to context-1 tokens before it. Short: the `short` tokens before
    the token read as a window of their own, at positions 0 .. short-1 (the position-0 anchor
    kept, as in training). Tokens with fewer than `short` tokens before them are left out."""
    if len(data) <= context:
        raise ValueError(f"the validation data has {len(data)} tokens, "
                         f"too few for context={context}")
    tokens = lambda a, b: torch.from_numpy(data[a:b].astype(np.int64))  # noqa: E731
    starts = window_starts(len(data), context, context - short, windows)
    index, long = [], []
    for i in tqdm(range(0, len(starts), batch_size), desc='long context', leave=False,
                  disable=None):
        js = starts[i:i + batch_size].tolist()
        x = torch.stack([tokens(j, j + context) for j in js]).to(device)
        y = torch.stack([tokens(j + 1, j + 1 + context) for j in js]).to(device)
        logits, _ = model(x, y)  # (B, T, V)
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction='none')  # (B, T)
        long.append(loss[:, short - 1:-1].reshape(-1).cpu())  # predicting data[j + short ..]
        index += [j + t for j in js for t in range(short, context)]
    index = torch.tensor(index)
    short_loss = []
    for i in tqdm(range(0, len(index), batch_size * 8), desc='short context', leave=False,
                  disable=None):
        ts = index[i:i + batch_size * 8].tolist()
        x = torch.stack([tokens(t - short, t) for t in ts]).to(device)
        y = torch.stack([tokens(t - short + 1, t + 1) for t in ts]).to(device)
        logits, _ = model(x, y)
        short_loss.append(F.cross_entropy(logits[:, -1], y[:, -1], reduction='none').cpu())
    return index, torch.cat(long), torch.cat(short_loss)


def split_half_gain(keys, gain, fraction, min_count=5):
    """Selection on one half, report on the other. keys (n,) label each token (its bigram),
    gain (n,) its loss with the short context minus with the long. On the first half of the
    tokens, the keys seen at least min_count times are ranked by their mean gain, and the best
    are taken until they cover `fraction` of that half's tokens. -> (gain on the second half's
    tokens of those keys, their share of the second half, in-sample gain on the first half,
    the keys best first). Picking the top tokens and scoring them on the same tokens would make
    any noise look like a gain; on the other half only a real one remains."""
    half = len(keys) // 2
    a_keys, a_gain, b_keys, b_gain = keys[:half], gain[:half], keys[half:], gain[half:]
    found, inverse, counts = np.unique(a_keys, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=a_gain) / counts
    order = [i for i in np.argsort(-means) if counts[i] >= min_count]
    chosen, covered = [], 0
    for i in order:
        if covered >= fraction * half:
            break
        chosen.append(found[i])
        covered += counts[i]
    a_in, b_in = np.isin(a_keys, chosen), np.isin(b_keys, chosen)
    if not chosen:
        return float('nan'), 0.0, float('nan'), chosen
    return b_gain[b_in].mean(), b_in.mean(), a_gain[a_in].mean(), chosen


def buckets(per_position, width):
    """[(first, last + 1, mean loss)] over consecutive positions, `width` at a time."""
    T = len(per_position)
    return [(lo, min(lo + width, T), per_position[lo:lo + width].mean().item())
            for lo in range(0, T, width)]


def plot_losses(curves, width, mark, path):
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, per_position in curves.items():
        line, = ax.plot(per_position.numpy(), alpha=0.25, linewidth=0.8)
        rows = buckets(per_position, width)
        ax.step([lo for lo, _, _ in rows] + [rows[-1][1]], [m for _, _, m in rows] + [rows[-1][2]],
                where='post', color=line.get_color(), label=name)
    if mark:
        ax.axvline(mark, color='gray', linestyle='--', linewidth=1)
    ax.set_xlabel('position in the window (tokens of context before the prediction)')
    ax.set_ylabel('validation loss (nats)')
    ax.set_title(f'loss by position: every position (faint) and buckets of {width}')
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)


# -----------------------------------------------------------------------------
# loss curves of training runs

def read_log(name):
    """The records of the run of checkpoint `name` (a folder, or a .pt file in one): the log.jsonl
    train.py writes beside ckpt.pt. A line cut short (a crash) is skipped."""
    folder = os.path.dirname(name) or '.' if name.endswith('.pt') else name
    path = os.path.join(folder, 'log.jsonl')
    if not os.path.isfile(path):
        die(f"{name}: no {path}: train.py writes it beside ckpt.pt (runs trained before it did "
            f"have none); pass the run's out_dir", status=2)
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def plot_curves(runs, path):
    """One PNG: each run's training loss at the logged iterations (faint) and validation loss at
    its evaluations (dots), in one color per run."""
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, records in runs.items():
        train = [(r['iter'], r['loss']) for r in records if r['kind'] == 'train']
        val = [(r['iter'], r['val_loss']) for r in records if r['kind'] == 'eval']
        color = None  # the run's color: the train curve's, taken again by the val curve
        if train:
            line, = ax.plot(*zip(*train), alpha=0.35, linewidth=0.8, label=f'{name} train')
            color = line.get_color()
        if val:
            ax.plot(*zip(*val), marker='o', markersize=3, color=color, label=f'{name} val')
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss (nats)')
    ax.set_title('training loss (faint: logged iterations), validation loss (dots: evaluations)')
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def training_curves(names, path):
    """The table of each run's evaluations: the last, and the best after iteration 0 (what
    ckpt.pt holds with always_save_checkpoint=False); and the plot."""
    runs = {name.removesuffix('/ckpt.pt').rstrip('/'): read_log(name) for name in names}
    print('| run | iterations | last val loss | best val loss (iteration) |\n|---|---:|---:|---:|')
    for name, records in runs.items():
        evals = [r for r in records if r['kind'] == 'eval' and r['iter'] > 0]
        last = max((r['iter'] for r in records), default=0)
        best = min(evals, key=lambda r: r['val_loss'], default=None)
        shown = '- | -'
        if best:
            shown = f"{evals[-1]['val_loss']:.4f} | {best['val_loss']:.4f} ({best['iter']})"
        print(f'| {name} | {last} | {shown} |')
    if path:
        plot_curves(runs, path)


# -----------------------------------------------------------------------------
# passkey retrieval

@torch.no_grad()
def passkey(model, encode, length, depth, samples, batch_size, seed, device='cpu'):
    """(exact match, per-digit accuracy) over `samples` evaluation keys at one total
    length and needle depth. Exact: the greedy decode (the model's own cached decoding)
    equals the key. Per digit: under teacher forcing, the argmax at each key position
    given the true digits before it."""
    # the same keys for every model
    rng = np.random.default_rng([seed, length, round(1000 * depth)])
    keys = rng.choice(prepare_data.passkey_keys('eval'), samples, replace=False)
    cases = [prepare_data.passkey_sample(encode, int(k), length, depth) for k in keys]
    exact = per_digit = 0.0
    for i in range(0, samples, batch_size):
        batch = cases[i:i + batch_size]
        prompt = torch.tensor([p for p, _ in batch], device=device)  # (B, length - A)
        answer = torch.tensor([a for _, a in batch], device=device)  # (B, A)
        A = answer.size(1)
        decoded = model.generate(prompt, A, temperature=0)[:, -A:]
        exact += (decoded == answer).all(dim=1).sum().item()
        x = torch.cat([prompt, answer[:, :-1]], dim=1)  # (B, length - 1)
        logits, _ = model(x, x)  # targets only so that logits come back at every position
        per_digit += (logits[:, -A:].argmax(-1) == answer).float().mean(dim=1).sum().item()
    return exact / samples, per_digit / samples


# -----------------------------------------------------------------------------
# MQAR: recall of many keys (docs/attention.md section 10)

def mqar_val(name, ckpt, dataset):
    """-> (folder, meta, tokens, targets): the validation sequences of an MQAR dataset, (samples,
    T) each, for the checkpoint `name`; anything else stops with one line."""
    data_dir = dataset_dir(ckpt, dataset)
    meta = dataset_meta(data_dir)
    if 'mqar' not in meta:
        die(f"{name}: {data_dir} is no MQAR dataset (its meta.pkl has no 'mqar'): pass "
            f"--dataset=mqar_T64_N8_V256 or another folder of prepare_data.py mqar", status=2)
    if meta['vocab_size'] != ckpt['meta']['vocab_size']:
        die(f"{name}: {data_dir} has {meta['vocab_size']} ids, the model was trained on "
            f"{ckpt['meta']['vocab_size']}: pass --dataset=FOLDER of the same vocab", status=2)
    try:
        tokens, targets = prepare_data.read_mqar(data_dir, 'val', meta['mqar']['seq_len'])
    except prepare_data.PrepareError as e:
        die(e)
    return data_dir, meta, tokens, targets


@torch.no_grad()
def mqar_recall(model, tokens, targets, batch_size, device='cpu'):
    """(accuracy, loss) over the recall positions of MQAR sequences, those whose target is not -1:
    the share of queries where the argmax of the logits is the value, and the mean cross-entropy
    there. No other position counts: recalling every value scores 1.0, whatever comes elsewhere."""
    right = queries = 0
    loss = 0.0
    for i in tqdm(range(0, len(tokens), batch_size), desc='mqar', leave=False, disable=None):
        x = torch.from_numpy(tokens[i:i + batch_size].astype(np.int64)).to(device)
        y = torch.from_numpy(targets[i:i + batch_size].astype(np.int64)).to(device)
        logits, _ = model(x, y)  # (B, T, V) at every position
        at = y != -1  # the recall positions
        right += (logits[at].argmax(-1) == y[at]).sum().item()
        loss += F.cross_entropy(logits[at], y[at], reduction='sum').item()
        queries += at.sum().item()
    return right / queries, loss / queries


def query_distances(tokens, targets, pairs):
    """(samples, T) int: at each recall position, how far the query comes after the value it
    must fetch (query position - the value's position, which is right after the key's place in
    the pairs); -1 at every other position."""
    keys = tokens[:, 0:2 * pairs:2]  # (n, N)
    first = (tokens[:, :, None] == keys[:, None, :]).argmax(-1)  # (n, T): the key's pair index
    distance = np.arange(tokens.shape[1])[None, :] - (2 * first + 1)
    return np.where(targets != -1, distance, -1)


@torch.no_grad()
def mqar_by_distance(model, tokens, targets, pairs, width, batch_size, device='cpu'):
    """-> [(lo, hi, accuracy, queries)]: MQAR accuracy of the queries whose distance to their
    value (query_distances) lies in [lo, hi), buckets of `width` tokens, empty buckets left out."""
    distance = query_distances(tokens, targets, pairs)
    right = np.zeros(tokens.shape, dtype=bool)
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size].astype(np.int64)).to(device)
        logits, _ = model(x, x)  # (B, T, V) at every position
        y = torch.from_numpy(targets[i:i + batch_size].astype(np.int64)).to(device)
        right[i:i + batch_size] = (logits.argmax(-1) == y).cpu().numpy()
    rows = []
    for lo in range(0, tokens.shape[1], width):
        at = (distance >= lo) & (distance < lo + width)
        if at.any():
            rows.append((lo, lo + width, right[at].mean(), int(at.sum())))
    return rows


# -----------------------------------------------------------------------------
# Heads: can this model build an induction head? (docs/attention.md section 9)

@torch.no_grad()
def attention_maps(model, x):
    """-> (maps, s) for tokens x (B, T): per block, the attention weights (B, H, T, T) of its
    softmax heads (None for Lightning and Infini-attention), and the initial states s (B, T, C)
    that InAttention's keys and values are made of (None without them)."""
    maps, held = [], {}

    def weights(attn, args):  # called with the block's (ln_1(x), s, cache) before attn runs
        x, s = args[0], args[1]
        if type(attn) not in (CausalSelfAttention, InAttention):
            maps.append(None)
            return
        C = x.size(-1)
        Wq, Wk, _ = attn.c_attn.weight.split(C)
        bq, bk = (None, None) if attn.c_attn.bias is None else attn.c_attn.bias.split(C)[:2]
        q = attn.split_heads(F.linear(x, Wq, bq))
        k = attn.split_heads(F.linear(s if attn.reads_s else x, Wk, bk))  # (B, H, T, hd)
        maps.append(attention_weights(q, k))

    hooks = [b.attn.register_forward_pre_hook(weights) for b in model.transformer.h]
    ln_in = model.transformer.ln_in
    if ln_in is not None:
        hooks.append(ln_in.register_forward_hook(lambda mod, args, out: held.update(s=out)))
    model(x)
    for h in hooks:
        h.remove()
    return maps, held.get('s')


def probe(features, labels, train):
    """Accuracy of a linear read-out that predicts labels (n,) from features (n, C): multinomial
    logistic regression fitted (L-BFGS, full batch, a little L2) on the rows where `train` is
    True, scored on the other rows."""
    X, y = features.float(), labels
    W = torch.zeros(X.size(1), int(y.max()) + 1, device=X.device, requires_grad=True)
    b = torch.zeros(W.size(1), device=X.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn='strong_wolfe')

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(X[train] @ W + b, y[train]) + 1e-4 * W.square().sum()
        value.backward()
        return value
    with torch.enable_grad():
        optimizer.step(loss)
    with torch.no_grad():
        return ((X[~train] @ W + b).argmax(-1) == y[~train]).double().mean().item()


def head_report(model, x, at, recall=None):
    """What a model's heads do on tokens x (B, T), at the positions where `at` (B, T) is True
    (never position 0): per block and head, the mean weight on the previous token (a
    previous-token head puts most of its weight there); with `recall` (B, T), the position of the
    value each recall position must fetch (-1 elsewhere), the mean weight on it; and, if the model
    has initial states, how well a linear probe reads from s the tokens 1, 2 and 3 before and the
    current token (the token shift puts the previous ones there)."""
    maps, s = attention_maps(model, x)
    b, t = at.nonzero(as_tuple=True)
    rows = []
    for i, att in enumerate(maps):
        name = type(model.transformer.h[i].attn).__name__
        if att is None:
            rows.append((i, name, None, None))
            continue
        prev = att[b, :, t, t - 1].mean(0)  # (H,)
        fetch = None
        if recall is not None:
            rb, rt = (recall != -1).nonzero(as_tuple=True)
            fetch = att[rb, :, rt, recall[rb, rt]].mean(0)
        rows.append((i, name, prev, fetch))
    result = dict(rows=rows, uniform=(1.0 / (t + 1)).mean().item())  # prev of an even spread
    if s is not None:
        train = b < x.size(0) // 2  # fit on the first half of the sequences, score on the rest
        back = []  # the tokens 1, 2, 3 before (where there are that many)
        for i in (1, 2, 3):
            has = t >= i
            back.append(probe(s[b[has], t[has]], x[b[has], t[has] - i], train[has]))
        labels = x[b, t - 1]
        result['probe'] = (*back, probe(s[b, t], x[b, t], train),
                           (labels[~train] == labels[train].mode().values).double().mean().item())
    return result


def plot_by_distance(by_distance, path):
    """by_distance: name -> [(lo, hi, accuracy, queries)], drawn as accuracy against distance."""
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in by_distance.items():
        ax.plot([(lo + hi - 1) / 2 for lo, hi, _, _ in rows], [100 * a for _, _, a, _ in rows],
                marker='o', label=os.path.basename(name))
    ax.set_xlabel('distance from the query back to its value (tokens, bucket centres)')
    ax.set_ylabel('MQAR accuracy %')
    ax.set_ylim(0, 101)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def plot_heads(maps, path):
    """maps: name -> the attention maps of one sequence (None for a block without softmax heads),
    drawn as one row of (T, T) images per checkpoint, a panel per block and head."""
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt
    panels = {n: [(i, h, a[0, h]) for i, a in enumerate(m) if a is not None
                  for h in range(a.size(1))] for n, m in maps.items()}
    cols = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(panels), cols, figsize=(2.2 * cols, 2.4 * len(panels)),
                             squeeze=False)
    for ax_row, (name, row) in zip(axes, panels.items()):
        for ax, (i, h, att) in zip(ax_row, row):
            ax.imshow(att.cpu().numpy(), cmap='Blues', vmin=0, vmax=1)
            ax.set_title(f'{os.path.basename(name)}\nblock {i}, head {h}', fontsize=7)
            ax.set_xlabel('key position', fontsize=6)
            ax.set_ylabel('query position', fontsize=6)
            ax.tick_params(labelsize=5)
        for ax in ax_row[len(row):]:
            ax.axis('off')
    fig.tight_layout()
    save_png(fig, path)


def head_inputs(ckpt, dataset, sequences, block_size):
    """-> (x, at, recall): tokens (B, T) to look at. MQAR: the first validation sequences, the
    positions of the values in the pairs (the previous token there is the key, which recall
    must find), and where each query's value sits. Text: windows of
    block_size tokens from the start of val.bin, every position but the first, no recall."""
    data_dir = dataset_dir(ckpt, dataset)
    meta = dataset_meta(data_dir)
    if 'mqar' in meta:
        T, pairs = meta['mqar']['seq_len'], meta['mqar']['pairs']
        tokens, targets = prepare_data.read_mqar(data_dir, 'val', T)
        x = torch.from_numpy(tokens[:sequences].astype(np.int64))
        y = torch.from_numpy(targets[:sequences].astype(np.int64))
        at = torch.zeros_like(x, dtype=torch.bool)
        at[:, 1:2 * pairs:2] = True
        # the value of query key x[t] sits right after that key's first place
        first = (x[:, :2 * pairs:2].unsqueeze(1) == x.unsqueeze(2)).float().argmax(-1)  # (B, T)
        recall = torch.where(y != -1, 2 * first + 1, -1)
        return x, at, recall
    data = val_data(ckpt, dataset)
    starts = window_starts(len(data), block_size, block_size, sequences)
    x = torch.stack([torch.from_numpy(data[j:j + block_size].astype(np.int64)) for j in starts])
    at = torch.ones_like(x, dtype=torch.bool)
    at[:, 0] = False
    return x, at, None


def decoder(meta):
    """token ids -> text in the checkpoint's vocabulary (characters or GPT-2's BPE)."""
    if 'stoi' in meta:
        return lambda ids: ''.join(meta['itos'][i] for i in ids)
    return prepare_data.get_encoding().decode


def print_gain(models, cfg):
    """--mode=gain: the table of token_losses and split_half_gain, and the tokens behind it."""
    short = cfg['short']
    print(f"\ngain from context: loss with only the last {short} tokens minus loss with the long "
          f"context (nats; > 0: the long context helps). Top tokens: the bigrams (previous token, "
          f"token) of largest mean gain on the first half of the split, seen >= 5 times there, "
          f"covering 1% / 10% of its tokens; their gain on the second half (in-sample first-half "
          f"gain in brackets)")
    print('| checkpoint | context | tokens | mean gain | top 1% | top 10% |\n|---|---:|---:|---:|'
          '---:|---:|')
    examples = {}
    for name, (model, ckpt) in models.items():
        context = cfg['context'] or model.config.block_size
        if not 0 < short < context:
            die(f"short={short} must be between 1 and the context {context} - 1", status=2)
        m = at_length(model, context, cfg['extend'])
        if m is None:
            die(f"{name}: context={context} is past its block_size={model.config.block_size}: "
                f"pass --extend=interpolate or --extend=copy", status=2)
        data = val_data(ckpt, cfg['dataset'])
        index, long, short_loss = token_losses(m, data, context, short, cfg['windows'],
                                               cfg['batch_size'], cfg['device'])
        gain = (short_loss - long).numpy()
        idx = index.numpy()
        keys = data[idx - 1].astype(np.int64) * 65536 + data[idx]  # the bigram
        top = {f: split_half_gain(keys, gain, f) for f in (0.01, 0.1)}
        shown = [f'{b:+.4f} ({a:+.4f})' for b, _, a, _ in top.values()]
        print(f'| {name} | {context} | {len(gain)} | {gain.mean():+.4f} | ' + ' | '.join(shown)
              + ' |')
        examples[name] = (data, idx, keys, gain, top[0.01][3][:5], decoder(ckpt['meta']))
    for name, (data, idx, keys, gain, best, decode) in examples.items():
        print(f'\n{name}: the top bigrams of the first half, their gain on the second half, and '
              f'one place there (the token in [brackets])')
        second = np.arange(len(keys)) >= len(keys) // 2
        for key in best:
            at = second & (keys == key)
            if not at.any():
                continue
            t = int(idx[at][0])
            before = decode(data[max(t - 40, 0):t].tolist())
            print(f'  {decode([key // 65536, key % 65536])!r}: {gain[at].mean():+.3f} nats over '
                  f'{at.sum()} tokens, e.g. {before!r}[{decode([int(data[t])])}]')


# -----------------------------------------------------------------------------

def main(argv):
    cfg = configure_or_exit(defaults, argv)
    modes = ('loss', 'passkey', 'both', 'mqar', 'heads', 'gain', 'curves')
    if cfg['mode'] not in modes:
        die(f"mode={cfg['mode']!r} is not one of {', '.join(modes)}", status=2)
    if cfg['mode'] == 'curves':  # from the logs: no model is loaded
        training_curves(cfg['ckpt'].split(','), cfg['plot'])
        return
    if cfg['extend'] not in ('', 'interpolate', 'copy'):
        die(f"extend={cfg['extend']!r} is not one of '', interpolate, copy", status=2)
    for key in ('context', 'bucket', 'stride', 'windows', 'sequences', 'offset'):
        if cfg[key] < 0:
            die(f"{key}={cfg[key]} must not be negative (0 chooses the default)", status=2)
    torch.manual_seed(cfg['seed'])
    models = {}  # label (the path as given) -> (model, checkpoint)
    for path in cfg['ckpt'].split(','):
        models[path.removesuffix('/ckpt.pt').rstrip('/')] = load(path, cfg['device'])
    for name, (model, _) in models.items():
        c = model.config
        prefix = f", inattn_prefix={c.inattn_prefix}" if c.inattn_prefix else ''
        prefix += f", inattn_shift={c.inattn_shift}" if c.inattn_shift else ''
        print(f"{name}: attention={c.attention}{prefix}, pos_emb={c.pos_emb}, block_size="
              f"{c.block_size}, {model.get_num_params() / 1e6:.2f}M parameters")
    first = next(iter(models.values()))[0].config.block_size
    names = list(models)

    if cfg['mode'] in ('loss', 'both'):
        context = cfg['context'] or first
        width = cfg['bucket'] or max(context // 8, 1)
        stride = cfg['stride'] or width
        curves = {}
        for name, (model, ckpt) in models.items():
            m = at_length(model, cfg['offset'] + context, cfg['extend'])
            if m is None:
                die(f"{name}: offset + context = {cfg['offset'] + context} is past its block_size="
                    f"{model.config.block_size} (learned positions): pass --extend=interpolate or "
                    f"--extend=copy to grow its position table in memory", status=2)
            data = val_data(ckpt, cfg['dataset'])
            curves[name] = loss_by_position(m, data, context, stride, cfg['windows'],
                                            cfg['batch_size'], cfg['device'], cfg['offset'])
        n = len(window_starts(len(data), context, stride, cfg['windows']))
        print(f"\nvalidation loss by position, context {context}, {n} windows starting every "
              f"{stride} tokens"
              + (f", read at positions {cfg['offset']}.. (rows: position in the window)"
                 if cfg['offset'] else '')
              + (f", positions extended in memory by {cfg['extend']!r}" if cfg['extend'] else ''))
        print('| positions | ' + ' | '.join(names) + ' |\n|---|' + '---|' * len(names))
        table = {name: buckets(c, width) for name, c in curves.items()}
        for b, (lo, hi, _) in enumerate(table[names[0]]):
            print(f'| {lo}-{hi - 1} | ' + ' | '.join(f'{table[n][b][2]:.4f}' for n in names) + ' |')
        print('| all | ' + ' | '.join(f'{curves[n].mean().item():.4f}' for n in names) + ' |')
        if cfg['plot']:
            plot_losses(curves, width, cfg['mark'], cfg['plot'])

    if cfg['mode'] in ('passkey', 'both'):
        lengths = cfg['lengths'] or [first, 2 * first, 4 * first]
        results = {}  # (name, length, depth) -> (exact, per-digit) or None
        cells = [(n, L, d) for n in names for L in lengths for d in cfg['depths']]
        encoders = {}
        for name, (model, ckpt) in models.items():
            try:
                encoders[name] = encoder(ckpt['meta'])
            except ValueError as e:
                die(f"{name}: {e}", status=2)
        for name, L, d in tqdm(cells, desc='passkey', disable=None):
            m = at_length(models[name][0], L, cfg['extend'])
            results[name, L, d] = None if m is None else passkey(
                m, encoders[name], L, d, cfg['samples'], cfg['batch_size'], cfg['seed'],
                cfg['device'])
        print(f"\npasskey retrieval: exact match % / per-digit % over {cfg['samples']} evaluation "
              f"keys per cell"
              + (f", positions extended in memory by {cfg['extend']!r}" if cfg['extend'] else
                 "; n/a: past the learned positions (try --extend)"))
        print('| length | depth | ' + ' | '.join(names) + ' |\n|---|---|' + '---|' * len(names))
        for L in lengths:
            for d in cfg['depths']:
                row = [results[n, L, d] for n in names]
                shown = ['n/a' if r is None else f'{100 * r[0]:.0f} / {100 * r[1]:.0f}'
                         for r in row]
                print(f'| {L} | {DEPTH_NAMES.get(d, d)} | ' + ' | '.join(shown) + ' |')

    if cfg['mode'] == 'mqar':
        rows = {}  # name -> (dataset, 'sequences (queries)', accuracy, loss)
        by_distance = {}  # name -> [(lo, hi, accuracy, queries)]
        for name, (model, ckpt) in models.items():
            data_dir, meta, tokens, targets = mqar_val(name, ckpt, cfg['dataset'])
            T = meta['mqar']['seq_len']
            m = at_length(model, T, cfg['extend'])
            if m is None:
                die(f"{name}: the sequences of {data_dir} have {T} tokens, past its block_size="
                    f"{model.config.block_size} (learned positions): pass --extend=interpolate or "
                    f"--extend=copy", status=2)
            tokens, targets = tokens[:cfg['sequences'] or None], targets[:cfg['sequences'] or None]
            accuracy, loss = mqar_recall(m, tokens, targets, cfg['batch_size'], cfg['device'])
            queries = int((targets != -1).sum())
            rows[name] = (os.path.basename(data_dir), f'{len(tokens)} ({queries})', accuracy, loss)
            by_distance[name] = mqar_by_distance(m, tokens, targets, meta['mqar']['pairs'],
                                                 cfg['bucket'] or 64, cfg['batch_size'],
                                                 cfg['device'])
        print('\nMQAR recall on the validation sequences: accuracy % (argmax = the value) and loss '
              'at the recall positions only')
        print('| | ' + ' | '.join(names) + ' |\n|---|' + '---|' * len(names))
        print('| dataset | ' + ' | '.join(rows[n][0] for n in names) + ' |')
        print('| sequences (queries) | ' + ' | '.join(rows[n][1] for n in names) + ' |')
        print('| accuracy % | ' + ' | '.join(f'{100 * rows[n][2]:.2f}' for n in names) + ' |')
        print('| loss (nats) | ' + ' | '.join(f'{rows[n][3]:.4f}' for n in names) + ' |')
        print('\nMQAR accuracy % by distance from the query back to its value (queries)')
        print('| distance | ' + ' | '.join(names) + ' |\n|---|' + '---:|' * len(names))
        cells = {(n, lo): f'{100 * a:.2f} ({q})' for n in names for lo, _, a, q in by_distance[n]}
        width = cfg['bucket'] or 64
        for lo in sorted({lo for n in names for lo, *_ in by_distance[n]}):
            print(f'| {lo}-{lo + width - 1} | '
                  + ' | '.join(cells.get((n, lo), '-') for n in names) + ' |')
        if cfg['plot']:
            plot_by_distance(by_distance, cfg['plot'])

    if cfg['mode'] == 'gain':
        print_gain(models, cfg)

    if cfg['mode'] == 'heads':
        print("\nheads: mean attention weight on the previous token ('prev') and, on MQAR, on the "
              "value a query must fetch ('fetch'), per head; linear probes of s")
        print('| checkpoint | block | attention | prev, per head | fetch, per head | '
              'prev if spread evenly |\n|---|---:|---|---|---|---:|')
        probes = {}
        drawn = {}  # name -> the maps of the first sequence, for --plot
        for name, (model, ckpt) in models.items():
            x, at, recall = head_inputs(ckpt, cfg['dataset'], cfg['sequences'] or 256,
                                        model.config.block_size)
            report = head_report(model, x.to(cfg['device']), at, recall)
            if cfg['plot']:
                drawn[name] = attention_maps(model, x[:1].to(cfg['device']))[0]
            for i, attn, prev, fetch in report['rows']:
                shown = [' '.join(f'{w:.2f}' for w in v) if v is not None else '-'
                         for v in (prev, fetch)]
                print(f'| {name} | {i} | {attn} | ' + ' | '.join(shown)
                      + f" | {report['uniform']:.2f} |")
            if 'probe' in report:
                probes[name] = report['probe']
        if drawn:
            plot_heads(drawn, cfg['plot'])
        if probes:
            print("\nlinear probe of s (logistic regression, fitted on half of the sequences, "
                  "scored on the other half): accuracy % at the same positions")
            print('| checkpoint | previous token | 2 back | 3 back | current token | '
                  'most frequent previous token |\n|---|---:|---:|---:|---:|---:|')
            for name, accuracies in probes.items():
                print(f'| {name} | ' + ' | '.join(f'{100 * a:.1f}' for a in accuracies) + ' |')


if __name__ == '__main__':
    main(sys.argv[1:])
