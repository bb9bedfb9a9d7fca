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

decide_start holds train.py's rules for how a run starts: resumed, from a checkpoint, from GPT-2,
or from scratch.
"""
import errno
import glob
import os
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch

import prepare_data
from configurator import die
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
GPT2_META = prepare_data.GPT2_META  # OpenAI's GPT-2 BPE
# train.py's keys that a resumed run may change: they do not change what is trained, only when it
# stops, how it is watched, and where it runs
SAFE_ON_RESUME = ('max_iters', 'lr_decay_iters', 'eval_interval', 'log_interval', 'eval_iters',
                  'eval_only', 'always_save_checkpoint', 'wandb_log', 'wandb_project',
                  'wandb_run_name', 'init_from', 'init_hint', 'auto_resume', 'overwrite', 'device',
                  'backend', 'compile', 'check_sync', 'peak_tflops', 'on_nonfinite', 'out_dir',
                  'grad_checkpoint')
# the GPTConfig fields that a checkpoint does not fix: regularisation, implementation and
# evaluation knobs (block_size has rules of its own, see decide_start)
RUNTIME_KEYS = ('dropout', 'sdpa', 'inattn_cache', 'inattn_decode', 'lightning_block',
                'infini_segment', 'infini_memory', 'infini_beta_lr', 'grad_checkpoint')


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


class StartError(ValueError):
    """A run cannot start as its config asks; the message says how to fix it (train.py stops with
    it, exit status 2)."""


@dataclass
class Start:
    """How a run starts: decide_start's decision, which train.py carries out."""
    kind: str  # 'scratch', 'gpt2', 'file' (a checkpoint's weights start a new run) or 'resume'
    init_from: str  # as messages name it: what the config says, or 'resume' after auto_resume
    block_size: int  # the run's; a larger or smaller position table is grown or cropped to it
    path: str = ''  # 'file' and 'resume': the checkpoint read
    checkpoint: dict = None  # its contents: weights, optimizer state, vocabulary (meta)
    runtime: dict = field(default_factory=dict)  # the RUNTIME_KEYS to build its model with
    inherited: dict = field(default_factory=dict)  # fixed keys the checkpoint sets otherwise
    iter_num: int = 0  # where the run continues: a resume's checkpoint's, else 0
    best_val_loss: float = 1e9
    stop: str = ''  # a resume with nothing left to do: the line that says so (exit status 0)


def decide_start(config, defaults, log=print):
    """How the run of train.py's config starts (defaults: to tell a key left at its default from
    one set): -> Start. It reads and checks the checkpoint it starts from before any data work, so
    that a wrong one is reported at once. The rules:
    1. No run is lost: when out_dir holds a checkpoint (resume_path: ckpt.pt, or last.pt when it
       is later) and init_from is not 'resume' and eval_only is False, init_from does not apply.
       overwrite=True: a new run replaces it. Else auto_resume=False stops; a checkpoint whose
       config differs from ours (but for SAFE_ON_RESUME) is another run's and stops; else it is
       this run's, and it is resumed.
    2. init_from='scratch' is a new model; 'gpt2', 'gpt2-medium', ... (not a path) OpenAI's GPT-2
       weights, with a position table of 1024 rows.
    3. Any other init_from names a checkpoint: 'resume' out_dir's (resume_path), else a file or a
       folder holding ckpt.pt. A missing one stops (naming init_hint, the command that makes it);
       a resume needs the checkpoint's optimizer state, iter_num and best_val_loss.
    4. The checkpoint fixes the architecture (nanoGPT): a model key left at its default takes the
       checkpoint's value, one set to another value stops. RUNTIME_KEYS are not fixed: one left
       at its default takes the checkpoint's value, one that is set wins.
    5. A resume continues the same run: its block_size left at the default is the checkpoint's,
       another one stops; it continues iter_num and best_val_loss; at max_iters or past it (and
       not eval_only) there is nothing left to do (Start.stop).
    6. A new run may change block_size: a smaller one crops the position table, a larger one grows
       it with extend_method; extend_method='none' stops where there is a table to grow (GPT-2,
       or a checkpoint of learned positions).
    7. The dataset's ids must mean what they meant in training (a checkpoint's vocabulary, or
       GPT-2's BPE): check_vocabulary, once the data is prepared and its vocabulary known.
    A rule that stops raises StartError; log prints the decisions of rule 1."""
    init_from, out_dir = config['init_from'], config['out_dir']
    own = resume_path(out_dir)
    if init_from != 'resume' and not config['eval_only'] and os.path.isfile(own):
        init_from = auto_resume(own, config, defaults, log)
    kind = 'file'
    if init_from in ('scratch', 'resume'):
        kind = init_from
    elif init_from.startswith('gpt2') and not os.path.exists(init_from):
        kind = 'gpt2'
    start = Start(kind, init_from, config['block_size'])
    if kind == 'gpt2':
        check_growth(1024, config, init_from)
    if kind in ('scratch', 'gpt2'):
        return start
    start.path = checkpoint_path(init_from, out_dir)
    if kind == 'resume':  # ckpt.pt, or last.pt when it is later
        start.path = resume_path(out_dir)
    if not os.path.isfile(start.path):
        make = "train one first, or use --init_from=scratch"
        if config['init_hint']:
            make = f"make it with `{config['init_hint']}`"
        raise StartError(f"init_from={init_from!r}: no checkpoint at {start.path}; {make}")
    start.checkpoint = load_checkpoint(start.path)  # a truncated or foreign file stops here
    saved = start.checkpoint['model_args']
    resumable = {'optimizer', 'iter_num', 'best_val_loss'} <= start.checkpoint.keys()
    if kind == 'resume' and not resumable:
        raise StartError(f"{start.path} holds weights but no optimizer state, so it cannot be "
                         f"resumed: start a new run from it with --init_from={start.path}")
    check_architecture(start, config, defaults)
    if kind == 'resume':
        return resume(start, config, defaults)
    if saved.get('pos_emb', 'learned') == 'learned':  # nanoGPT's checkpoints: learned positions
        check_growth(saved['block_size'], config, init_from)
    return start


def auto_resume(path, config, defaults, log):
    """Rule 1 of decide_start, for out_dir's checkpoint at path: -> the init_from that applies."""
    saved_run = load_checkpoint(path)
    saved = saved_run.get('config', {})
    differ = [k for k in config
              if k not in SAFE_ON_RESUME and saved.get(k, defaults[k]) != config[k]]
    at = f"{path} (iteration {saved_run.get('iter_num', '?')})"
    ways_out = ("continue it with --init_from=resume, use another --out_dir, or --overwrite=True "
                "to start over there")
    if config['overwrite']:
        log(f"overwrite=True: a new run replaces {at} at its first checkpoint")
        return config['init_from']
    if not config['auto_resume']:
        raise StartError(f"{config['out_dir']} already holds a checkpoint, {at}, and "
                         f"auto_resume=False: {ways_out}")
    if differ:
        shown = ', '.join(f"{k}={saved.get(k, defaults[k])!r} there, {config[k]!r} here"
                          for k in differ[:3])
        raise StartError(f"{at} is another run's checkpoint ({shown}): {ways_out}")
    log(f"auto_resume: {at} is this run's checkpoint: resuming it")
    return 'resume'


def check_architecture(start, config, defaults):
    """Rule 4 of decide_start: the checkpoint's model keys against the config's; sets
    start.runtime and start.inherited."""
    saved = start.checkpoint['model_args']
    model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name != 'vocab_size'}
    for k in model_args:
        fixed = k not in ('block_size', *RUNTIME_KEYS)
        if fixed and config[k] != defaults[k] and config[k] != saved.get(k, defaults[k]):
            raise StartError(f"{k}={config[k]!r} was asked for but {start.path} is a model with "
                             f"{k}={saved.get(k)!r}: drop the {k} override (the checkpoint fixes "
                             f"the architecture), or train from scratch")
    # a model trained with 16-token segments is evaluated with 16-token segments
    start.runtime = {k: saved.get(k, config[k]) if config[k] == defaults[k] else config[k]
                     for k in RUNTIME_KEYS}
    start.inherited = {k: v for k, v in saved.items()
                       if k not in ('vocab_size', 'block_size', *RUNTIME_KEYS)
                       and model_args.get(k) != v}


def resume(start, config, defaults):
    """Rule 5 of decide_start: the same run's block_size and iteration."""
    checkpoint, saved = start.checkpoint, start.checkpoint['model_args']
    if config['block_size'] == defaults['block_size']:
        start.block_size = saved['block_size']  # as the architecture: the default takes the saved
    if start.block_size != saved['block_size']:
        raise StartError(f"resume continues the same run, but block_size={start.block_size} "
                         f"differs from the checkpoint's {saved['block_size']}: drop the "
                         f"override, or start a new run with --init_from={start.path}")
    if not config['eval_only'] and checkpoint['iter_num'] >= config['max_iters']:
        start.stop = (f"{start.path} is at iteration {checkpoint['iter_num']}, "
                      f"max_iters={config['max_iters']}: nothing left to do (raise --max_iters "
                      f"to train on)")
    start.iter_num, start.best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    return start


def check_growth(position_table, config, init_from):
    """Rule 6 of decide_start: extend_method='none' does not grow a position table."""
    block_size = config['block_size']
    if block_size > position_table and config['extend_method'] == 'none':
        raise StartError(f"block_size={block_size} is past the {position_table} rows of the "
                         f"position table of {init_from}: use --extend_method=interpolate (or "
                         f"copy) to grow it, or block_size<={position_table}")


def check_vocabulary(start, meta, dataset):
    """Rule 7 of decide_start, once the data is prepared: the dataset's vocabulary (meta) must be
    the one the model was trained on; a new model (scratch) takes any."""
    if start.kind == 'scratch':
        return
    trained_meta = GPT2_META if start.kind == 'gpt2' else start.checkpoint['meta']
    if ids_meaning(meta) != ids_meaning(trained_meta):
        raise StartError(f"dataset {dataset!r} has another vocabulary ({vocabulary(meta)}) than "
                         f"the model of {start.init_from} was trained on "
                         f"({vocabulary(trained_meta)}): use that model's dataset, or train "
                         f"from scratch")


def vocabulary(meta):
    """What a meta.pkl's ids mean, in words: a character table, MQAR's ids, or a BPE tokenizer."""
    name = prepare_data.tokenizer_name(meta)
    if name == 'char':
        return f"{meta['vocab_size']} characters"
    if name == 'mqar':
        return f"MQAR's {meta['vocab_size']} ids"
    return f"the {name} BPE"


def ids_meaning(meta):
    """What decides what a vocabulary's ids mean: its tokenizer, character table and size."""
    try:
        return prepare_data.tokenizer_name(meta), meta.get('stoi'), meta['vocab_size']
    except prepare_data.PrepareError as e:  # a checkpoint whose meta names no tokenizer
        raise StartError(e) from None


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
