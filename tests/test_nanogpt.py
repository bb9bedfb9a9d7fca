"""A nanoGPT user's files work unchanged: a checkpoint written in nanoGPT's exact format (no meta,
no scaler, '_orig_mod.' names from torch.compile) samples, is evaluated and resumes; a data folder
is used as it is (meta.pkl for characters, none for GPT-2 BPE) and never prepared again."""
import os
import pickle

import numpy as np
import torch

from conftest import run
from model import GPT, GPTConfig

# nanoGPT's train.py: every key of its config block, as it saves them in ckpt['config']
NANOGPT_CONFIG = dict(
    out_dir='out', eval_interval=2, log_interval=1, eval_iters=2, eval_only=False,
    always_save_checkpoint=True, init_from='scratch', wandb_log=False, wandb_project='owt',
    wandb_run_name='gpt2', dataset='', gradient_accumulation_steps=1, batch_size=4,
    block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False, learning_rate=1e-3,
    max_iters=3, weight_decay=1e-1, beta1=0.9, beta2=0.95, grad_clip=1.0, decay_lr=True,
    warmup_iters=2, lr_decay_iters=8, min_lr=1e-4, backend='nccl', device='cpu',
    dtype='float32', compile=True)


# nanoGPT's names, as data (karpathy/nanoGPT, commit 3adf61e, model.py and train.py), not taken from
# this repo's GPT: a parameter renamed here would otherwise save and load consistently, unnoticed.
NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')
NANOGPT_CHECKPOINT_KEYS = ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss',
                           'config')


def nanogpt_parameters(n_layer, n_embd, block_size, vocab_size, bias):
    """name -> shape of nanoGPT's GPT.state_dict(), in its order (lm_head.weight is tied to
    transformer.wte.weight: the same tensor under both names; biases only when bias=True)."""
    C = n_embd
    names = {'transformer.wte.weight': (vocab_size, C), 'transformer.wpe.weight': (block_size, C)}
    layers = {'ln_1': (C, C), 'attn.c_attn': (3 * C, C), 'attn.c_proj': (C, C), 'ln_2': (C, C),
              'mlp.c_fc': (4 * C, C), 'mlp.c_proj': (C, 4 * C)}  # (out, in); LayerNorm: (C,)
    for i in range(n_layer):
        for layer, (out, inp) in layers.items():
            ln = layer.startswith('ln')
            names[f'transformer.h.{i}.{layer}.weight'] = (out,) if ln else (out, inp)
            if bias:
                names[f'transformer.h.{i}.{layer}.bias'] = (out,)
    names['transformer.ln_f.weight'] = (C,)
    if bias:
        names['transformer.ln_f.bias'] = (C,)
    names['lm_head.weight'] = (vocab_size, C)
    return names


def write_nanogpt_checkpoint(folder, dataset, vocab_size, iter_num=3):
    """What nanoGPT's train.py saves, built from its names: model_args with its seven keys, the
    compiled model's state (names prefixed '_orig_mod.'), AdamW in its two groups (matrices with
    weight decay, the rest without, in named_parameters order: the tied lm_head once, as wte),
    iter_num, best_val_loss (a tensor)."""
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False,
                      vocab_size=vocab_size, dropout=0.0)
    assert tuple(model_args) == NANOGPT_MODEL_ARGS
    g = torch.Generator().manual_seed(0)
    shapes = nanogpt_parameters(2, 32, 32, vocab_size, bias=False)
    state = {name: (torch.ones(shape) if '.ln_' in name or name.startswith('transformer.ln_')
                    else 0.02 * torch.randn(shape, generator=g))
             for name, shape in shapes.items() if name != 'lm_head.weight'}
    state['lm_head.weight'] = state['transformer.wte.weight']  # tied
    params = [torch.nn.Parameter(t) for name, t in state.items() if name != 'lm_head.weight']
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': 0.1},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    checkpoint = {
        'model': {'_orig_mod.' + k: v for k, v in state.items()},
        'optimizer': optimizer.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': torch.tensor(9.0),
        'config': dict(NANOGPT_CONFIG, dataset=str(dataset)),
    }
    assert tuple(checkpoint) == NANOGPT_CHECKPOINT_KEYS
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, folder / 'ckpt.pt')
    return folder


def test_a_nanogpt_checkpoint_samples_evaluates_and_resumes(char_data, tmp_path):
    with open(char_data / 'meta.pkl', 'rb') as f:
        vocab_size = pickle.load(f)['vocab_size']
    out = write_nanogpt_checkpoint(tmp_path / 'out', char_data, vocab_size)
    r = run('sample.py', '--out_dir=out', '--device=cpu', '--num_samples=1',
            '--max_new_tokens=20', '--compile=False', cwd=tmp_path)
    assert r.stdout.count('---------------') == 1
    r = run('eval_long.py', '--ckpt=out', '--context=32', '--bucket=16', cwd=tmp_path)
    assert '| all |' in r.stdout
    r = run('train.py', '--device=cpu', '--compile=False', '--out_dir=out', '--init_from=resume',
            f'--dataset={char_data}', '--max_iters=5', '--eval_interval=5', '--eval_iters=2',
            '--batch_size=4', '--gradient_accumulation_steps=1', cwd=tmp_path)
    assert "resuming from out/ckpt.pt" in r.stdout
    assert 'iter 3:' in r.stdout and 'iter 2:' not in r.stdout
    resumed = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=False)
    assert resumed['iter_num'] == 5 and 'meta' in resumed and 'scaler' in resumed
    # and this repo's checkpoint is nanoGPT's: its keys, model_args and parameter names
    assert set(NANOGPT_CHECKPOINT_KEYS) <= resumed.keys()
    assert set(NANOGPT_MODEL_ARGS) <= resumed['model_args'].keys()
    assert list(resumed['model']) == list(nanogpt_parameters(2, 32, 32, vocab_size, bias=False))


def test_this_repos_parameter_names_are_nanogpts_also_with_biases():
    # train.py saves GPT.state_dict(): the resume test above checks a bias=False checkpoint
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40, bias=True))
    names = nanogpt_parameters(2, 16, 8, 40, bias=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == names


def test_a_nanogpt_bpe_folder_without_meta_is_used_as_it_is(tmp_path):
    """nanoGPT's data/openwebtext holds train.bin and val.bin only: GPT-2 BPE, never re-prepared."""
    data = tmp_path / 'owt'
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, 50257, 4000).astype(np.uint16)
    ids[:3600].tofile(data / 'train.bin')
    ids[3600:].tofile(data / 'val.bin')
    before = sorted(os.listdir(data))
    r = run('train.py', '--device=cpu', '--compile=False', '--out_dir=out', f'--dataset={data}',
            '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=32', '--batch_size=2',
            '--gradient_accumulation_steps=1', '--max_iters=2', '--eval_interval=2',
            '--eval_iters=1', cwd=tmp_path)
    assert 'not prepared' not in r.stdout and sorted(os.listdir(data)) == before
    saved = torch.load(tmp_path / 'out' / 'ckpt.pt', map_location='cpu', weights_only=False)
    assert saved['meta'] == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    assert saved['model_args']['vocab_size'] == 50304  # padded to a multiple of 64, as nanoGPT


def test_sample_accepts_every_key_of_nanogpt_sample(first_run, tmp_path):
    out, _ = first_run
    keys = dict(init_from='resume', out_dir=out, start='\n', num_samples=1, max_new_tokens=8,
                temperature=0.8, top_k=200, seed=1337, device='cpu', dtype='float32',
                compile=False)
    r = run('sample.py', *(f'--{k}={v}' for k, v in keys.items()), cwd=tmp_path)
    assert r.stdout.count('---------------') == 1
