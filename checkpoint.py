"""
Checkpoints, in one place: where they are, how they are read, how they are written.

A checkpoint is the dict train.py saves to <out_dir>/ckpt.pt, nanoGPT's format plus two keys:
    model, optimizer, model_args, iter_num, best_val_loss, config   (nanoGPT's train.py)
    scaler   the float16 GradScaler's state
    meta     the vocabulary (prepare_data.py's meta.pkl), so that sample.py can decode
A checkpoint written by nanoGPT's own train.py (no scaler, no meta) samples, is evaluated and
resumes: its vocabulary is read from its dataset folder, where no meta.pkl means GPT-2 BPE
(nanoGPT's rule). load_tokenizer turns a vocabulary into text and back.

With always_save_checkpoint=False, ckpt.pt holds the best validation loss seen and last.pt the
latest evaluated state when it is worse (resume_path chooses between them); see train.py.
"""
import errno
import glob
import os
from contextlib import nullcontext

import torch

import prepare_data
from configurator import die
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
GPT2_META = prepare_data.GPT2_META  # OpenAI's GPT-2 BPE


class DiskFull(OSError):
    """A checkpoint could not be written because the disk is full; the message says which file."""


def checkpoint_path(init_from, out_dir):
    """The file init_from names: 'resume' is out_dir/ckpt.pt; a folder holds ckpt.pt."""
    path = os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    return path


def resume_path(out_dir):
    """The checkpoint that resuming out_dir continues: last.pt when it is later than ckpt.pt
    (always_save_checkpoint=False keeps the best weights in ckpt.pt and a later, worse state in
    last.pt), else ckpt.pt. A last.pt no later than ckpt.pt is one that a run stopped right after
    writing a new best left behind, before removing it: it is ignored."""
    best, last = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'last.pt')
    if not os.path.isfile(last):
        return best
    if not os.path.isfile(best):
        return last
    return last if iteration(last) > iteration(best) else best


def iteration(path):
    """A checkpoint's iter_num, read without reading its tensors (they are memory-mapped)."""
    try:
        return torch.load(path, map_location='cpu', mmap=True, weights_only=False)['iter_num']
    except Exception:  # an old format or a broken file: the full load says what is wrong
        return load_checkpoint(path).get('iter_num', 0)


def train_command(out_dir):
    """The command that writes out_dir/ckpt.pt: the config file that names out_dir, if one does."""
    for path in sorted(glob.glob(os.path.join(REPO, 'config', '*.py'))):
        with open(path) as f:
            if f"out_dir = '{out_dir}'" in f.read():
                return f"python train.py config/{os.path.basename(path)}"
    return f"python train.py config/train_shakespeare_char.py --out_dir={out_dir}"


def data_folder(dataset):
    """A dataset name is a folder under data/ in the repo; a name with a '/' is a folder path."""
    return dataset if '/' in dataset else os.path.join(REPO, 'data', dataset)


def prepare_dataset(dataset):
    """Prepare a dataset name (data/<name>/, or an MQAR setting such as mqar_T64_N8_V256) that is
    not prepared yet; anything else, or a failed preparation, stops with one line."""
    data_dir = data_folder(dataset)
    if not prepare_data.preparable(dataset):
        die(f"no prepared dataset in {data_dir} (train.bin and val.bin, no {prepare_data.MARKER} "
            f"marker of an unfinished preparation): use one of "
            f"{', '.join(prepare_data.DATASETS)}, an MQAR setting (mqar_T64_N8_V256), or a folder "
            f"written by prepare_data.py", status=2)
    print(f"dataset {dataset!r} is not prepared yet: preparing it now "
          f"(python prepare_data.py {dataset})")
    try:
        prepare_data.prepare(dataset)
    except prepare_data.PrepareError as e:
        die(e)


def autocast_context(device_type, dtype):
    """-> (dtype, ctx): what dtype='auto' means on this device (bfloat16 on a GPU that has it,
    float16 on one that has not, float32 on a CPU), and the autocast context for it."""
    if dtype == 'auto':
        dtype = 'float32'
        if device_type == 'cuda':
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype == 'float32':
        return dtype, nullcontext()
    return dtype, torch.autocast(device_type, dtype=getattr(torch, dtype))


def dataset_meta(dataset):
    """The vocabulary of a dataset folder: its meta.pkl, or GPT-2 BPE where there is none (nanoGPT);
    a broken meta.pkl stops with one line."""
    try:
        return prepare_data.read_meta(data_folder(dataset))
    except prepare_data.PrepareError as e:
        die(e)


def load_tokenizer(meta):
    """-> (name, encode, token_bytes) for a vocabulary (a meta.pkl's dict), by the one rule of
    prepare_data.tokenizer_name (train.py, sample.py and eval_long.py all follow it): encode is
    text -> ids ('<|endoftext|>' is BPE's special token), token_bytes is id -> its UTF-8 bytes
    (b'' for BPE's padding ids). A meta that names no tokenizer, a character the vocabulary has
    not, or a tokenizer tiktoken cannot load stop with one line; MQAR's ids have no text."""
    try:
        name = prepare_data.tokenizer_name(meta, 'the vocabulary')
        if name == 'mqar':
            raise prepare_data.PrepareError("an MQAR model reads ids, not text: score it with "
                                            "eval_long.py --mode=mqar")
        if name != 'char':
            enc = prepare_data.get_encoding(name)
    except prepare_data.PrepareError as e:
        die(e, status=2)
    if name == 'char':
        stoi, itos = meta['stoi'], meta['itos']

        def encode(text):
            unknown = sorted(set(text) - set(stoi))
            if unknown:
                die(f"the text has characters that are not in the model's vocabulary of "
                    f"{len(stoi)}: {', '.join(map(repr, unknown))}; remove or replace them")
            return [stoi[c] for c in text]

        return name, encode, lambda i: itos[i].encode('utf-8')

    def token_bytes(i):
        return enc.decode_single_token_bytes(i) if i < enc.n_vocab else b''  # padding: no text

    return name, lambda text: enc.encode(text, allowed_special={'<|endoftext|>'}), token_bytes


def load_checkpoint(path):
    """The dict at path; a truncated or foreign file stops with one line (nothing is written)."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)  # holds dicts too
    except Exception as e:  # a truncated zip, random bytes, another pickle: many error types
        die(f"{path} cannot be read as a checkpoint ({type(e).__name__}): the file is truncated or "
            f"was not written by train.py; use another checkpoint, or train again")
    needed = ('model', 'model_args')
    missing = [k for k in needed if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        die(f"{path} is not a checkpoint of train.py: it has no {', '.join(missing)}; use a "
            f"ckpt.pt that train.py (or nanoGPT's train.py) wrote")
    if 'meta' not in checkpoint:  # nanoGPT's train.py: the vocabulary is its dataset's
        dataset = checkpoint.get('config', {}).get('dataset', 'openwebtext')
        checkpoint['meta'] = dataset_meta(dataset)
    return checkpoint


def build_model(checkpoint, path, **override):
    """The GPT a checkpoint holds, with some GPTConfig fields overridden (dropout and the other
    knobs that do not change the weights); one this model.py cannot build stops with one line."""
    state = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    # nanoGPT without flash attention saved its causal mask as a buffer 'attn.bias': not a weight
    state = {k: v for k, v in state.items() if not (k.endswith('.attn.bias') and v.dim() == 4)}
    try:
        model = GPT(GPTConfig(**dict(checkpoint['model_args'], **override)))
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:  # unknown or misshapen
        detail = ' '.join(str(e).split())[:200]  # load_state_dict's message spans many lines
        die(f"{path} holds no GPT that this model.py can load ({type(e).__name__}: {detail}); "
            f"use a checkpoint written by this version of train.py")
    vocab = checkpoint['meta']['vocab_size']
    if vocab > model.config.vocab_size:
        die(f"{path}: a model of {model.config.vocab_size} token ids cannot be decoded with its "
            f"vocabulary of {vocab} (from its dataset's meta.pkl, or GPT-2 BPE where there is "
            f"none): put the dataset's meta.pkl in data/{checkpoint['config']['dataset']}")
    return model


def load_model(init_from, out_dir):
    """-> (model, meta): a checkpoint and its vocabulary, or GPT-2 (Hugging Face) with its BPE."""
    if init_from.startswith('gpt2') and not os.path.exists(init_from):
        return load_gpt2(init_from), dict(GPT2_META)
    path = checkpoint_path(init_from, out_dir)
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: train one first with "
            f"`{train_command(os.path.dirname(path))}`, or pass --out_dir=FOLDER holding ckpt.pt")
    checkpoint = load_checkpoint(path)
    return build_model(checkpoint, path), checkpoint['meta']


def load_gpt2(name, override_args=None):
    """OpenAI's GPT-2 weights from Hugging Face; a failed download stops with one line."""
    try:
        return GPT.from_pretrained(name, override_args)
    except OSError as e:
        die(f"could not load {name!r} from Hugging Face ({type(e).__name__}): it needs internet "
            f"access once, or a copy in the Hugging Face cache")


def write_checkpoint(checkpoint, path):
    """Write to a temp file, flush it to the disk, then rename: whenever the process dies, path is a
    complete checkpoint, the previous one or the new one. A full disk raises DiskFull, with the
    temp file removed and the previous checkpoint untouched."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:  # a file object: a full disk raises OSError(ENOSPC) here
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename publishes them
        os.replace(tmp, path)  # atomic: path is the old file or the new one, never a mix
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFull(errno.ENOSPC, f"the disk is full: {path} was not written "
                                         f"(the previous checkpoint there is intact)") from None
        raise
