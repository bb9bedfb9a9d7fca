"""
Train a GPT (model.py) on one CPU or GPU, or on several GPUs with DDP. nanoGPT's train.py.

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False  # on a laptop
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py  # GPT-2 124M, 8 GPUs

Every variable in the block below is a config key: set it in a config file or with --key=value
(--help lists them). init_from chooses how a new run starts:
  'scratch'    a new model
  'resume'     continue out_dir/ckpt.pt exactly: same iteration, weights and optimizer state
  a path       a checkpoint file (or a folder holding ckpt.pt): its weights start a new run at
               iteration 0, e.g. to fine-tune at a larger block_size (see extend_method)
  'gpt2', ...  OpenAI's GPT-2 weights from Hugging Face ('gpt2', 'gpt2-medium', ... 'gpt2-xl')
No run is lost: when out_dir already holds a checkpoint, init_from does not apply. The same run's
command (the same config, but for SAFE_ON_RESUME) resumes it (auto_resume), so a re-run or a
torchrun restart continues; any other command stops with one line, unless --overwrite=True.
checkpoint.decide_start states these rules, and the others of how a run starts, in one place.
Each micro-batch (its data and its dropout masks) is a function of (seed, iteration, micro-step)
alone, so a run is reproducible, a resumed run continues exactly like an uninterrupted one, and DDP
over N processes computes the same steps as one process with the same gradient_accumulation_steps.

What out_dir holds:
  ckpt.pt    always_save_checkpoint=True: the state at the last evaluation. False (nanoGPT's best
             checkpoint): the state with the best validation loss seen; nothing worse replaces it
  last.pt    always_save_checkpoint=False only: the state at the last evaluation when it is worse
             than ckpt.pt, so that a resumed or re-run command continues where the run was (the
             later of the two, checkpoint.resume_path); removed when a new best is written
  log.jsonl  one JSON object per line, from the master process: every logged iteration
             {"iter", "kind": "train", "loss", "lr", "tokens_per_s", "elapsed_s"} and every
             evaluation {"iter", "kind": "eval", "train_loss", "val_loss", "lr", "elapsed_s"};
             elapsed_s counts from the run's start, over resumes. A resumed run drops the records
             from its checkpoint's iteration on (those of an attempt that died) and appends.
             eval_only writes nothing. eval_long.py --mode=curves plots it
compile: on by default where a CUDA GPU is found (the device default), off on a CPU or a Mac (MPS),
where it costs more than it saves; when torch.compile cannot compile the model (no C compiler,
Windows), one line says so and the run continues uncompiled.
"""
import errno
import json
import math
import os
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from checkpoint import (DiskFull, StartError, autocast_context, build_model, check_vocabulary,
                        data_folder, dataset_meta, decide_start, load_gpt2, prepare_dataset,
                        write_checkpoint)
from configurator import configure_or_exit, die
from model import GPT, GPTConfig, check_config

# -----------------------------------------------------------------------------
# default config values: GPT-2 124M on OpenWebText (nanoGPT)
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # False: ckpt.pt keeps the best val loss (later states: last.pt)
init_from = 'scratch'  # 'scratch' | 'resume' | a checkpoint file or folder | 'gpt2*' (see above)
init_hint = ''  # the command that makes the init_from checkpoint: named when it is missing
auto_resume = True  # out_dir holds this run's checkpoint (same config): resume it
overwrite = False  # out_dir holds a checkpoint: replace it with a new run (else: stop)
# wandb logging
wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'  # a name (data/<name>/, prepared on first use) or a folder path
gradient_accumulation_steps = 5 * 8  # micro-batches per step, summed over all DDP processes
batch_size = 12  # micro-batch size
block_size = 1024
# model: every GPTConfig field but vocab_size, which comes from the dataset (meanings in model.py)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # biases in Linears and LayerNorms? (GPT-2 has them; a bit better and faster without)
attention = 'causal'
pos_emb = 'auto'
sdpa = True
inattn_cache = 's'
inattn_decode = 'auto'
inattn_prefix = 0
inattn_shift = 0
grad_checkpoint = False  # recompute each block in backward: less memory, one more forward a step
lightning_block = 64
infini_segment = 64
infini_update = 'linear'
infini_memory = True
infini_beta_lr = 1e-2
extend_method = 'interpolate'  # grow a checkpoint's position table to a larger block_size:
                               # 'interpolate', 'copy' (tile the rows) or 'none' (an error)
# AdamW optimizer
learning_rate = 6e-4
max_iters = 600000  # optimizer steps
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm; 0 disables
# learning rate: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate / 10 per Chinchilla
# system
backend = 'auto'  # DDP backend: auto = 'nccl' on GPUs, 'gloo' on CPUs
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # or 'cpu', 'cuda:1', 'mps'
dtype = 'auto'  # 'float32' | 'bfloat16' | 'float16' (GradScaler); auto: bfloat16 where the GPU
                # has it, else float16 on a GPU, float32 on a CPU
compile = torch.cuda.is_available()  # torch.compile the model (PyTorch 2): default on with CUDA
seed = 1337  # the initial weights; with (iteration, micro-step) the data and dropout of a batch
on_nonfinite = 'stop'  # a nan/inf loss: 'stop' (the last checkpoint stays) or 'skip' the step
check_sync = False  # DDP: compare the weights' checksums across processes after every step
peak_tflops = 312.0  # MFU is relative to this peak, per GPU: A100 bf16 dense by default
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
master = os.environ.get('RANK', '0') == '0'  # under torchrun only rank 0 echoes the config
config = configure_or_exit(defaults, sys.argv[1:], echo=master)
globals().update(config)  # the overrides become the variables above (nanoGPT's configurator)
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name != 'vocab_size'}


def check_settings():
    """Impossible settings stop here with one line, before any data or model work."""
    choices = dict(dtype=('auto', 'float32', 'bfloat16', 'float16'), on_nonfinite=('stop', 'skip'),
                   extend_method=('interpolate', 'copy', 'none'), backend=('auto', 'nccl', 'gloo'))
    for key, valid in choices.items():
        if config[key] not in valid:
            die(f"{key}={config[key]!r} is not one of {', '.join(valid)}", status=2)
    at_least_one = ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval',
                    'eval_iters')
    for key in at_least_one:
        if config[key] < 1:
            die(f"{key}={config[key]} must be at least 1", status=2)
    not_negative = ('max_iters', 'seed', 'learning_rate', 'min_lr', 'warmup_iters', 'weight_decay',
                    'grad_clip')
    for key in not_negative:
        if config[key] < 0:
            die(f"{key}={config[key]} must not be negative", status=2)
    if not 0 <= dropout < 1:
        die(f"dropout={dropout} must be in [0, 1)", status=2)
    try:  # e.g. n_embd divisible by n_head (vocab_size comes from the data later)
        check_config(GPTConfig(**model_args))
    except ValueError as e:
        die(e, status=2)
    if device.startswith('cuda') and not torch.cuda.is_available():
        die(f"device={device!r} but PyTorch sees no CUDA GPU: use --device=cpu (or mps on a Mac)",
            status=2)
    if dtype == 'float16' and not device.startswith('cuda'):
        die("dtype='float16' needs a CUDA GPU (it trains with a GradScaler): use float32 or "
            "bfloat16", status=2)


check_settings()
# -----------------------------------------------------------------------------

# DDP: torchrun starts one process per GPU (or CPU worker) and tells it its RANK
ddp = 'RANK' in os.environ
if ddp:
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if gradient_accumulation_steps % ddp_world_size != 0:
        die(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the "
            f"{ddp_world_size} processes: use a multiple of {ddp_world_size}", status=2)
    gradient_accumulation_steps //= ddp_world_size  # each process does its share of micro-batches
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    if backend == 'auto':
        backend = 'nccl' if device.startswith('cuda') else 'gloo'
    # the store's keys carry torchrun's restart count: after an elastic restart, torch 2.13's gloo
    # otherwise read rank 0's address from the attempt before (measured: connection refused)
    store, _, _ = next(dist.rendezvous('env://'))
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    store = dist.PrefixStore(f'attempt_{attempt}', store)
    dist.init_process_group(backend=backend, store=store, rank=ddp_rank, world_size=ddp_world_size)
    master_process = ddp_rank == 0  # this process logs and writes checkpoints
else:
    ddp_rank = 0
    ddp_world_size = 1
    master_process = True


def log(*args):
    """print on the master process only: one copy of each message under DDP."""
    if master_process:
        print(*args)


def leave_process_group(status):
    """DDP's exit, for every process: destroy the process group, flush, and exit at once. With
    torch 2.13 and gloo the interpreter's teardown aborted ("terminate called without an active
    exception") in ~1 run of 5, a worker's and once the master's, so it is skipped."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def stop_all(message, status=1):
    """Stop every process, which all reached the same decision: the master process says why in
    one line (on stdout when the stop is not an error), then all leave."""
    if master_process and status == 0:
        print(message)
    elif master_process:
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    if ddp:
        leave_process_group(status)
    sys.exit(status)


torch.manual_seed(seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu'  # for autocast
dtype, ctx = autocast_context(device_type, dtype)

# how the run starts, by the rules of checkpoint.decide_start: its checkpoint is read and checked
# before the data, so that a wrong one is reported at once
try:
    start = decide_start(config, defaults, log)
except StartError as e:
    die(e, status=2)
if start.stop:
    stop_all(start.stop, status=0)
block_size = config['block_size'] = start.block_size  # a resume's default: its checkpoint's

# data: a dataset name is prepared on first use (by one process, while the others wait)
data_dir = data_folder(dataset)
if not prepare_data.is_prepared(data_dir):
    if master_process or not prepare_data.preparable(dataset):  # a bad name stops every process
        prepare_dataset(dataset)
    if ddp:
        dist.barrier()
meta = dataset_meta(dataset)  # the vocabulary: saved in every checkpoint for sample.py
if 'mqar' in meta and block_size != meta['mqar']['seq_len']:  # get_batch draws whole sequences
    die(f"dataset {dataset!r} holds MQAR sequences of {meta['mqar']['seq_len']} tokens, which "
        f"the model reads whole: use --block_size={meta['mqar']['seq_len']} (not {block_size})",
        status=2)
for split in ('train', 'val'):
    if 'mqar' in meta:
        try:  # whole sequences, and a target for each of their tokens
            prepare_data.read_mqar(data_dir, split, block_size)
        except prepare_data.PrepareError as e:
            die(e)
        continue
    n_tokens = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2  # uint16
    if n_tokens <= block_size:
        die(f"{data_dir}/{split}.bin has {n_tokens} tokens, too few for block_size={block_size}: "
            f"use a smaller block_size or more text", status=2)

try:  # the ids must mean what they meant in training
    check_vocabulary(start, meta, dataset)
except StartError as e:
    die(e, status=2)


def get_batch(split, generator=None):
    """batch_size random windows of block_size tokens: inputs x and next-token targets y (B, T).
    MQAR: batch_size random whole sequences and their targets, -1 but at the recall positions
    (the loss ignores -1), so the loss is the loss of recall alone."""
    # recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once
    if 'mqar' in meta:
        tokens, targets = prepare_data.read_mqar(data_dir, split, block_size)  # (samples, T)
        ix = torch.randint(len(tokens), (batch_size,), generator=generator).numpy()
        x = torch.from_numpy(tokens[ix].astype(np.int64))
        y = torch.from_numpy(targets[ix].astype(np.int64))
    else:
        data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64))
                         for i in ix])
    if device_type == 'cuda':  # pinned memory lets the copy to the GPU run asynchronously
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
        return x, y
    return x.to(device), y.to(device)


tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
log(f"tokens per iteration will be: {tokens_per_iter:,}")

# model: from scratch, from a checkpoint (resume or new run), or from GPT-2
# GPT-2's 50257 tokens are padded to 50304 (a multiple of 64) for faster matmuls; characters and
# MQAR ids are not (MQAR's loss at the start is then ln(vocab), the loss of a uniform guess)
model_args['vocab_size'] = meta['vocab_size']
if 'stoi' not in meta and 'mqar' not in meta:
    model_args['vocab_size'] = math.ceil(meta['vocab_size'] / 64) * 64
checkpoint = start.checkpoint
if start.kind == 'scratch':
    log("initializing a new model from scratch")
    model = GPT(GPTConfig(**model_args))
elif start.kind == 'gpt2':
    log(f"initializing from OpenAI GPT-2 weights: {start.init_from}")
    model = load_gpt2(start.init_from, dict(dropout=dropout, attention=attention,
                                            inattn_prefix=inattn_prefix, inattn_shift=inattn_shift))
else:
    log(f"{'resuming' if start.kind == 'resume' else 'initializing'} from {start.path}")
    for k, v in start.inherited.items():
        log(f"using the checkpoint's {k}={v!r} (config had {model_args.get(k)!r})")
    model = build_model(checkpoint, start.path, **start.runtime)  # its position table: grown below
if block_size > model.config.block_size:
    log(f"extending block_size {model.config.block_size} -> {block_size} "
        f"(extend_method={extend_method!r})")
    # extend_method='none' gets here only without a position table: there is nothing to grow
    model.extend_block_size(block_size, 'copy' if extend_method == 'none' else extend_method)
elif block_size < model.config.block_size:
    log(f"cropping block_size {model.config.block_size} -> {block_size}")
    model.crop_block_size(block_size)
model.config.grad_checkpoint = grad_checkpoint  # a memory knob of this run, never inherited
model.to(device)
log(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")

# optimizer and, for float16, the gradient scaler (a no-op otherwise)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if start.kind == 'resume':
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if 'scaler' in checkpoint:  # nanoGPT's checkpoints have none: a fresh scaler calibrates
            scaler.load_state_dict(checkpoint['scaler'])
    except (ValueError, KeyError, RuntimeError) as e:
        die(f"{start.path}: its optimizer state does not fit this model ({type(e).__name__}): "
            f"start a new run from its weights with --init_from={start.path}", status=2)
iter_num, best_val_loss = start.iter_num, start.best_val_loss  # a resume's: its checkpoint's
start.checkpoint = checkpoint = None  # free up memory


def compiled(model):
    """torch.compile(model), tried at once on one micro-batch, forward and backward (where the
    compiling happens); when it cannot compile (no C compiler, Windows, MPS), one line says so and
    the model itself comes back. The trial leaves no trace: its gradients are dropped, its batch
    has a generator of its own, and every micro-batch of training seeds its own dropout."""
    try:
        compiled_model = torch.compile(model)
        X, Y = get_batch('train', torch.Generator().manual_seed(seed))
        with ctx:
            _, loss = compiled_model(X, Y)
        loss.backward()
    except Exception as e:  # a missing compiler, a backend's error, ...: many types
        e = getattr(e, 'inner_exception', e)  # a backend's error, as dynamo passes it on
        why = (str(e).strip().splitlines() or [''])[0][:160]
        log(f"torch.compile cannot compile the model here ({type(e).__name__}: {why}): training "
            f"continues uncompiled (--compile=False skips the attempt)")
        return model
    finally:
        model.zero_grad(set_to_none=True)
    return compiled_model


raw_model = model  # the plain module: what is saved, without torch.compile's and DDP's prefixes
if compile:
    log("compiling the model... (takes a ~minute)")
    model = compiled(raw_model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split. Their batches come from a generator of
    their own, seeded the same at every evaluation, so evaluations are comparable. Only the master
    process evaluates, so only it shows a progress bar (and only on a terminal)."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        generator = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in tqdm(range(eval_iters), desc=f"eval {split}", leave=False, disable=None):
            X, Y = get_batch(split, generator)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 1..0
    return min_lr + coeff * (learning_rate - min_lr)


def micro_seed(it, micro_step):
    """The seed of micro-batch micro_step (counted over all DDP processes) of iteration it: a
    function of (seed, it, micro_step) alone, so one process and N processes draw the same batches
    and dropout, and a resume continues them exactly. SeedSequence spreads the three numbers."""
    return int(np.random.SeedSequence([seed, it, micro_step]).generate_state(1)[0])


def check_in_sync():
    """Stop if the DDP processes hold different weights: each parameter's bits, summed as integers,
    must be equal everywhere (the minimum and the maximum over the processes agree)."""
    params = list(raw_model.named_parameters())
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float's bits as an integer
    sums = [p.detach().reshape(-1).view(ints[p.element_size()]).sum(dtype=torch.int64)
            for _, p in params]
    low = torch.stack(sums)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [params[i][0] for i in (low != high).nonzero().flatten().tolist()]
    if differ:  # every process sees the same low and high, so all of them stop here
        stop_all(f"the {ddp_world_size} processes hold different weights after the step of "
                 f"iteration {iter_num} ({len(differ)} of {len(params)} tensors differ, e.g. "
                 f"{differ[0]}): something in the update depends on the process; "
                 f"{out_dir}/ckpt.pt is left as it was")


def save_checkpoint(name):
    """Everything needed to resume exactly (nanoGPT's keys), the GradScaler, and the vocabulary,
    to out_dir/name (ckpt.pt or last.pt, see the top); written atomically, after the log's records
    reach the disk. -> '' or, when the disk is full, the one line that says so."""
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'model_args': asdict(raw_model.config),
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'meta': meta,
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    print(f"saving checkpoint to {path}")
    try:
        if log_file is not None:
            os.fsync(log_file.fileno())
        write_checkpoint(checkpoint, path)
    except DiskFull as e:
        return f"{e.strerror}; free some space and resume with the same command"
    last = os.path.join(out_dir, 'last.pt')
    if name == 'ckpt.pt' and os.path.exists(last):  # the best is the latest: last.pt is stale
        os.remove(last)
    return ''


log_path = os.path.join(out_dir, 'log.jsonl')
log_file = None  # opened at the first record
log_failure = ''  # the one line of a full disk while logging
elapsed_before = 0.0  # the run's seconds before this process: the last kept record's


def open_log(start):
    """out_dir/log.jsonl, open to append, holding the records of the iterations before `start`
    (this run's first iteration) only: later ones, and a line cut short, are from an attempt
    that died after its last checkpoint, and this run writes them again."""
    global elapsed_before
    kept, dropped = [], False
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    keep = line.endswith('\n') and rec['iter'] < start
                except (ValueError, KeyError, TypeError):
                    keep = False
                if keep:
                    kept.append(line)
                    elapsed_before = rec['elapsed_s']
                dropped = dropped or not keep
    if dropped:
        with prepare_data.atomic_path(log_path) as tmp, open(tmp, 'w') as f:
            f.writelines(kept)
    return open(log_path, 'a')


def record(**fields):
    """Append one record to log.jsonl, on the master process (not with eval_only). A full disk
    stops the run as a failed checkpoint does: at once, or under DDP at the next evaluation, where
    every process learns of it."""
    global log_file, log_failure
    if not master_process or eval_only or log_failure:
        return
    try:
        if log_file is None:
            os.makedirs(out_dir, exist_ok=True)
            log_file = open_log(first_iter)
        fields['elapsed_s'] = round(elapsed_before + time.time() - t_start, 3)
        log_file.write(json.dumps(fields) + '\n')
        log_file.flush()
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        log_failure = (f"the disk is full: {log_path} was not written (the checkpoint there is "
                       f"intact); free some space and resume with the same command")
        if not ddp:
            stop_all(log_failure)


def agree(message):
    """Under DDP, every process takes the master's message (the master alone evaluates and saves),
    so that all of them stop together and none waits forever in a collective."""
    if not ddp:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        die("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop: iter_num counts the optimizer steps taken so far
log(f"MFU is per GPU, relative to peak_tflops={peak_tflops:g} TFLOP/s (default: A100 bf16); set "
    f"--peak_tflops for your hardware")
first_iter, t_start = iter_num, time.time()  # for log.jsonl
local_iter_num = 0  # iterations in this process, to skip the first few in the MFU average
running_mfu = -1.0
skipped_steps = 0  # float16: optimizer steps that the GradScaler skipped (overflowed gradients)
while True:
    # learning rate of this iteration; some param groups (Infini-attention's gates) scale it
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        failure = ''
        if master_process:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, "
                  f"val loss {losses['val']:.4f}")
            record(iter=iter_num, kind='eval', train_loss=losses['train'], val_loss=losses['val'],
                   lr=lr)
            if wandb_log:
                wandb.log({'iter': iter_num, 'train/loss': losses['train'],
                           'val/loss': losses['val'], 'lr': lr, 'mfu': running_mfu * 100})
            if iter_num > 0 and not eval_only and math.isfinite(losses['val']) and not log_failure:
                better = losses['val'] < best_val_loss
                best_val_loss = min(best_val_loss, losses['val'])
                # the best weights stay in ckpt.pt; a worse state goes to last.pt, to resume from
                failure = save_checkpoint('ckpt.pt' if better or always_save_checkpoint
                                          else 'last.pt')
            failure = log_failure or failure
        failure = agree(failure)
        if failure:
            stop_all(failure)
    if eval_only or iter_num >= max_iters:
        break

    # forward, backward and update, with gradient accumulation over micro-batches
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        # this process's micro-steps are numbers rank*k .. rank*k + k-1 of the iteration's
        torch.manual_seed(micro_seed(iter_num, ddp_rank * gradient_accumulation_steps + micro_step))
        X, Y = get_batch('train')
        if ddp:  # all-reduce the gradients after the last micro-step only (what no_sync() does)
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        with ctx:
            _, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps  # the gradient of the mean loss
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if ddp:  # every process sees the same mean loss, so all take the same decision below
        dist.all_reduce(loss_sum)
        loss_sum /= ddp_world_size
    lossf = loss_sum.item()
    if not math.isfinite(lossf):
        if on_nonfinite == 'stop':
            stop_all(f"loss is {lossf} at iteration {iter_num}: stopped; {out_dir}/ckpt.pt is "
                     f"left as it was. Lower learning_rate, or use --on_nonfinite=skip")
        log(f"iter {iter_num}: loss is {lossf}, optimizer step skipped")
    else:
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(optimizer)  # with float16: skipped if the scaled gradients overflowed
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale:  # update() lowers it after a skip
            skipped_steps += 1
            log(f"iter {iter_num}: float16 gradients overflowed, optimizer step skipped "
                f"(GradScaler scale now {scaler.get_scale():g})")
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory right away
    if check_sync and ddp:
        check_in_sync()

    # timing and logging
    dt = time.time() - t0
    if iter_num % log_interval == 0 and master_process:
        if local_iter_num >= 5:  # let the training loop settle a bit
            fwdbwd = batch_size * gradient_accumulation_steps
            mfu = raw_model.estimate_mfu(fwdbwd, dt, peak_tflops * 1e12)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"  # from iteration 5
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, "
              f"{tokens_per_iter / dt:,.0f} tokens/s, mfu {mfu_text}")
        record(iter=iter_num, kind='train', loss=lossf, lr=lr,
               tokens_per_s=round(tokens_per_iter / dt))
    iter_num += 1
    local_iter_num += 1

if device_type == 'cuda':  # what .ci/gpu compares with bench_vram's training budget
    peak = torch.cuda.max_memory_allocated()
    log(f"peak GPU memory: {peak} bytes ({peak / 2**30:.2f} GiB, torch.cuda.max_memory_allocated)")
if scaler.is_enabled():
    log(f"float16: the GradScaler skipped {skipped_steps} of {local_iter_num} optimizer steps")
if wandb_log and master_process:
    wandb.finish()
if ddp:
    dist.barrier()  # every process leaves after the master's last checkpoint
    leave_process_group(0)
