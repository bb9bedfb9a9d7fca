"""
Train a GPT (model.py) on one CPU or GPU, or on several GPUs with DDP. nanoGPT's train.py, read top to bottom.

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False   # small, on a laptop
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py         # GPT-2 124M on 8 GPUs

Every variable in the block below is a config key: set it in a config file or with --key=value (--help lists
them). init_from chooses the start:
  'scratch'      a new model
  'resume'       continue out_dir/ckpt.pt exactly: same iteration, weights and optimizer state
  a path         a checkpoint file (or a folder holding ckpt.pt): its weights start a new run at iteration 0,
                 e.g. to fine-tune at a larger block_size (the position table is extended with extend_method)
  'gpt2', ...    OpenAI's GPT-2 weights from Hugging Face ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
Each micro-batch (its data and its dropout masks) is a function of (seed, iteration, micro-step) alone, so a run
is reproducible, a resumed run continues exactly like an uninterrupted one, and DDP over N processes computes
the same steps as one process with the same gradient_accumulation_steps.
"""
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from configurator import configure_or_exit, die
from model import GPT, GPTConfig, check_config
from sample import load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
# default config values: GPT-2 124M on OpenWebText (nanoGPT)
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # False: save only when val loss improves (and always at the end)
init_from = 'scratch'  # 'scratch' | 'resume' | a checkpoint file or folder | 'gpt2*' (see the top of the file)
init_hint = ''  # the command that makes the init_from checkpoint: named in the error when it is missing
# wandb logging
wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'  # a name (data/<name>/, prepared on first use) or a folder path: train.bin, val.bin, meta.pkl
gradient_accumulation_steps = 5 * 8  # micro-batches per optimizer step, summed over all DDP processes
batch_size = 12  # micro-batch size
block_size = 1024
# model: every GPTConfig field except vocab_size, which comes from the dataset (meanings in model.py)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # biases in Linears and LayerNorms? (GPT-2 has them; a bit better and faster without)
attention = 'causal'
pos_emb = 'learned'
sdpa = True
inattn_cache = 's'
lightning_block = 64
infini_segment = 64
infini_update = 'linear'
infini_memory = True
infini_beta_lr = 1e-2
extend_method = 'interpolate'  # a checkpoint's position table grown to a larger block_size: 'interpolate',
                               # 'copy' (tile the rows) or 'none' (stop with an error instead)
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
dtype = 'auto'  # 'float32' | 'bfloat16' | 'float16' (GradScaler); auto = bfloat16 where the GPU has it, else
                # float16 on a GPU, float32 on a CPU
compile = True  # torch.compile the model (PyTorch 2)
seed = 1337  # the initial weights, and with (iteration, micro-step) the data and dropout of every micro-batch
on_nonfinite = 'stop'  # a nan/inf loss: 'stop' (the last good checkpoint stays) or 'skip' that optimizer step
check_sync = False  # DDP: after every step compare each parameter's checksum across the processes; stop if any differ
peak_tflops = 312.0  # MFU is relative to this peak, per GPU: A100 bf16 dense by default
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
config = configure_or_exit(defaults, sys.argv[1:])
globals().update(config)  # the overrides become the variables above (nanoGPT's configurator)
# impossible settings stop here, before any data or model work
choices = dict(dtype=('auto', 'float32', 'bfloat16', 'float16'), on_nonfinite=('stop', 'skip'),
               extend_method=('interpolate', 'copy', 'none'), backend=('auto', 'nccl', 'gloo'))
for key, valid in choices.items():
    if config[key] not in valid:
        die(f"{key}={config[key]!r} is not one of {', '.join(valid)}", status=2)
for key in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters'):
    if config[key] < 1:
        die(f"{key}={config[key]} must be at least 1", status=2)
for key in ('max_iters', 'seed', 'learning_rate', 'min_lr', 'warmup_iters', 'weight_decay', 'grad_clip'):
    if config[key] < 0:
        die(f"{key}={config[key]} must not be negative", status=2)
if not 0 <= dropout < 1:
    die(f"dropout={dropout} must be in [0, 1)", status=2)
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name != 'vocab_size'}
try:
    check_config(GPTConfig(**model_args))  # e.g. n_embd divisible by n_head (vocab_size comes from the data later)
except ValueError as e:
    die(e, status=2)
if device.startswith('cuda') and not torch.cuda.is_available():
    die(f"device={device!r} but PyTorch sees no CUDA GPU: use --device=cpu (or mps on a Mac)", status=2)
# -----------------------------------------------------------------------------

# DDP: torchrun starts one process per GPU (or CPU worker) and tells it its RANK
ddp = 'RANK' in os.environ
if ddp:
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if gradient_accumulation_steps % ddp_world_size != 0:
        die(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the {ddp_world_size} "
            f"processes: use a multiple of {ddp_world_size}", status=2)
    gradient_accumulation_steps //= ddp_world_size  # each process does its share of the micro-batches
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    if backend == 'auto':
        backend = 'nccl' if device.startswith('cuda') else 'gloo'
    dist.init_process_group(backend=backend)
    master_process = ddp_rank == 0  # this process logs and writes checkpoints
else:
    ddp_rank, ddp_world_size, master_process = 0, 1, True


def log(*args):
    """print on the master process only: one copy of each message under DDP."""
    if master_process:
        print(*args)


torch.manual_seed(seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu'  # for autocast
if dtype == 'auto':
    dtype = 'float32' if device_type == 'cpu' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
if dtype == 'float16' and device_type != 'cuda':
    die("dtype='float16' needs a CUDA GPU (it trains with a GradScaler): use float32 or bfloat16", status=2)
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

# the checkpoint to start from, read and checked before the data: a wrong one is reported at once
checkpoint = None
from_gpt2 = init_from.startswith('gpt2') and not os.path.exists(init_from)
position_table = 1024 if from_gpt2 else None  # rows of the learned position table we start from (GPT-2: 1024)
if init_from != 'scratch' and not from_gpt2:
    ckpt_path = os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from
    if os.path.isdir(ckpt_path):
        ckpt_path = os.path.join(ckpt_path, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        make = f"make it with `{init_hint}`" if init_hint else "train one first, or use --init_from=scratch"
        die(f"init_from={init_from!r}: no checkpoint at {ckpt_path}; {make}", status=2)
    checkpoint = load_checkpoint(ckpt_path)  # a truncated or foreign file stops here with one line
    saved = checkpoint['model_args']
    if init_from == 'resume' and not {'optimizer', 'scaler', 'iter_num', 'best_val_loss'} <= checkpoint.keys():
        die(f"{ckpt_path} holds weights but no optimizer state, so it cannot be resumed: start a new run from it "
            f"with --init_from={ckpt_path}", status=2)
    # the checkpoint fixes the architecture (nanoGPT): a key left at its default takes the checkpoint's value, one
    # set to another value is a mistake, not a wish to ignore. Not fixed: regularisation, implementation and
    # evaluation knobs, and the vocabulary (checked against the data below); block_size: see below.
    runtime_keys = ('dropout', 'sdpa', 'inattn_cache', 'lightning_block', 'infini_segment', 'infini_memory',
                    'infini_beta_lr')
    for k in model_args:
        if k not in ('block_size', *runtime_keys) and config[k] != defaults[k] and config[k] != saved.get(k):
            die(f"{k}={config[k]!r} was asked for but {ckpt_path} is a model with {k}={saved.get(k)!r}: drop the "
                f"{k} override (the checkpoint fixes the architecture), or train from scratch", status=2)
    if init_from == 'resume' and block_size != saved['block_size']:
        die(f"resume continues the same run, but block_size={block_size} differs from the checkpoint's "
            f"{saved['block_size']}: drop the override, or start a new run with --init_from={ckpt_path}", status=2)
    position_table = saved['block_size'] if saved.get('pos_emb', 'learned') == 'learned' else None
if position_table is not None and block_size > position_table and extend_method == 'none':
    die(f"block_size={block_size} is past the {position_table} rows of the position table of {init_from}: use "
        f"--extend_method=interpolate (or copy) to grow it, or block_size<={position_table}", status=2)

# data: a dataset name is prepared on first use (by one process, while the others wait)
repo = os.path.dirname(os.path.abspath(__file__))
data_dir = dataset if '/' in dataset else os.path.join(repo, 'data', dataset)
if not prepare_data.is_prepared(data_dir):
    if dataset not in prepare_data.DATASETS:
        die(f"no prepared dataset in {data_dir} (train.bin, val.bin, meta.pkl): use one of "
            f"{', '.join(prepare_data.DATASETS)}, or a folder written by prepare_data.py", status=2)
    if master_process:
        print(f"dataset {dataset!r} is not prepared yet: preparing it now (python prepare_data.py {dataset})")
        try:
            prepare_data.prepare(dataset)
        except prepare_data.PrepareError as e:
            die(e)
    if ddp:
        dist.barrier()
with open(os.path.join(data_dir, 'meta.pkl'), 'rb') as f:
    meta = pickle.load(f)  # the vocabulary: saved in every checkpoint so that sample.py can decode
for split in ('train', 'val'):
    n_tokens = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2  # uint16
    if n_tokens <= block_size:
        die(f"{data_dir}/{split}.bin has {n_tokens} tokens, too few for block_size={block_size}: use a smaller "
            f"block_size or more text", status=2)


def vocabulary(meta):
    """What a meta.pkl's ids mean, in words: a character table, or a BPE tokenizer."""
    return f"{meta['vocab_size']} characters" if 'stoi' in meta else f"the {meta.get('tokenizer')} BPE"


if checkpoint is not None or from_gpt2:  # the ids must mean what they meant when the weights were trained
    trained_meta = checkpoint['meta'] if checkpoint is not None else {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    if (meta.get('stoi'), meta.get('tokenizer')) != (trained_meta.get('stoi'), trained_meta.get('tokenizer')):
        die(f"dataset {dataset!r} has another vocabulary ({vocabulary(meta)}) than the model of {init_from} was "
            f"trained on ({vocabulary(trained_meta)}): use that model's dataset, or train from scratch", status=2)


def get_batch(split, generator=None):
    """batch_size random windows of block_size tokens: inputs x and next-token targets y, both (B, T)."""
    # recreate np.memmap every batch to avoid a memory leak, as per https://stackoverflow.com/questions/45132940
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device_type == 'cuda':  # pinned memory lets the copy to the GPU run asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
log(f"tokens per iteration will be: {tokens_per_iter:,}")

# model: from scratch, from a checkpoint (resume or new run), or from GPT-2
iter_num = 0
best_val_loss = 1e9
# GPT-2's 50257 tokens are padded to 50304 (a multiple of 64) for faster matmuls; a character vocabulary is kept
model_args['vocab_size'] = meta['vocab_size'] if 'stoi' in meta else math.ceil(meta['vocab_size'] / 64) * 64
if init_from == 'scratch':
    log("initializing a new model from scratch")
    model = GPT(GPTConfig(**model_args))
elif from_gpt2:
    log(f"initializing from OpenAI GPT-2 weights: {init_from}")
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=dropout, attention=attention))
    except OSError as e:
        die(f"could not load {init_from!r} from Hugging Face ({type(e).__name__}): it needs internet access once, "
            f"or a copy in the Hugging Face cache")
else:
    log(f"{'resuming' if init_from == 'resume' else 'initializing'} from {ckpt_path}")
    for k, v in saved.items():
        if k not in ('vocab_size', 'block_size', *runtime_keys) and model_args.get(k) != v:
            log(f"using the checkpoint's {k}={v!r} (config had {model_args.get(k)!r})")
    # runtime knobs too: a key left at its default keeps the checkpoint's value (a model trained with 16-token
    # segments is evaluated with 16-token segments), one set explicitly wins
    runtime = {k: saved.get(k, model_args[k]) if config[k] == defaults[k] else model_args[k] for k in runtime_keys}
    model = model_from_checkpoint(checkpoint, ckpt_path, **runtime)  # the position table as saved: grown below
if block_size > model.config.block_size:
    log(f"extending block_size {model.config.block_size} -> {block_size} (extend_method={extend_method!r})")
    # extend_method='none' reaches this line only for a model without a position table: there is nothing to grow
    model.extend_block_size(block_size, 'copy' if extend_method == 'none' else extend_method)
elif block_size < model.config.block_size:
    log(f"cropping block_size {model.config.block_size} -> {block_size}")
    model.crop_block_size(block_size)
model.to(device)
log(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")

# optimizer and, for float16, the gradient scaler (a no-op otherwise)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == 'resume':
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
    except (ValueError, KeyError, RuntimeError) as e:
        die(f"{ckpt_path}: its optimizer state does not fit this model ({type(e).__name__}): start a new run from "
            f"its weights with --init_from={ckpt_path}", status=2)
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
checkpoint = None  # free up memory

raw_model = model  # the plain module: what gets saved, without the prefixes of torch.compile and DDP
if compile:
    log("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split. Their batches come from a generator of their own, seeded the
    same at every evaluation: evaluations are comparable. Only the master process evaluates, so only it shows a
    progress bar."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        generator = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in tqdm(range(eval_iters), desc=f"eval {split}", leave=False, disable=None):  # None: no bar in logs
            X, Y = get_batch(split, generator)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    """Linear warmup for warmup_iters steps, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 1..0
    return min_lr + coeff * (learning_rate - min_lr)


def micro_seed(it, micro_step):
    """The seed of micro-batch micro_step (counted over all DDP processes) of iteration it: a function of (seed, it,
    micro_step) alone, so one process and N processes draw the same batches and dropout, and a resume continues
    them exactly. SeedSequence mixes the three numbers into well-spread seeds."""
    return int(np.random.SeedSequence([seed, it, micro_step]).generate_state(1)[0])


def leave_process_group(worker_status):
    """DDP's exit: destroy the process group; a worker then exits at once. With torch 2.13 + gloo, a worker's
    interpreter teardown aborted ("terminate called without an active exception") in ~1 run of 5, so it skips it."""
    dist.destroy_process_group()
    if not master_process:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(worker_status)


def stop_all(message):
    """Stop every process, which all reached the same decision: leave the process group first, then the master
    process says why in one line."""
    if ddp:
        leave_process_group(1)
    die(message)


def check_in_sync():
    """Stop if the DDP processes hold different weights: each parameter's bits, summed as integers, must be equal
    everywhere (the minimum and the maximum over the processes agree)."""
    params = list(raw_model.named_parameters())
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float's bits, read as an integer of its size
    sums = torch.stack([p.detach().reshape(-1).view(ints[p.element_size()]).sum(dtype=torch.int64) for _, p in params])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [params[i][0] for i in (low != high).nonzero().flatten().tolist()]
    if differ:  # every process sees the same low and high, so all of them stop here
        stop_all(f"the {ddp_world_size} processes hold different weights after the step of iteration {iter_num} "
            f"({len(differ)} of {len(params)} tensors differ, e.g. {differ[0]}): something in the update depends "
            f"on the process; {out_dir}/ckpt.pt is left as it was")


def save_checkpoint():
    """Everything needed to resume exactly, and to decode (meta). Written to a temp file, flushed to disk, then
    renamed: whenever the process dies, ckpt.pt is a complete checkpoint, the previous one or the new one."""
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
    path = os.path.join(out_dir, 'ckpt.pt')
    print(f"saving checkpoint to {path}")
    torch.save(checkpoint, path + '.tmp')
    fd = os.open(path + '.tmp', os.O_RDONLY)
    os.fsync(fd)  # the bytes reach the disk before the rename makes them the checkpoint (a power cut, too)
    os.close(fd)
    os.replace(path + '.tmp', path)  # atomic: ckpt.pt is the old file or the new one, never a mix


if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        die("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop: iter_num counts the optimizer steps taken so far
log(f"MFU is per GPU, relative to peak_tflops={peak_tflops:g} TFLOP/s (default: A100 bf16); set --peak_tflops "
    f"for your hardware")
local_iter_num = 0  # iterations in this process, to skip the first few in the MFU average
running_mfu = -1.0
while True:
    # learning rate of this iteration; some param groups (Infini-attention's gates) scale it
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)

    # evaluate the loss on train/val sets and write checkpoints
    if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and master_process:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                       'mfu': running_mfu * 100})
        if iter_num > 0 and not eval_only and math.isfinite(losses['val']) and (
                losses['val'] < best_val_loss or always_save_checkpoint or iter_num == max_iters):
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint()
    if eval_only or iter_num >= max_iters:
        break

    # forward, backward and update, with gradient accumulation over micro-batches
    t0 = time.time()
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        # this process's micro-steps are numbers rank*k .. rank*k + k-1 of the iteration's micro-steps
        torch.manual_seed(micro_seed(iter_num, ddp_rank * gradient_accumulation_steps + micro_step))
        X, Y = get_batch('train')
        if ddp:  # all-reduce the gradients only after the last micro-step (what DDP's no_sync() does)
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        with ctx:
            _, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps  # the accumulated gradient is that of the mean loss
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if ddp:  # every process sees the same mean loss, so all take the same decision below
        dist.all_reduce(loss_sum)
        loss_sum /= ddp_world_size
    lossf = loss_sum.item()
    if not math.isfinite(lossf):
        if on_nonfinite == 'stop':
            stop_all(f"loss is {lossf} at iteration {iter_num}: stopped; {out_dir}/ckpt.pt is left as it was. Lower "
                f"learning_rate, or use --on_nonfinite=skip")
        log(f"iter {iter_num}: loss is {lossf}, optimizer step skipped")
    else:
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # with float16, skipped if the scaled gradients overflowed
        scaler.update()
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory right away
    if check_sync and ddp:
        check_in_sync()

    # timing and logging
    dt = time.time() - t0
    if iter_num % log_interval == 0 and master_process:
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak_tflops * 1e12)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"  # measured from the 5th iteration
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tokens_per_iter / dt:,.0f} tokens/s, "
              f"mfu {mfu_text}")
    iter_num += 1
    local_iter_num += 1

if ddp:
    dist.barrier()  # every process leaves after the master's last checkpoint
    leave_process_group(0)
