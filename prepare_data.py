"""
Prepare a dataset for train.py: token ids in train.bin / val.bin (raw np.uint16, as nanoGPT)
and meta.pkl.

    python prepare_data.py shakespeare_char   # character vocabulary, ~1M chars
    python prepare_data.py shakespeare        # GPT-2 BPE (tiktoken r50k_base)
    python prepare_data.py shakespeare_char_passkey   # characters, with passkey-retrieval
                                                      # samples mixed in
    python prepare_data.py openwebtext --max_docs 100000 --num_proc 8
    python prepare_data.py mqar --seq_len 64 --pairs 8 --vocab 256   # data/mqar_T64_N8_V256/
    python prepare_data.py mqar_T64_N8_V256                          # the same, by its name
    python prepare_data.py text --input my.txt                       # any text: data/my/
    python prepare_data.py text --input my.txt --tokenizer gpt2 --out_dir data/my_bpe

meta.pkl is a pickled dict that names its tokenizer: {'vocab_size': int, 'tokenizer': 'char',
'stoi': {char: int}, 'itos': {int: char}} for a character vocabulary, {'vocab_size': 50257,
'tokenizer': 'r50k_base'} for GPT-2 BPE (<|endoftext|> = 50256) or another tiktoken encoding's name,
{'vocab_size': int, 'tokenizer': 'mqar', 'mqar': {...}} for MQAR. Reading a folder, one rule
(tokenizer_name): 'stoi' means characters (nanoGPT's character folders have no 'tokenizer'), a
'tokenizer' key names it, no meta.pkl at all means GPT-2 BPE (nanoGPT's data/openwebtext), and a
meta.pkl with neither is an error.

`text` tokenises any UTF-8 text file, 90% train / 10% val (nanoGPT's split), with characters
(default) or a tiktoken encoding: gpt2 (= r50k_base) or any other whose ids fit the uint16 files
(p50k_base does; cl100k_base and o200k_base do not). The val split must hold more than
MIN_TOKENS = 64 tokens, one block of 64 (the file then has ~640 characters or more); train.py checks
the block_size of the run.

MQAR (multi-query associative recall, see prepare_mqar) is no text: <split>.bin holds whole
sequences of seq_len tokens one after another, <split>_targets.bin (np.int16) the target of every
position (-1 but where a value must be recalled), and meta.pkl {'vocab_size': vocab, 'mqar':
{'seq_len': ..., 'pairs': ..., ...}}, which tells train.py to draw whole sequences.

A half-prepared folder is never used: while a folder is written it holds the marker file
.preparing, written first and removed last, and is_prepared() never accepts a folder with it (a
killed run leaves it behind). Every file is written to a temp file named with the writer's pid,
flushed to disk, then renamed; temp files of runs that died are removed by the next run, those of
a live run are left alone.

Offline copies come in only through these (nothing outside the repo is looked for):
    --input PATH               the text to tokenise, for text and the Shakespeare datasets
    SHAKESPEARE_INPUT=PATH     environment variable: the default for --input, e.g. Tiny
                               Shakespeare's input.txt; the tests that need the real file read it
    TIKTOKEN_CACHE_DIR=FOLDER  tiktoken's own variable: a folder holding its cached GPT-2 BPE file
Without them the text is downloaded into <out_dir>/input.txt and tiktoken downloads its BPE file.
"""
import argparse
import os
import pickle
import re
import shutil
import string
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from urllib.request import urlopen

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent
SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                   'tinyshakespeare/input.txt')
TOKENIZER = 'r50k_base'  # byte-for-byte the GPT-2 vocabulary
GPT2_META = {'vocab_size': 50257, 'tokenizer': TOKENIZER}  # what a folder without meta.pkl holds
TOKENIZER_ALIASES = {'gpt2': TOKENIZER}  # --tokenizer gpt2: tiktoken's "gpt2" loads other files
# tiktoken encodings too large for uint16 ids, by size: known without downloading them
TOO_LARGE = {'cl100k_base': 100277, 'o200k_base': 200019, 'o200k_harmony': 201088}
MIN_TOKENS = 65  # text: each split needs more than one block of 64 tokens (nanoGPT's smallest)
MARKER = '.preparing'  # in a folder while it is being written: written first, removed last
TEMP_NAME = re.compile(r'\..+\.(\d+)\.tmp')  # atomic_path's temp files: .<name>.<pid>.tmp


class PrepareError(RuntimeError):
    """Bad input or missing resource; the message is one line that says how to fix it."""


def fsync_path(path):
    """Flush a file's bytes, or a folder's entries, to the disk: a power cut cannot lose them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`, renamed onto it only if the block succeeds: never a
    half-written file. The temp name holds this process's pid, so that a later run can tell a
    dead run's leftovers (remove_stale_temp_files) from the files of a run still writing."""
    path = Path(path)
    # same folder: the rename cannot cross filesystems
    tmp = path.parent / f'.{path.name}.{os.getpid()}.tmp'
    try:
        yield tmp
        fsync_path(tmp)  # on disk before the rename makes them the file (as train.py's ckpt.pt)
        os.replace(tmp, path)  # atomic: readers see the old file or the complete new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid):
    """Whether a process with this pid exists (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number too large to be a pid
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def remove_stale_temp_files(out_dir):
    """Remove the temp files that runs killed before their rename left in out_dir. A live run's
    files (its pid is in their names) are left alone: it is writing them now. A dead run's pid
    taken by a new process keeps its files until that process ends too."""
    if not Path(out_dir).is_dir():
        return
    for path in sorted(Path(out_dir).iterdir()):
        m = TEMP_NAME.fullmatch(path.name)
        if m and int(m[1]) > 0 and not pid_alive(int(m[1])):  # pid 0 would ask about our own group
            print(f'removing {path.name}, left in {out_dir} by a run that did not finish')
            path.unlink(missing_ok=True)  # missing_ok: another run may be removing it too


def write_bin(path, ids, dtype=np.uint16):
    with atomic_path(path) as tmp:
        np.asarray(ids, dtype=dtype).tofile(tmp)


def write_meta(out_dir, meta):
    with atomic_path(Path(out_dir) / 'meta.pkl') as tmp, open(tmp, 'wb') as f:
        pickle.dump(meta, f)


def is_prepared(data_dir):
    """Whether data_dir holds a complete dataset: train.bin and val.bin, and no marker of a
    preparation under way or cut short. meta.pkl may be missing: a nanoGPT BPE folder has none."""
    data_dir = Path(data_dir)
    has_bins = (data_dir / 'train.bin').is_file() and (data_dir / 'val.bin').is_file()
    return has_bins and not (data_dir / MARKER).exists()


def read_meta(data_dir):
    """The vocabulary of a prepared folder: meta.pkl's dict, or GPT-2's BPE (GPT2_META) when there
    is no meta.pkl, nanoGPT's rule."""
    path = Path(data_dir) / 'meta.pkl'
    if not path.exists():
        return dict(GPT2_META)
    try:
        with open(path, 'rb') as f:
            meta = pickle.load(f)
    except Exception as e:  # a truncated or foreign file fails in many ways (EOFError, ...)
        why = str(e).splitlines()[0] if str(e) else ''  # the message stays one line
        raise PrepareError(f'{path} cannot be read ({type(e).__name__}: {why}): '
                           f'prepare the dataset again') from None
    if not isinstance(meta, dict) or 'vocab_size' not in meta:
        raise PrepareError(f'{path} holds no vocab_size, so it is no meta.pkl of prepare_data.py: '
                           f'prepare the dataset again')
    tokenizer_name(meta, path)  # names its tokenizer, or stops here
    return meta


def tokenizer_name(meta, where='meta.pkl'):
    """What a vocabulary's ids mean, the one rule: 'char' where it has a character table ('stoi',
    also nanoGPT's folders), 'mqar' for MQAR's ids, else the tokenizer it names (a tiktoken
    encoding). A meta with none of them is a PrepareError: its ids would be guessed."""
    if 'stoi' in meta:
        return 'char'
    if 'mqar' in meta:  # MQAR folders prepared before meta.pkl named its tokenizer
        return 'mqar'
    if 'tokenizer' not in meta:
        raise PrepareError(f"{where} names no tokenizer (no 'stoi' and no 'tokenizer' key), so its "
                           f"ids cannot be decoded: prepare the dataset again with prepare_data.py")
    return meta['tokenizer']


def start_writing(out_dir):
    """Mark out_dir as being written, before any file of the dataset in it changes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / MARKER, 'w') as f:
        f.write(f'prepare_data.py (pid {os.getpid()}) is writing this folder\n')
    fsync_path(out_dir / MARKER)
    fsync_path(out_dir)  # the marker's entry is on disk before any renamed file can be


def finish_writing(out_dir, meta):
    """meta.pkl, then remove the marker: from now on the folder is prepared."""
    write_meta(out_dir, meta)
    fsync_path(out_dir)  # every rename is on disk before the marker's removal can be
    (out_dir / MARKER).unlink()


# -----------------------------------------------------------------------------
# Tiny Shakespeare

def find_input(out_dir, input_path=None):
    """The text to tokenise: --input, else $SHAKESPEARE_INPUT, else <out_dir>/input.txt, else
    Tiny Shakespeare downloaded there."""
    if input_path is not None:
        if not Path(input_path).is_file():
            raise PrepareError(f'--input {input_path} is not a file: pass the path of a text file')
        return Path(input_path)
    env = os.environ.get('SHAKESPEARE_INPUT')
    if env:
        if not Path(env).is_file():
            raise PrepareError(f'SHAKESPEARE_INPUT={env} is not a file: set it to the path of a '
                               f'text file, or unset it')
        return Path(env)
    local = Path(out_dir) / 'input.txt'
    if not local.is_file():
        download_shakespeare(local)
    return local


def download_shakespeare(path, timeout=30):
    """Tiny Shakespeare into path, whole or not at all; a PrepareError if the network fails."""
    print(f'downloading {SHAKESPEARE_URL} to {path}')
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urlopen(SHAKESPEARE_URL, timeout=timeout) as r, atomic_path(path) as tmp:
            with open(tmp, 'wb') as f:  # closed before atomic_path flushes and renames it
                shutil.copyfileobj(r, f)
    except OSError as e:  # URLError, HTTPError, timeouts and connection errors are all OSErrors
        raise PrepareError(f'could not download {SHAKESPEARE_URL} ({e}): pass --input PATH, set '
                           f'SHAKESPEARE_INPUT=PATH, or place the file at {path}') from None
    return path


def read_text(path):
    text = Path(path).read_text(encoding='utf-8')
    if not text:
        raise PrepareError(f'{path} is empty: pass a text file with some text in it')
    return text


def split_text(text):
    n = int(0.9 * len(text))  # first 90% of the characters to train, the rest to val
    return text[:n], text[n:]


def prepare_shakespeare_char(out_dir, input_path=None, **kw):
    text = read_text(find_input(out_dir, input_path))
    chars = sorted(set(text))
    if len(chars) > 2**16:
        raise PrepareError(f'{len(chars)} distinct characters do not fit uint16 token ids: '
                           f'use the BPE dataset')
    stoi = {ch: i for i, ch in enumerate(chars)}
    print(f'{len(text):,} characters, vocab size {len(chars)}')
    start_writing(out_dir)
    for split, part in zip(('train', 'val'), split_text(text)):
        write_bin(out_dir / f'{split}.bin', [stoi[ch] for ch in part])
    finish_writing(out_dir, char_meta(stoi))


def char_meta(stoi):
    """The meta.pkl of a character vocabulary."""
    itos = {i: ch for ch, i in stoi.items()}
    return {'vocab_size': len(stoi), 'tokenizer': 'char', 'stoi': stoi, 'itos': itos}


def get_encoding(name=TOKENIZER):
    """A tiktoken encoding whose ids fit uint16 ('gpt2' is GPT-2's r50k_base). tiktoken reads its
    file from its cache (TIKTOKEN_CACHE_DIR, else a folder in the temp dir), or downloads it there
    on first use."""
    import tiktoken
    name = TOKENIZER_ALIASES.get(name, name)
    if name not in tiktoken.list_encoding_names():
        raise PrepareError(f"unknown tokenizer {name!r}: use char, gpt2 or a tiktoken encoding "
                           f"({', '.join(tiktoken.list_encoding_names())})")
    if name in TOO_LARGE:
        raise PrepareError(f'the tokenizer {name!r} has {TOO_LARGE[name]:,} ids, which do not fit '
                           f'the uint16 files (at most 65,536): use char, gpt2 or p50k_base')
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # network errors surface as many types (requests, ssl, OSError)
        raise PrepareError(f'could not load the tiktoken encoding {name!r} '
                           f'({type(e).__name__}): go online once, or set TIKTOKEN_CACHE_DIR to a '
                           f'folder holding its cached file') from None
    if enc.n_vocab > 2**16:  # an encoding newer than TOO_LARGE
        raise PrepareError(f'the tokenizer {name!r} has {enc.n_vocab:,} ids, which do not fit the '
                           f'uint16 files (at most 65,536): use char, gpt2 or p50k_base')
    return enc


def prepare_shakespeare(out_dir, input_path=None, **kw):
    text = read_text(find_input(out_dir, input_path))
    enc = get_encoding()
    start_writing(out_dir)
    for split, part in zip(('train', 'val'), split_text(text)):
        # ordinary: '<|endoftext|>' in the text is plain text, not a token
        ids = enc.encode_ordinary(part)
        print(f'{split} has {len(ids):,} tokens')
        write_bin(out_dir / f'{split}.bin', ids)
    finish_writing(out_dir, {'vocab_size': enc.n_vocab, 'tokenizer': TOKENIZER})


def prepare_text(out_dir, input_path=None, tokenizer='char', **kw):
    """Any UTF-8 text file: characters (the text's own vocabulary) or a tiktoken encoding, 90% to
    train and 10% to val. Every check comes before the first file is written."""
    if input_path is None:
        raise PrepareError('text needs --input FILE: the text file to tokenise')
    if not Path(input_path).is_file():
        raise PrepareError(f'--input {input_path} is not a file: pass the path of a text file')
    try:
        text = read_text(input_path)
    except UnicodeDecodeError as e:
        raise PrepareError(f'{input_path} is not UTF-8 text (byte {e.start}): pass a text file, '
                           f'or convert it to UTF-8') from None
    if tokenizer == 'char':
        stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
        if len(stoi) > 2**16:
            raise PrepareError(f'{len(stoi)} distinct characters do not fit uint16 token ids: '
                               f'use --tokenizer gpt2')
        encode, meta = (lambda part: [stoi[ch] for ch in part]), char_meta(stoi)
    else:
        enc = get_encoding(tokenizer)
        # ordinary: '<|endoftext|>' in the text is plain text, not a token
        encode, meta = enc.encode_ordinary, {'vocab_size': enc.n_vocab, 'tokenizer': enc.name}
    splits = [encode(part) for part in split_text(text)]
    if len(splits[1]) < MIN_TOKENS:
        raise PrepareError(f'{input_path} is too short: its val split (the last 10%) has '
                           f'{len(splits[1])} tokens, and one block of 64 needs {MIN_TOKENS}; '
                           f'use a longer text')
    print(f'{len(text):,} characters, tokenizer {meta["tokenizer"]}, vocab size '
          f'{meta["vocab_size"]:,}')
    start_writing(out_dir)
    for split, ids in zip(('train', 'val'), splits):
        print(f'{split} has {len(ids):,} tokens')
        write_bin(out_dir / f'{split}.bin', ids)
    finish_writing(out_dir, meta)


# -----------------------------------------------------------------------------
# Passkey retrieval (docs/attention.md section 5): Shakespeare with filler / needle /
# question samples mixed in. eval_long.py builds its test prompts with the same
# passkey_sample() and the keys that is_eval_key() reserves.

PASSKEY_FILLER = (' The grass is green. The sky is blue. The sun is yellow. Here we go.'
                  ' There and back again.')
PASSKEY_NEEDLE = '\nThe pass key is {key}. Remember it. {key} is the pass key.\n'
PASSKEY_QUESTION = '\nWhat is the pass key? The pass key is '  # the answer: the key's 5 digits
PASSKEY_FRACTION = 0.8  # share of the tokens of train.bin and val.bin
                        # in passkey samples (0.5 was too slow to learn)
PASSKEY_LEN = 256       # longest sample (prompt + key, in tokens):
                        # the block_size of config/inattn_passkey.py
PASSKEY_SEED = 2357
PASSKEY_CHARS = set(PASSKEY_FILLER + PASSKEY_NEEDLE.format(key='') + PASSKEY_QUESTION
                    + string.digits)


def is_eval_key(key):
    """The one rule that splits the keys 10000..99999: ~10% are evaluation keys and
    never appear in train.bin. A hash, not a digit pattern, so the training keys teach
    nothing about which digits an eval key has."""
    return zlib.crc32(str(key).encode()) % 10 == 0


def passkey_keys(split):
    """The keys of a split: 'train' (train.bin) or 'eval' (val.bin and eval_long.py)."""
    assert split in ('train', 'eval')
    return [k for k in range(10000, 100000) if is_eval_key(k) == (split == 'eval')]


def passkey_sample(encode, key, length, depth):
    """One passkey sample as token ids (prompt, answer) with len(prompt) + len(answer)
    == length: filler with the needle at `depth` (0: the very start, 1: right before the
    question), then the question; the answer is the key. encode: text -> list of ids,
    for a character vocabulary or BPE alike."""
    needle = encode(PASSKEY_NEEDLE.format(key=key))
    question, answer = encode(PASSKEY_QUESTION), encode(str(key))
    n_filler = length - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f'a passkey sample needs at least {length - n_filler} tokens, '
                         f'got length={length}')
    unit = encode(PASSKEY_FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]  # the filler repeated and cut to size
    cut = round(depth * n_filler)
    return filler[:cut] + needle + filler[cut:] + question, answer


def passkey_min_len(encode):
    """The shortest passkey sample: needle, question and a 5-digit key, no filler."""
    return (len(encode(PASSKEY_NEEDLE.format(key=10000))) + len(encode(PASSKEY_QUESTION))
            + len(encode('10000')))


def mix_passkey(ids, encode, keys, rng, max_len=PASSKEY_LEN, fraction=PASSKEY_FRACTION):
    """ids (a text's tokens) with passkey samples inserted at random places, as many as
    make up `fraction` of the result. Each sample: a key drawn from `keys`, a length
    uniform in [passkey_min_len, max_len], a depth uniform in [0, 1]; on its own lines
    ('\n' before, '.\n' after the key, as in the needle)."""
    shortest = passkey_min_len(encode)
    # samples of mean length
    n = round(fraction / (1 - fraction) * len(ids) / ((shortest + max_len) / 2))
    keys, before, after = np.asarray(keys), encode('\n'), encode('.\n')
    out, prev = [], 0
    cuts = np.sort(rng.integers(0, len(ids) + 1, n))
    for cut in tqdm(cuts, desc='mixing passkey samples', disable=None):  # a bar on a terminal only
        prompt, answer = passkey_sample(encode, int(rng.choice(keys)),
                                        int(rng.integers(shortest, max_len + 1)), rng.random())
        out += ids[prev:cut] + before + prompt + answer + after
        prev = cut
    return out + ids[prev:]


def prepare_shakespeare_char_passkey(out_dir, input_path=None, passkey_len=PASSKEY_LEN,
                                     passkey_fraction=PASSKEY_FRACTION, **kw):
    """Character vocabulary of Shakespeare, the digits and the passkey templates.
    train.bin mixes the first 90% of the text with samples of training keys, val.bin the
    rest with samples of evaluation keys."""
    text = read_text(find_input(out_dir, input_path))
    chars = sorted(set(text) | PASSKEY_CHARS)
    stoi = {ch: i for i, ch in enumerate(chars)}
    encode = lambda s: [stoi[ch] for ch in s]  # noqa: E731
    if passkey_len < passkey_min_len(encode):  # checked before anything is written:
                                               # an old dataset stays intact
        raise PrepareError(f'passkey_len={passkey_len} is too short: a passkey sample needs '
                           f'{passkey_min_len(encode)} tokens')
    print(f'{len(text):,} characters, vocab size {len(chars)}')
    start_writing(out_dir)
    splits = zip(('train', 'val'), split_text(text), ('train', 'eval'))
    for i, (split, part, keys) in enumerate(splits):
        rng = np.random.default_rng(PASSKEY_SEED + i)
        ids = mix_passkey(encode(part), encode, passkey_keys(keys), rng, passkey_len,
                          passkey_fraction)
        print(f'{split} has {len(ids):,} tokens, '
              f'{len(ids) - len(part):,} of them in passkey samples')
        write_bin(out_dir / f'{split}.bin', ids)
    finish_writing(out_dir, char_meta(stoi))


# -----------------------------------------------------------------------------
# OpenWebText (Hugging Face datasets), ~8M documents, ~9B tokens

def split_docs(dset, max_docs=None):
    """Optionally take the first max_docs documents,
    then hold out 0.05% as 'val' (nanoGPT's split)."""
    if max_docs is not None:
        dset = dset.select(range(min(max_docs, len(dset))))
    if len(dset) < 2:
        raise PrepareError(f'{len(dset)} document(s) cannot be split into train and val: '
                           f'use --max_docs 2 or more')
    split = dset.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split['val'] = split.pop('test')
    return split


def write_tokens(dset, path, max_shards=1024):
    """Concatenate the 'ids' of a tokenised Dataset into
    a uint16 file, shard by shard (never all in RAM)."""
    arr_len = int(np.sum(dset['len'], dtype=np.uint64))
    if arr_len == 0:
        raise PrepareError(f'no tokens to write to {path}: the split is empty, use more documents')
    # a tiny dataset cannot be cut into more shards than it has rows
    n_shards = min(max_shards, len(dset))
    with atomic_path(path) as tmp:
        arr = np.memmap(tmp, dtype=np.uint16, mode='w+', shape=(arr_len,))
        idx = 0
        for i in tqdm(range(n_shards), desc=f'writing {Path(path).name}', disable=None):
            shard = dset.shard(num_shards=n_shards, index=i, contiguous=True).with_format('numpy')
            ids = np.concatenate(shard['ids'])
            arr[idx: idx + len(ids)] = ids
            idx += len(ids)
        arr.flush()
        del arr  # close the map before the rename


def write_bpe_splits(dsets, out_dir, num_proc=1):
    """Tokenise every split of a DatasetDict with a
    'text' column and write <split>.bin, then meta.pkl."""
    enc = get_encoding()

    def process(example):
        ids = enc.encode_ordinary(example['text'])
        ids.append(enc.eot_token)  # <|endoftext|> (50256) separates documents
        return {'ids': ids, 'len': len(ids)}

    tokenized = dsets.map(process, remove_columns=['text'], desc='tokenizing', num_proc=num_proc)
    out_dir = Path(out_dir)
    start_writing(out_dir)
    for split, dset in tokenized.items():
        write_tokens(dset, out_dir / f'{split}.bin')
    finish_writing(out_dir, {'vocab_size': enc.n_vocab, 'tokenizer': TOKENIZER})


OWT_NAME = 'Skylion007/openwebtext'


def prepare_openwebtext(out_dir, input_path=None, max_docs=None, num_proc=None, **kw):
    if input_path is not None:
        raise PrepareError('--input is only for the Shakespeare datasets: '
                           'openwebtext comes from Hugging Face')
    num_proc = num_proc or os.cpu_count()
    from datasets import load_dataset
    # the hub's canonical copy; datasets >= 4 runs no loading scripts,
    # so the old bare name 'openwebtext' fails
    try:
        # the dataset has only a train split
        dset = load_dataset(OWT_NAME, num_proc=num_proc)['train']
    except Exception as e:  # offline or hub errors come in many types
        msg = str(e).splitlines()[0] if str(e) else ''
        raise PrepareError(f"could not load the Hugging Face dataset {OWT_NAME!r} "
                           f"({type(e).__name__}: {msg}): it needs internet access, "
                           f"or a copy in the Hugging Face cache") from None
    write_bpe_splits(split_docs(dset, max_docs), out_dir, num_proc=num_proc)


# -----------------------------------------------------------------------------
# MQAR, multi-query associative recall (docs/attention.md section 10; Zoology, arXiv 2312.04927)

MQAR_SEQ_LEN = 64  # defaults: a CPU-sized setting (Zoology's shortest sequences, 8 pairs)
MQAR_PAIRS = 8
MQAR_VOCAB = 256
MQAR_TRAIN_SAMPLES = 100_000  # Zoology's number of training sequences
MQAR_VAL_SAMPLES = 3_000
MQAR_SEED = 2357
MQAR_FILLER = 0  # the id of every position that is neither a pair nor a query key
MQAR_NAME = re.compile(r'mqar_T(\d+)_N(\d+)_V(\d+)(?:_Q(\d+))?')  # a setting's dataset name


def mqar_name(seq_len, pairs, vocab, query_start=None):
    """The name of a setting's dataset, and of its folder under data/: mqar_T64_N8_V256; with
    queries only from position Q on (query_start, other than right after the pairs): _Q<Q>."""
    far = '' if query_start in (None, 2 * pairs) else f'_Q{query_start}'
    return f'mqar_T{seq_len}_N{pairs}_V{vocab}{far}'


def mqar_sample(rng, seq_len, pairs, vocab, query_start=None):
    """One MQAR sequence: its tokens x and targets y, (seq_len,) each.

    x opens with the N pairs k1 v1 ... kN vN: distinct keys from [1, vocab/2), distinct values from
    [vocab/2, vocab). From query_start on (default 2N, right after the pairs) come slots of two
    tokens: N slots, chosen uniformly without replacement, each hold one key (every key once, in
    random order) followed by the filler 0; every other position is the filler. A later
    query_start puts every query far from its pair: at least query_start - 2N + 1 tokens after
    its value. The value is not written after its query: answered values
    would then tell a model which values are left (the last query by elimination, no recall).
    y[t] is the value paired with x[t] where t is a query, -1 elsewhere: the model has just read the
    key again and must output its value; train.py's loss ignores the -1s."""
    keys = rng.choice(vocab // 2 - 1, pairs, replace=False) + 1
    values = rng.choice(vocab - vocab // 2, pairs, replace=False) + vocab // 2
    x = np.full(seq_len, MQAR_FILLER)
    y = np.full(seq_len, -1)
    x[0:2 * pairs:2] = keys
    x[1:2 * pairs:2] = values
    start = 2 * pairs if query_start is None else query_start
    # choice without replacement comes in random order: key i goes to slot slots[i]
    slots = rng.choice((seq_len - start) // 2, pairs, replace=False)
    queries = start + 2 * slots  # the first position of each slot
    x[queries] = keys
    y[queries] = values
    return x, y


def check_mqar(seq_len, pairs, vocab, train_samples, val_samples, query_start=None):
    """A setting that cannot be built is a PrepareError, before anything is written."""
    if min(seq_len, pairs, vocab, train_samples, val_samples) < 1:
        raise PrepareError(f'seq_len={seq_len}, pairs={pairs}, vocab={vocab}, train_samples='
                           f'{train_samples} and val_samples={val_samples} must all be at least 1')
    if 4 * pairs > seq_len:  # 2N tokens of pairs, then N query slots of 2 tokens
        raise PrepareError(f'seq_len={seq_len} is too short for pairs={pairs}: the pairs and the '
                           f'query slots need 4 * pairs = {4 * pairs} tokens')
    if vocab // 2 - 1 < pairs:  # id 0 is the filler, keys are 1 .. vocab/2 - 1
        raise PrepareError(f'vocab={vocab} has {vocab // 2 - 1} key ids for pairs={pairs} distinct '
                           f'keys: use vocab >= {2 * pairs + 2}')
    if query_start is not None and not (query_start >= 2 * pairs and query_start % 2 == 0
                                        and (seq_len - query_start) // 2 >= pairs):
        raise PrepareError(f'query_start={query_start} must be even, at least 2 * pairs = '
                           f'{2 * pairs}, and leave {pairs} query slots of 2 tokens before '
                           f'seq_len={seq_len}: use at most {seq_len - 2 * pairs}')
    if vocab > 2**15:  # the targets are stored as int16
        raise PrepareError(f'vocab={vocab} does not fit the int16 targets: use vocab <= {2**15}')


def prepare_mqar(out_dir, seq_len, pairs, vocab, train_samples=MQAR_TRAIN_SAMPLES,
                 val_samples=MQAR_VAL_SAMPLES, seed=MQAR_SEED, query_start=None, input_path=None,
                 **kw):
    """train_samples and val_samples MQAR sequences (mqar_sample): tokens in <split>.bin, one
    sequence every seq_len tokens, targets in <split>_targets.bin. Each split draws from its own
    stream of `seed`, so val shares no random numbers with train."""
    if input_path is not None:
        raise PrepareError('--input is only for the Shakespeare datasets: mqar is generated')
    check_mqar(seq_len, pairs, vocab, train_samples, val_samples, query_start)
    start_writing(out_dir)
    for i, (split, n) in enumerate((('train', train_samples), ('val', val_samples))):
        rng = np.random.default_rng([seed, i])  # SeedSequence: independent streams for i = 0, 1
        x = np.empty((n, seq_len), dtype=np.uint16)
        y = np.empty((n, seq_len), dtype=np.int16)
        for j in tqdm(range(n), desc=f'{split} sequences', disable=None):
            x[j], y[j] = mqar_sample(rng, seq_len, pairs, vocab, query_start)
        write_bin(out_dir / f'{split}.bin', x)
        write_bin(out_dir / f'{split}_targets.bin', y, np.int16)
    setting = dict(seq_len=seq_len, pairs=pairs, filler=MQAR_FILLER, keys=(1, vocab // 2),
                   values=(vocab // 2, vocab), seed=seed, train_samples=train_samples,
                   val_samples=val_samples, query_start=query_start or 2 * pairs)
    finish_writing(out_dir, {'vocab_size': vocab, 'tokenizer': 'mqar', 'mqar': setting})


def read_mqar(data_dir, split, seq_len):
    """A prepared MQAR split as two (samples, seq_len) arrays mapped from disk: tokens, targets."""
    paths = [Path(data_dir) / f'{split}.bin', Path(data_dir) / f'{split}_targets.bin']
    sizes = [path.stat().st_size if path.is_file() else 0 for path in paths]
    if sizes[0] == 0 or sizes[0] != sizes[1] or sizes[0] % (2 * seq_len):  # 2 bytes a token
        raise PrepareError(f'{paths[0]} and {paths[1].name} do not hold the same whole sequences '
                           f'of {seq_len} tokens: prepare the dataset again')
    x = np.memmap(paths[0], dtype=np.uint16, mode='r')
    y = np.memmap(paths[1], dtype=np.int16, mode='r')
    return x.reshape(-1, seq_len), y.reshape(-1, seq_len)


# -----------------------------------------------------------------------------

DATASETS = {
    'text': prepare_text,
    'shakespeare_char': prepare_shakespeare_char,
    'shakespeare': prepare_shakespeare,
    'shakespeare_char_passkey': prepare_shakespeare_char_passkey,
    'openwebtext': prepare_openwebtext,
}


def preparable(name):
    """Whether prepare(name) writes data/<name>/: a name of DATASETS (but text, which needs its
    file), or an MQAR setting's."""
    return (name in DATASETS and name != 'text') or MQAR_NAME.fullmatch(name) is not None


def prepare(name, input_path=None, out_dir=None, tokenizer=None, **kw):
    """Write train.bin, val.bin and meta.pkl for dataset `name` into out_dir (default
    data/<name>/, for text data/<the input's file name without its extension>/); return it.
    'mqar' with seq_len, pairs and vocab in kw is the dataset named after them, mqar_name(); that
    name says them all, so train.py --dataset=mqar_T64_N8_V256 prepares it on first use."""
    if tokenizer is not None:
        if name != 'text':
            raise PrepareError(f'--tokenizer is for the text dataset ({name} has its own)')
        kw['tokenizer'] = tokenizer
    if name == 'text' and out_dir is None and input_path is not None:
        out_dir = REPO / 'data' / Path(input_path).stem
    setting = MQAR_NAME.fullmatch(name)
    if name == 'mqar':
        kw = {'seq_len': MQAR_SEQ_LEN, 'pairs': MQAR_PAIRS, 'vocab': MQAR_VOCAB, **kw}
        name = mqar_name(kw['seq_len'], kw['pairs'], kw['vocab'], kw.get('query_start'))
    elif setting:  # the name holds the setting
        kw.update(seq_len=int(setting[1]), pairs=int(setting[2]), vocab=int(setting[3]),
                  query_start=setting[4] and int(setting[4]))
    elif name not in DATASETS:
        raise PrepareError(f'unknown dataset {name!r}: choose one of {", ".join(DATASETS)}, mqar '
                           f'or mqar_T<seq_len>_N<pairs>_V<vocab>[_Q<query_start>]')
    folder = name
    if name == 'shakespeare_char_passkey' and kw.get('passkey_len', PASSKEY_LEN) != PASSKEY_LEN:
        folder = f"{name}_{kw['passkey_len']}"  # a folder of its own: the 256 mix stays
    out_dir = Path(out_dir) if out_dir is not None else REPO / 'data' / folder
    remove_stale_temp_files(out_dir)
    build = DATASETS.get(name, prepare_mqar)  # an MQAR setting's name is none of DATASETS
    build(out_dir, input_path=input_path, **kw)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Tokenise a dataset into train.bin, val.bin and meta.pkl.')
    parser.add_argument('name', help=f'{", ".join(DATASETS)} (text: any text file, --input FILE), '
                        f'mqar (its setting from --seq_len, --pairs, --vocab) or a setting\'s '
                        f'name, e.g. mqar_T64_N8_V256')
    parser.add_argument('--input', help='text file to use (text: needed; Shakespeare sets: '
                        'default $SHAKESPEARE_INPUT, else <out_dir>/input.txt, else downloaded)')
    parser.add_argument('--tokenizer', help='text: char (default), gpt2 (GPT-2 BPE) or a tiktoken '
                        'encoding whose ids fit uint16, e.g. p50k_base')
    parser.add_argument('--out_dir', help='output folder (default: data/<name>/ in the repo; text: '
                        'data/<file name without extension>/; mqar: '
                        'data/mqar_T<seq_len>_N<pairs>_V<vocab>/)')
    parser.add_argument('--max_docs', type=int, help='openwebtext: use only the first N documents')
    parser.add_argument('--num_proc', type=int,
                        help='openwebtext: worker processes (default: all CPUs)')
    parser.add_argument('--seq_len', type=int, default=MQAR_SEQ_LEN,
                        help='mqar: tokens per sequence')
    parser.add_argument('--pairs', type=int, default=MQAR_PAIRS,
                        help='mqar: key-value pairs per sequence')
    parser.add_argument('--vocab', type=int, default=MQAR_VOCAB, help='mqar: vocabulary size')
    parser.add_argument('--train_samples', type=int, default=MQAR_TRAIN_SAMPLES,
                        help='mqar: training sequences')
    parser.add_argument('--val_samples', type=int, default=MQAR_VAL_SAMPLES,
                        help='mqar: validation sequences')
    parser.add_argument('--seed', type=int, default=MQAR_SEED, help='mqar: the seed of both splits')
    parser.add_argument('--query_start', type=int,
                        help='mqar: queries only from this position on (default: right after the '
                        'pairs); e.g. 80 with --seq_len 256 --pairs 8 puts every query 65 to 253 '
                        'tokens after its pair')
    parser.add_argument('--passkey_len', type=int, default=PASSKEY_LEN,
                        help=f'shakespeare_char_passkey: the longest sample (default '
                        f'{PASSKEY_LEN}; another length writes data/shakespeare_char_passkey_<N>/)')
    args = parser.parse_args(argv)
    try:
        out_dir = prepare(args.name, args.input, args.out_dir, args.tokenizer,
                          max_docs=args.max_docs, num_proc=args.num_proc, seq_len=args.seq_len,
                          pairs=args.pairs, vocab=args.vocab, train_samples=args.train_samples,
                          val_samples=args.val_samples, seed=args.seed,
                          query_start=args.query_start, passkey_len=args.passkey_len)
    except PrepareError as e:
        print(f'prepare_data.py: error: {e}', file=sys.stderr)
        sys.exit(1)
    print(f'wrote {out_dir}')


if __name__ == '__main__':
    main()
