"""train.py as a user runs it: checkpoints, exact resume,
determinism, context extension, non-finite losses."""
import ast
import hashlib
import re
import shutil
from dataclasses import fields

import torch

from conftest import N, REPO, TINY, assert_same_state, one_line_error, run, run_here
from model import GPTConfig


def load(folder):
    return torch.load(folder / 'ckpt.pt', map_location='cpu', weights_only=False)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def curve(stdout):
    """The evaluations and the training losses, in the order logged."""
    return re.findall(r'^(?:step \d+: .*|iter \d+: loss [\d.]+)', stdout, re.M)


def train(tmp, out, *args, expect_ok=True):
    return run('train.py', *TINY, f'--out_dir={out}', *args, cwd=tmp, expect_ok=expect_ok)


def test_every_model_field_is_a_config_key():
    tree = ast.parse((REPO / 'train.py').read_text())
    keys = {t.id for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}
    assert {f.name for f in fields(GPTConfig)} - {'vocab_size'} <= keys


def test_training_writes_a_checkpoint_with_everything_to_resume_and_decode(first_run, char_data):
    out, stdout = first_run
    assert re.search(r'iter 3: loss [\d.]+, time [\d.]+ms, [\d,]+ tokens/s, mfu', stdout)
    assert 'MFU is per GPU, relative to peak_tflops=312' in stdout
    assert f'step {N}: train loss' in stdout
    ckpt = load(out)
    assert set(ckpt) >= {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config',
                         'meta'}
    assert ckpt['iter_num'] == N and ckpt['model_args']['n_layer'] == 2
    assert ckpt['meta']['itos'][0] == '\n'
    assert ckpt['meta']['vocab_size'] == ckpt['model_args']['vocab_size']
    assert ckpt['config']['dataset'] == str(char_data)
    assert not (out / 'ckpt.pt.tmp').exists()  # written to a temp file, then renamed


def test_eval_only_evaluates_the_checkpoint_on_the_same_batches_and_writes_nothing(
        first_run, char_data, tmp_path):
    out, stdout = first_run
    before = digest(out / 'ckpt.pt')
    r = train(tmp_path, out, '--init_from=resume', '--eval_only=True', f'--dataset={char_data}',
              '--dropout=0.1')
    line = re.search(rf'^step {N}: train loss .*$', r.stdout, re.M).group(0)
    assert line in stdout.splitlines()  # evaluation batches are drawn the same way every time
    assert 'iter ' not in r.stdout and digest(out / 'ckpt.pt') == before


def test_resume_continues_exactly_like_a_straight_run(first_run, char_data, tmp_path):
    out, _ = first_run
    shutil.copytree(out, tmp_path / 'resumed')
    common = [f'--dataset={char_data}', f'--max_iters={2 * N}', f'--eval_interval={N}',
              '--dropout=0.1']
    r = train(tmp_path, 'resumed', '--init_from=resume', *common)
    iters = [int(i) for i in re.findall(r'^iter (\d+):', r.stdout, re.M)]
    assert iters == list(range(N, 2 * N))  # continued at iteration N
    train(tmp_path, 'straight', *common)
    resumed, straight = load(tmp_path / 'resumed'), load(tmp_path / 'straight')
    assert resumed['iter_num'] == 2 * N
    # the optimizer state was restored, not restarted: Adam's moments and step counts are identical
    assert_same_state(resumed, straight)


def test_a_finished_run_has_nothing_left_to_do(first_run, char_data, tmp_path):
    """Resuming a run at max_iters, explicitly or by running its command again, writes nothing."""
    out, _ = first_run
    shutil.copytree(out, tmp_path / 'again')
    before = (tmp_path / 'again' / 'ckpt.pt').read_bytes()
    for how in (['--init_from=resume'], []):
        r = train(tmp_path, 'again', *how, f'--dataset={char_data}', f'--max_iters={N}',
                  f'--eval_interval={N}', '--dropout=0.1')
        assert f"is at iteration {N}, max_iters={N}: nothing left to do" in r.stdout
        assert 'iter ' not in r.stdout.split('nothing left to do')[1]
        assert (tmp_path / 'again' / 'ckpt.pt').read_bytes() == before


def test_checkpoint_fixes_the_architecture_and_a_larger_block_size_extends_it(
        first_run, char_data, tmp_path):
    out, _ = first_run
    # n_layer left at its default: the checkpoint's wins
    tiny = [a for a in TINY if not a.startswith('--n_layer')]
    r = run('train.py', *tiny, '--out_dir=longer', f'--init_from={out}', f'--dataset={char_data}',
            '--block_size=64', '--extend_method=copy', '--max_iters=1', '--learning_rate=0.0',
            '--min_lr=0.0', '--eval_interval=1', cwd=tmp_path)
    assert "using the checkpoint's n_layer=2 (config had 12)" in r.stdout
    assert "extending block_size 32 -> 64 (extend_method='copy')" in r.stdout
    assert 'iter 0:' in r.stdout  # a new run from the checkpoint's weights
    old, new = load(out), load(tmp_path / 'longer')
    assert new['model_args']['block_size'] == 64 and new['model_args']['n_layer'] == 2
    assert new['iter_num'] == 1
    wpe_old = old['model']['transformer.wpe.weight']
    wpe_new = new['model']['transformer.wpe.weight']
    assert wpe_new.shape == (64, 32)
    # 'copy' tiles the table; lr 0 kept it
    assert torch.equal(wpe_new, torch.cat([wpe_old, wpe_old]))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(first_run, char_data, tmp_path):
    out, _ = first_run
    shutil.copytree(out, tmp_path / 'diverge')
    good = digest(tmp_path / 'diverge' / 'ckpt.pt')
    # from the good checkpoint at N, a learning rate of 1e30
    # blows the weights up to inf/nan within a few steps
    r = train(tmp_path, 'diverge', '--init_from=resume', f'--dataset={char_data}',
              f'--max_iters={3 * N}', '--eval_interval=1000', '--learning_rate=1e30',
              '--decay_lr=False', '--dropout=0.1', expect_ok=False)
    line = one_line_error(r, 1)
    stop = int(re.search(r'loss is (?:nan|inf|-inf) at iteration (\d+): stopped', line).group(1))
    assert N < stop < 3 * N and re.findall(r'^iter (\d+):', r.stdout, re.M)[-1] == str(stop - 1)
    assert digest(tmp_path / 'diverge' / 'ckpt.pt') == good

    r = train(tmp_path, 'diverge', '--init_from=resume', f'--dataset={char_data}',
              f'--max_iters={3 * N}', '--eval_interval=1000', '--learning_rate=1e30',
              '--decay_lr=False', '--dropout=0.1', '--on_nonfinite=skip')
    assert re.search(rf'^iter {stop}: loss is (nan|inf), optimizer step skipped', r.stdout, re.M)
    assert digest(tmp_path / 'diverge' / 'ckpt.pt') == good  # a nan model is never saved


def test_same_seed_gives_the_same_run_and_another_seed_another(first_run, char_data, tmp_path):
    out, stdout = first_run
    args = [f'--dataset={char_data}', f'--max_iters={N}', f'--eval_interval={N}', '--dropout=0.1']
    again, other = train(tmp_path, 'again', *args), train(tmp_path, 'other', *args, '--seed=7')
    assert len(curve(stdout)) == N + 2 and curve(again.stdout) == curve(stdout)
    a, b = load(out), load(tmp_path / 'again')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    # the seed matters: other initial weights, batches and dropout
    assert curve(other.stdout) != curve(stdout)


def test_unprepared_dataset_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run_here('train.py', *TINY, f'--dataset={tmp_path}/nothing_here')
    assert status == 2 and 'no prepared dataset in' in stderr and len(stderr.splitlines()) == 1


def test_runtime_knobs_left_at_default_keep_the_checkpoints_values(char_data, tmp_path):
    # an Infini-attention model trained with 4-token segments
    # must not be reloaded with train.py's default of 64
    infini = ['--attention=infini', '--pos_emb=none', '--infini_segment=4',
              f'--dataset={char_data}']
    train(tmp_path, 'base', *infini, '--max_iters=1', '--eval_interval=1')
    finetune = [f'--init_from={tmp_path / "base"}', f'--dataset={char_data}', '--max_iters=1',
                '--eval_interval=1', '--learning_rate=0.0', '--min_lr=0.0']
    train(tmp_path, 'kept', *finetune)
    train(tmp_path, 'changed', *finetune, '--infini_segment=8')
    assert load(tmp_path / 'kept')['model_args']['infini_segment'] == 4
    assert load(tmp_path / 'changed')['model_args']['infini_segment'] == 8


def test_long_config_without_its_base_checkpoint_names_the_command_that_makes_it(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run_here('train.py', str(REPO / 'config' / 'inattn_long.py'),
                                 '--out_dir=long')
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert 'no checkpoint at out-inattn-shakespeare-char;' in stderr
    assert '`python train.py config/inattn_shakespeare_char.py --device=cpu' in stderr
    assert not (tmp_path / 'long').exists()


def test_each_micro_batch_of_an_iteration_has_its_own_seed(char_data, tmp_path, monkeypatch):
    # the micro-batches (data and dropout) of one iteration are seeded apart: one seed for all of
    # them would train on the same batch twice
    seeds, manual_seed = [], torch.manual_seed
    monkeypatch.setattr(torch, 'manual_seed', lambda s: seeds.append(s) or manual_seed(s))
    status, _, err = run_here('train.py', *TINY, f'--dataset={char_data}', '--max_iters=2',
                              '--gradient_accumulation_steps=2', '--eval_interval=2',
                              f'--out_dir={tmp_path / "out"}')
    assert status == 0, err
    assert seeds[0] == 1337 and len(seeds[1:]) == 4 and len(set(seeds[1:])) == 4, seeds
