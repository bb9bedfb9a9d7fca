"""prepare_data.py: the on-disk format train.py reads, atomic writes, and one-line errors for bad input."""
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest

import prepare_data
from prepare_data import PrepareError, is_prepared, prepare

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'  # CI runs in a clone with shared/ beside it
SHAKESPEARE = SHARED / 'data' / 'tinyshakespeare' / 'input.txt'
TEXT = 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n' * 3


@pytest.fixture(autouse=True)
def offline_tiktoken(monkeypatch):
    if (SHARED / 'tiktoken_cache').is_dir():
        monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(SHARED / 'tiktoken_cache'))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / 'text.txt'
    path.write_text(TEXT, encoding='utf-8')
    return path


def load(out_dir):
    out_dir = Path(out_dir)
    with open(out_dir / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    train, val = (np.fromfile(out_dir / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val'))
    return train, val, meta


def test_char_vocab_round_trips(tmp_path, text_file):
    out_dir = prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path / 'out')
    train, val, meta = load(out_dir)
    assert set(meta) == {'vocab_size', 'stoi', 'itos'}
    assert meta['vocab_size'] == len(set(TEXT)) == len(meta['stoi'])
    assert list(meta['stoi']) == sorted(set(TEXT))
    assert all(meta['itos'][i] == ch for ch, i in meta['stoi'].items())
    assert (out_dir / 'train.bin').stat().st_size == 2 * len(train)  # raw uint16, no header
    assert len(train) == int(0.9 * len(TEXT)) and len(train) + len(val) == len(TEXT)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val])) == TEXT
    assert is_prepared(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ['meta.pkl', 'train.bin', 'val.bin']  # no temp files


def test_bpe_decodes_back_to_input(tmp_path, text_file):
    import tiktoken
    out_dir = prepare('shakespeare', input_path=text_file, out_dir=tmp_path / 'out')
    train, val, meta = load(out_dir)
    assert meta == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    enc = tiktoken.get_encoding(meta['tokenizer'])
    assert enc.decode(train.tolist()) + enc.decode(val.tolist()) == TEXT
    assert enc.decode(train.tolist()) == TEXT[:int(0.9 * len(TEXT))]


def test_is_prepared_needs_meta(tmp_path, text_file):
    out_dir = prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)
    (out_dir / 'meta.pkl').unlink()
    assert not is_prepared(out_dir)
    assert not is_prepared(tmp_path / 'nowhere')


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(PrepareError, match='--input .*nope.txt is not a file'):
        prepare('shakespeare_char', input_path=tmp_path / 'nope.txt', out_dir=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_local_copy_is_preferred_to_shared(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(prepare_data, 'SHARED', tmp_path / 'no_shared')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'input.txt').write_text(TEXT, encoding='utf-8')
    _, _, meta = load(prepare('shakespeare_char', out_dir=tmp_path / 'out'))
    assert meta['vocab_size'] == len(set(TEXT))


class BrokenResponse(io.BytesIO):
    """A download that delivers some bytes, then the connection drops."""
    def read(self, *args):
        if self.tell() > 0:
            raise ConnectionResetError('connection reset by peer')
        return super().read(5)


@pytest.mark.parametrize('failure', ['offline', 'midway'])
def test_download_failure_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, failure):
    def urlopen(url, timeout=None):
        if failure == 'offline':
            raise URLError('[Errno -3] Temporary failure in name resolution')
        return BrokenResponse(TEXT.encode())
    monkeypatch.setattr(prepare_data, 'urlopen', urlopen)
    monkeypatch.setattr(prepare_data, 'SHARED', tmp_path / 'no_shared')  # no local copy anywhere
    out_dir = tmp_path / 'out'
    with pytest.raises(PrepareError) as e:
        prepare('shakespeare', out_dir=out_dir)
    msg = str(e.value)
    assert '\n' not in msg and prepare_data.SHAKESPEARE_URL in msg
    assert '--input PATH' in msg and str(out_dir / 'input.txt') in msg
    assert list(out_dir.iterdir()) == []


def test_tiktoken_failure_is_a_clear_error(tmp_path, text_file, monkeypatch):
    import tiktoken

    def get_encoding(name):
        raise ConnectionError('offline')
    monkeypatch.setattr(tiktoken, 'get_encoding', get_encoding)
    with pytest.raises(PrepareError, match='TIKTOKEN_CACHE_DIR'):
        prepare('shakespeare', input_path=text_file, out_dir=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_shared_tiktoken_cache_is_used_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv('TIKTOKEN_CACHE_DIR')
    if not (SHARED / 'tiktoken_cache').is_dir():
        pytest.skip('no shared/tiktoken_cache beside the repo')
    monkeypatch.setattr(prepare_data, 'SHARED', SHARED)
    assert prepare_data.get_encoding().n_vocab == 50257
    assert os.environ['TIKTOKEN_CACHE_DIR'] == str(SHARED / 'tiktoken_cache')


def test_reprepare_replaces_old_dataset(tmp_path, text_file):
    prepare('shakespeare', input_path=text_file, out_dir=tmp_path)
    text_file.write_text('abcabc' * 10, encoding='utf-8')
    train, val, meta = load(prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path))
    assert meta['vocab_size'] == 3 and len(train) + len(val) == 60


def test_failed_reprepare_is_not_prepared(tmp_path, text_file, monkeypatch):
    prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)

    def write_meta(out_dir, meta):
        raise OSError('No space left on device')
    monkeypatch.setattr(prepare_data, 'write_meta', write_meta)
    with pytest.raises(OSError):
        prepare('shakespeare', input_path=text_file, out_dir=tmp_path)
    assert not is_prepared(tmp_path)  # new .bin files beside the old meta.pkl would be read with the wrong vocab


def test_openwebtext_writer_on_tiny_dataset(tmp_path):
    import tiktoken
    from datasets import Dataset, DatasetDict
    docs = ['Hello world.', 'A second document,\nwith two lines.', '', 'Fourth one <|endoftext|> as text.']
    dsets = DatasetDict({'train': Dataset.from_dict({'text': docs[:3]}),
                         'val': Dataset.from_dict({'text': docs[3:]})})
    prepare_data.write_bpe_splits(dsets, tmp_path)
    train, val, meta = load(tmp_path)
    assert meta == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    enc = tiktoken.get_encoding('r50k_base')
    for split, want in ((train, docs[:3]), (val, docs[3:])):
        assert split[-1] == enc.eot_token and (split == enc.eot_token).sum() == len(want)  # one eot per document
        assert enc.decode(split.tolist()) == ''.join(d + '<|endoftext|>' for d in want)


def test_openwebtext_split_and_max_docs():
    from datasets import Dataset
    dset = Dataset.from_dict({'text': [f'doc {i}' for i in range(50)]})
    split = prepare_data.split_docs(dset, max_docs=20)
    assert set(split) == {'train', 'val'}
    assert len(split['train']) + len(split['val']) == 20 and len(split['val']) >= 1
    assert set(split['train']['text']) | set(split['val']['text']) == {f'doc {i}' for i in range(20)}
    with pytest.raises(PrepareError, match='--max_docs'):
        prepare_data.split_docs(dset, max_docs=1)


def test_openwebtext_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def load_dataset(*args, **kw):
        raise ConnectionError("Couldn't reach 'openwebtext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    with pytest.raises(PrepareError, match="could not load the Hugging Face dataset 'Skylion007/openwebtext'"):
        prepare('openwebtext', out_dir=tmp_path / 'out', num_proc=1)
    assert not (tmp_path / 'out').exists()


def run_script(*args):
    return subprocess.run([sys.executable, str(REPO / 'prepare_data.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_script_on_shared_shakespeare(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip('no shared/data/tinyshakespeare beside the repo')
    r = run_script('shakespeare_char', '--input', SHAKESPEARE, '--out_dir', tmp_path)
    assert r.returncode == 0, r.stderr
    train, val, meta = load(tmp_path)
    assert len(train) + len(val) == 1_115_394 and meta['vocab_size'] == 65


def test_script_error_is_one_line_without_traceback(tmp_path):
    r = run_script('shakespeare_char', '--input', tmp_path / 'missing.txt', '--out_dir', tmp_path / 'out')
    assert r.returncode != 0
    assert r.stderr.strip().count('\n') == 0 and 'Traceback' not in r.stderr
    assert 'missing.txt is not a file' in r.stderr


# a passkey sample as mix_passkey writes it: its own lines, the key closing the question
SAMPLE = re.compile(r'\n( [^\n]*)?\nThe pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.\n([^\n]*)'
                    r'\nWhat is the pass key\? The pass key is (\d{5})\.\n')


def test_passkey_mix_round_trips(tmp_path):
    text = TEXT * 30
    (tmp_path / 'in.txt').write_text(text, encoding='utf-8')
    train, val, meta = load(prepare('shakespeare_char_passkey', input_path=tmp_path / 'in.txt',
                                    out_dir=tmp_path / 'out', passkey_len=160))
    assert set(meta['stoi']) >= set(text) | set('0123456789')
    assert meta['vocab_size'] == len(meta['stoi']) and all(meta['itos'][i] == ch for ch, i in meta['stoi'].items())
    cut = int(0.9 * len(text))
    for ids, part, eval_keys in ((train, text[:cut], False), (val, text[cut:], True)):
        stream = ''.join(meta['itos'][i] for i in ids)
        samples = list(SAMPLE.finditer(stream))
        assert samples and SAMPLE.sub('', stream) == part  # the text, untouched, once the samples are cut out
        for m in samples:
            assert m[2] == m[3] == m[5]  # the needle's key is the answer
            assert prepare_data.is_eval_key(int(m[2])) == eval_keys  # training keys never in val and vice versa
            length = len(m[0]) - len('\n') - len('.\n')  # prompt + key
            assert prepare_data.passkey_min_len(list) <= length <= 160  # list: one token per character
        in_samples = sum(len(m[0]) for m in samples) / len(stream)
        assert abs(in_samples - prepare_data.PASSKEY_FRACTION) < 0.1


def test_passkey_len_too_short_is_a_clear_error_and_loses_nothing(tmp_path, text_file):
    prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)
    with pytest.raises(PrepareError, match='passkey_len=50 is too short'):
        prepare('shakespeare_char_passkey', input_path=text_file, out_dir=tmp_path, passkey_len=50)
    assert is_prepared(tmp_path)  # the dataset already there is intact
