"""Your own text: prepare_data.py text with each tokenizer, the one rule that says what a folder's
ids mean (train.py, sample.py and eval_long.py follow it), one-line errors that write nothing, and
the README's three commands on a text that is not Shakespeare."""
import pickle
import subprocess
import sys

import numpy as np
import pytest

import prepare_data
from checkpoint import load_tokenizer
from conftest import REPO, TINY, one_line_error, run, write_char_dataset

# not Shakespeare: a text about the project itself, with non-ASCII characters
TEXT = ('Attention reads every earlier token; InAttention reads the initial states only. '
        'Lightning keeps a running sum, Infini-attention a compressive memory. — Größe, 長さ.\n') * 40


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text(TEXT, encoding='utf-8')
    return path


def prepare_main(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / 'prepare_data.py'), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def load(folder):
    with open(folder / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    return [np.fromfile(folder / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val')], meta


def test_text_with_characters_goes_to_data_of_the_file_name(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, 'REPO', tmp_path)  # data/ of a repo in tmp_path
    out_dir = prepare_data.prepare('text', input_path=text_file)
    assert out_dir == tmp_path / 'data' / 'notes'
    (train, val), meta = load(out_dir)
    assert meta['tokenizer'] == 'char' and meta['vocab_size'] == len(set(TEXT))
    assert len(train) == int(0.9 * len(TEXT)) and len(train) + len(val) == len(TEXT)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val])) == TEXT


@pytest.mark.parametrize('name', ['gpt2', 'r50k_base'])
def test_text_with_gpt2_bpe_decodes_back(text_file, tmp_path, gpt2_bpe, name):
    out_dir = prepare_data.prepare('text', text_file, tmp_path / 'bpe', tokenizer=name)
    (train, val), meta = load(out_dir)
    assert meta == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}  # gpt2 is r50k_base
    n = int(0.9 * len(TEXT))
    assert gpt2_bpe.decode(train.tolist()) + gpt2_bpe.decode(val.tolist()) == TEXT[:n] + TEXT[n:]


ASK = "import tiktoken; tiktoken.get_encoding('p50k_base')"


def test_text_with_another_tiktoken_encoding_that_fits_uint16(text_file, tmp_path):
    try:
        ok = subprocess.run([sys.executable, '-c', ASK], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        ok = None
    if ok is None or ok.returncode != 0:
        pytest.skip("needs tiktoken's p50k_base: go online once, or set TIKTOKEN_CACHE_DIR")
    out_dir = prepare_data.prepare('text', text_file, tmp_path / 'p50k', tokenizer='p50k_base')
    (train, val), meta = load(out_dir)
    assert meta == {'vocab_size': 50281, 'tokenizer': 'p50k_base'}
    _, _, token_bytes = load_tokenizer(meta)
    assert b''.join(map(token_bytes, np.concatenate([train, val]).tolist())).decode() == TEXT


@pytest.mark.parametrize('setup, args, message', [
    (None, ['--input', 'missing.txt'], '--input missing.txt is not a file'),
    ('', ['--input', 'in.txt'], 'in.txt is empty'),
    ('a few words, far too short for a block of 64\n' * 10, ['--input', 'in.txt'],
     'in.txt is too short: its val split (the last 10%) has 45 tokens, and one block of 64 needs '
     '65; use a longer text'),
    (TEXT, ['--input', 'in.txt', '--tokenizer', 'bpe'], "unknown tokenizer 'bpe'"),
    (TEXT, ['--input', 'in.txt', '--tokenizer', 'cl100k_base'],
     "the tokenizer 'cl100k_base' has 100,277 ids, which do not fit the uint16 files"),
    (TEXT, ['--input', 'in.txt', '--tokenizer', 'o200k_base'], "200,019 ids, which do not fit"),
    (b'\x89PNG\r\n\x1a\n\xff\xfe', ['--input', 'in.txt'], 'in.txt is not UTF-8 text'),
    (TEXT, [], 'text needs --input FILE'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, setup, args, message):
    if isinstance(setup, str):
        (tmp_path / 'in.txt').write_text(setup, encoding='utf-8')
    elif setup is not None:
        (tmp_path / 'in.txt').write_bytes(setup)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = prepare_main('text', *args, '--out_dir', 'out', cwd=tmp_path)
    line = one_line_error(r, 1)
    assert line.startswith('prepare_data.py: error: ') and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, nothing else


def test_the_tokenizer_is_named_never_guessed(tmp_path, gpt2_bpe):
    """The four cases of a folder: 'stoi' (nanoGPT's character folders) means characters, a
    'tokenizer' key names it, no meta.pkl means GPT-2 BPE, a meta.pkl with neither is an error."""
    chars = write_char_dataset(tmp_path / 'chars', 'abc' * 100)  # nanoGPT's: no 'tokenizer' key
    assert prepare_data.tokenizer_name(prepare_data.read_meta(chars)) == 'char'
    named = write_char_dataset(tmp_path / 'named', 'abc' * 100)
    with open(named / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 50257, 'tokenizer': 'r50k_base'}, f)
    assert prepare_data.tokenizer_name(prepare_data.read_meta(named)) == 'r50k_base'
    (named / 'meta.pkl').unlink()  # no meta.pkl: nanoGPT's BPE folders
    assert prepare_data.read_meta(named) == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    neither = write_char_dataset(tmp_path / 'neither', 'abc' * 100)
    with open(neither / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 3}, f)  # ids of some other tokenizer: never taken as GPT-2's
    with pytest.raises(prepare_data.PrepareError, match="names no tokenizer"):
        prepare_data.read_meta(neither)
    # and train.py stops on it with that line, before any training
    r = run('train.py', *TINY, f'--dataset={neither}', '--out_dir=out', '--max_iters=1',
            cwd=tmp_path, expect_ok=False)
    assert "names no tokenizer (no 'stoi' and no 'tokenizer' key)" in one_line_error(r, 1)
    assert not (tmp_path / 'out').exists()


def test_sample_decodes_with_the_tokenizer_it_names_or_stops(first_run, tmp_path):
    """A checkpoint whose vocabulary names no tokenizer is a one-line error in sample.py, not a
    GPT-2 decode."""
    import torch
    out, _ = first_run
    ckpt = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=False)
    ckpt['meta'] = {'vocab_size': ckpt['meta']['vocab_size']}
    (tmp_path / 'odd').mkdir()
    torch.save(ckpt, tmp_path / 'odd' / 'ckpt.pt')
    r = run('sample.py', '--out_dir=odd', '--device=cpu', '--num_samples=1',
            '--max_new_tokens=5', cwd=tmp_path, expect_ok=False)
    assert 'the vocabulary names no tokenizer' in one_line_error(r, 2)


@pytest.mark.parametrize('tokenizer', ['char', 'gpt2'])
def test_the_readme_commands_train_and_sample_on_your_own_text(text_file, tmp_path, tokenizer,
                                                               request):
    """prepare, train (any variant), sample, as the README prints them (tiny and short here)."""
    if tokenizer == 'gpt2':
        request.getfixturevalue('gpt2_bpe')
    r = prepare_main('text', '--input', text_file, '--tokenizer', tokenizer, '--out_dir', 'mine',
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run('train.py', *TINY, f'--dataset={tmp_path / "mine"}', '--attention=inattention',
        '--out_dir=out-mine', '--max_iters=4', '--eval_interval=2', cwd=tmp_path)
    r = run('sample.py', '--out_dir=out-mine', '--device=cpu', '--num_samples=1',
            '--max_new_tokens=20', '--start=Attention', cwd=tmp_path)
    assert r.stdout.startswith('Attention') and '---------------' in r.stdout
