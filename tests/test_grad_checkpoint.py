"""--grad_checkpoint: every block recomputed in the backward pass computes the same loss and the
same gradients (the same dropout masks), holds less memory, and is a knob of the run, not of the
model: a run may resume with it switched, and checkpoints without the key still load."""
import re

import pytest
import torch

import bench_vram
from bench_vram import Tracker
from conftest import REPO, TINY, run
from model import GPT, GPTConfig

VARIANTS = {  # every attention class, and InAttention over a causal block and with a token shift
    'causal': dict(attention='causal'),
    'inattention': dict(attention='inattention'),
    'inattention-p1': dict(attention='inattention', inattn_prefix=1),
    'inattention-s1': dict(attention='inattention', inattn_shift=1),
    'lightning': dict(attention='lightning', lightning_block=8),
    'infini': dict(attention='infini', infini_segment=8),
}


def loss_and_grads(config, x, y, grad_checkpoint):
    torch.manual_seed(0)  # the same weights
    model = GPT(GPTConfig(**config, grad_checkpoint=grad_checkpoint)).train()
    torch.manual_seed(1)  # the same dropout masks, if the recompute draws them again alike
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('variant', VARIANTS)
def test_loss_and_every_gradient_equal_those_without_it(variant):
    config = dict(block_size=32, vocab_size=37, n_layer=3, n_head=4, n_embd=32, dropout=0.2,
                  **VARIANTS[variant])
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randint(37, (2, 32), generator=g) for _ in range(2))
    loss, grads = loss_and_grads(config, x, y, False)
    loss_ckpt, grads_ckpt = loss_and_grads(config, x, y, True)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)


def peak(variant, grad_checkpoint, T=512):
    """The tracker's peak over one training step of the small preset at batch 1, T tokens."""
    cfg = dict(bench_vram.PRESETS['small'], block_size=T, dropout=0.1,
               **bench_vram.variants()[variant])
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg, grad_checkpoint=grad_checkpoint)).train()
    x, y = (torch.randint(cfg['vocab_size'], (1, T)) for _ in range(2))
    with Tracker() as t:
        _, loss = model(x, y)
        loss.backward()
    return t.peak


@pytest.mark.parametrize('variant', ['causal', 'inattention', 'lightning', 'infini'])
def test_training_peak_is_lower_with_it_at_512_tokens(variant):
    assert peak(variant, True) < 0.8 * peak(variant, False)


def test_not_used_without_gradients_or_in_eval_mode():
    """Inference never recomputes: no_grad and eval give the same output and keep no graph."""
    cfg = dict(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg, grad_checkpoint=True)).eval()
    x = torch.randint(11, (1, 16))
    with Tracker() as t:
        with torch.no_grad():
            model(x)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**cfg)).eval()
    with Tracker() as t_plain:
        with torch.no_grad():
            plain(x)
    assert t.peak == t_plain.peak
    torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=0, atol=0)


def losses(stdout):
    return re.findall(r'^iter \d+: loss ([\d.]+)', stdout, re.M)


def test_train_py_same_losses_and_resume_may_switch_it(char_data, tmp_path):
    common = [*TINY, f'--dataset={char_data}', '--dropout=0.1', '--max_iters=2',
              '--eval_interval=2']
    plain = run('train.py', *common, '--out_dir=plain', cwd=tmp_path)
    ckpt = run('train.py', *common, '--out_dir=ckpt', '--grad_checkpoint=True', cwd=tmp_path)
    assert losses(ckpt.stdout) == losses(plain.stdout) and len(losses(plain.stdout)) == 2
    saved = torch.load(tmp_path / 'ckpt' / 'ckpt.pt', weights_only=False)
    assert saved['model_args']['grad_checkpoint'] is True
    # a checkpoint written before the key existed: resumes, with or without it
    del saved['model_args']['grad_checkpoint']
    torch.save(saved, tmp_path / 'ckpt' / 'ckpt.pt')
    more = ['--init_from=resume', '--max_iters=3', '--eval_interval=3']
    r = run('train.py', *common, *more, '--out_dir=ckpt', '--grad_checkpoint=False', cwd=tmp_path)
    assert len(losses(r.stdout)) == 1
    r = run('train.py', *common, *more, '--out_dir=plain', '--grad_checkpoint=True', cwd=tmp_path)
    assert len(losses(r.stdout)) == 1
    assert torch.load(tmp_path / 'plain' / 'ckpt.pt',
                      weights_only=False)['model_args']['grad_checkpoint'] is True


@pytest.mark.parametrize('name', ['train_long_gpt2_1gpu', 'inattn_long_gpt2_1gpu'])
def test_one_card_configs_keep_the_8_gpu_recipes_tokens_per_step(name):
    one, eight = {}, {}
    exec((REPO / 'config' / f'{name}.py').read_text(), one)
    exec((REPO / 'config' / f"{name.removesuffix('_1gpu')}.py").read_text(), eight)
    tokens = lambda c: c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']  # noqa
    assert tokens(one) == tokens(eight) == 524_288 and one['block_size'] == 4096
    assert isinstance(one['grad_checkpoint'], bool)
    # OpenAI's GPT-2 is a causal model; the InAttention one only the 8-GPU pretraining makes
    if one['attention'] == 'causal':
        assert one['init_from'] == 'gpt2'
    else:
        assert 'nproc_per_node=8' in one['init_hint'] and one['init_from'] == eight['init_from']
