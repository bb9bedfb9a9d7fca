"""configurator.py: config files then --key=value overrides, typed like the defaults,
one-line errors."""
import pytest

from configurator import configure, read_config_file
from conftest import TINY, one_line_error, run

DEFAULTS = dict(learning_rate=6e-4, batch_size=12, compile=True, out_dir='out',
                dataset='openwebtext')


def test_overrides_are_parsed_as_literals_of_the_defaults_type():
    c = configure(DEFAULTS, ['--learning_rate=1e-3', '--batch_size=32', '--out_dir=runs/a b',
                             '--dataset=123'])
    assert c == dict(DEFAULTS, learning_rate=1e-3, batch_size=32, out_dir='runs/a b', dataset='123')
    assert DEFAULTS['batch_size'] == 12  # the defaults themselves are not modified


def test_int_is_accepted_for_a_float():
    c = configure(DEFAULTS, ['--learning_rate=1'])
    assert c['learning_rate'] == 1.0 and isinstance(c['learning_rate'], float)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError,
                       match=r"unknown config key 'lerning_rate'; did you mean learning_rate\?"):
        configure(DEFAULTS, ['--lerning_rate=1e-3'])


@pytest.mark.parametrize('arg', ['--batch_size=3.5', '--batch_size=big', '--learning_rate=fast',
                                 '--batch_size=True'])
def test_wrong_type_is_an_error(arg):
    with pytest.raises(ValueError, match=arg[2:].split('=')[0] + ' must be of type'):
        configure(DEFAULTS, [arg])


def test_bool_must_be_true_or_false():
    assert configure(DEFAULTS, ['--compile=False'])['compile'] is False
    # a bare flag sets True
    assert configure(dict(DEFAULTS, compile=False), ['--compile'])['compile'] is True
    for text in ('false', '0', '1', 'no'):
        with pytest.raises(ValueError, match='compile must be True or False'):
            configure(DEFAULTS, [f'--compile={text}'])
    with pytest.raises(ValueError, match='--batch_size needs a value'):
        configure(DEFAULTS, ['--batch_size'])


def test_config_file_then_override_wins(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("import math\nbatch_size = 64\nlearning_rate = 2 * math.pi\n_scratch = 1\n")
    c = configure(DEFAULTS, [str(cfg), '--batch_size=8'])
    # modules and _names are not keys
    assert c['batch_size'] == 8 and abs(c['learning_rate'] - 6.283185) < 1e-5
    assert configure(DEFAULTS, ['--batch_size=8', str(cfg)])['batch_size'] == 64  # applied in order


def test_config_file_may_only_set_known_keys(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("batch_sise = 64\n")
    with pytest.raises(ValueError, match=r"unknown config key 'batch_sise'; did you mean "
                                         r"batch_size\? \(from .*cfg.py"):
        configure(DEFAULTS, [str(cfg)])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"config file '.*nope.py' not found"):
        configure(DEFAULTS, [str(tmp_path / 'nope.py')])


def test_repo_config_files_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vanilla = read_config_file('config/train_shakespeare_char.py')
    inattn = read_config_file('config/inattn_shakespeare_char.py')
    assert vanilla['n_layer'] == 6 and inattn['attention'] == 'inattention'
    # the InAttention config is a one-flag ablation of the vanilla one (plus where its outputs go)
    differ = {k for k in vanilla.keys() | inattn.keys() if vanilla.get(k) != inattn.get(k)}
    assert differ == {'attention', 'out_dir', 'wandb_run_name'}
    # attention= alone gives a working model: the class brings its own positions
    lightning = read_config_file('config/lightning_shakespeare_char.py')
    differ = {k for k in vanilla.keys() | lightning.keys() if vanilla.get(k) != lightning.get(k)}
    assert differ == {'attention', 'out_dir', 'wandb_run_name'}


def test_scripts_print_one_line_and_exit_2(tmp_path):
    r = run('train.py', '--lerning_rate=1e-3', cwd=tmp_path, expect_ok=False)
    line = one_line_error(r, 2)
    assert line == ("train.py: error: unknown config key 'lerning_rate'; "
                    "did you mean learning_rate? (from the command line)")
    line = one_line_error(run('sample.py', 'config/nope.py', cwd=tmp_path, expect_ok=False), 2)
    assert "config file 'config/nope.py' not found" in line


def test_config_file_reads_the_defaults(tmp_path):
    """As in nanoGPT, a config file runs with every key's current value in its namespace."""
    path = tmp_path / 'cfg.py'
    path.write_text("lr_decay_iters = max_iters\nbatch_size = batch_size * 2\n")
    defaults = dict(DEFAULTS, max_iters=600, lr_decay_iters=600)
    config = configure(defaults, ['--max_iters=7', str(path)])
    assert config['lr_decay_iters'] == 7
    assert config['batch_size'] == 2 * DEFAULTS['batch_size']
    assert configure(defaults, [str(path)])['lr_decay_iters'] == 600


@pytest.mark.parametrize('source, line, kind', [
    ("batch_size = 4\nlearning_rate = 1e-3 +\n", 2, 'invalid syntax'),
    ("batch_size = 4\n\nlearning_rate = undefined_name\n", 3, 'NameError'),
    ("import torch\ntorch = 3\n", None, "unknown config key 'torch'"),
])
def test_config_file_errors_are_one_line_with_file_and_line(tmp_path, source, line, kind):
    path = tmp_path / 'bad.py'
    path.write_text(source)
    r = run('train.py', str(path), cwd=tmp_path, expect_ok=False)
    message = one_line_error(r, 2)
    assert kind in message and 'bad.py' in message
    if line is not None:
        assert f"line {line}" in message


def test_train_echoes_config_file_and_overrides(tmp_path, char_data):
    path = tmp_path / 'cfg.py'
    path.write_text("max_iters = 0\n")
    r = run('train.py', str(path), *TINY, f'--dataset={char_data}', '--out_dir=out',
            '--eval_only=True', cwd=tmp_path)
    assert f"Overriding config with {path}:\nmax_iters = 0" in r.stdout
    assert "Overriding: n_layer = 2" in r.stdout
