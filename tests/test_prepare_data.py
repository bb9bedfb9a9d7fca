"""prepare_data.py: the on-disk format train.py reads, atomic writes, a half-prepared folder never
used, every download (mocked here, so that it is tested offline), one-line errors for bad input."""
import base64
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
from prepare_data import MARKER, PrepareError, is_prepared, prepare, read_meta

REPO = Path(__file__).resolve().parents[1]
TEXT = 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n' * 3
R50K_URL = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'


@pytest.fixture(autouse=True)
def no_shakespeare_input(monkeypatch):
    # prepare() reads SHAKESPEARE_INPUT when no input is passed: these tests set it themselves
    monkeypatch.delenv('SHAKESPEARE_INPUT', raising=False)


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
    assert set(meta) == {'vocab_size', 'tokenizer', 'stoi', 'itos'} and meta['tokenizer'] == 'char'
    assert meta['vocab_size'] == len(set(TEXT)) == len(meta['stoi'])
    assert list(meta['stoi']) == sorted(set(TEXT))
    assert all(meta['itos'][i] == ch for ch, i in meta['stoi'].items())
    assert (out_dir / 'train.bin').stat().st_size == 2 * len(train)  # raw uint16, no header
    assert len(train) == int(0.9 * len(TEXT)) and len(train) + len(val) == len(TEXT)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val])) == TEXT
    assert is_prepared(out_dir)
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ['meta.pkl', 'train.bin', 'val.bin']  # no temp files


def test_bpe_decodes_back_to_input(tmp_path, text_file, gpt2_bpe):
    out_dir = prepare('shakespeare', input_path=text_file, out_dir=tmp_path / 'out')
    train, val, meta = load(out_dir)
    assert meta == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    assert gpt2_bpe.decode(train.tolist()) + gpt2_bpe.decode(val.tolist()) == TEXT
    assert gpt2_bpe.decode(train.tolist()) == TEXT[:int(0.9 * len(TEXT))]


def test_is_prepared_needs_both_bins(tmp_path, text_file):
    out_dir = prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)
    (out_dir / 'val.bin').unlink()
    assert not is_prepared(out_dir)
    assert not is_prepared(tmp_path / 'nowhere')


def test_a_nanogpt_folder_without_meta_is_prepared_and_read_as_gpt2_bpe(tmp_path, text_file):
    # nanoGPT's data/openwebtext/prepare.py writes only train.bin and val.bin
    np.array([15496, 11, 995, 50256], dtype=np.uint16).tofile(tmp_path / 'train.bin')
    np.array([15496, 50256], dtype=np.uint16).tofile(tmp_path / 'val.bin')
    assert is_prepared(tmp_path)
    assert read_meta(tmp_path) == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    char_dir = prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path / 'char')
    assert read_meta(char_dir) == load(char_dir)[2]  # with a meta.pkl: that file's dict


def test_a_marked_folder_is_never_prepared(tmp_path, text_file):
    char_dir = prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path / 'char')
    np.zeros(10, dtype=np.uint16).tofile(tmp_path / 'train.bin')
    np.zeros(10, dtype=np.uint16).tofile(tmp_path / 'val.bin')
    for folder in (char_dir, tmp_path):  # all of a dataset's files, with and without meta.pkl
        assert is_prepared(folder)
        (folder / MARKER).touch()
        assert not is_prepared(folder)


def test_the_marker_is_there_from_before_the_first_rename_to_after_the_last(tmp_path, text_file,
                                                                           monkeypatch):
    out_dir = prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path / 'out')
    text_file.write_text('abcabc' * 10, encoding='utf-8')
    renames, real_replace = [], os.replace

    def replace(src, dst):
        renames.append((Path(dst).name, (out_dir / MARKER).exists(), is_prepared(out_dir)))
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace)
    prepare('shakespeare_char', input_path=text_file, out_dir=out_dir)
    # (the file renamed onto, the marker there, the folder prepared) at each rename
    assert renames == [(name, True, False) for name in ('train.bin', 'val.bin', 'meta.pkl')]
    assert is_prepared(out_dir) and not (out_dir / MARKER).exists()
    assert read_meta(out_dir)['vocab_size'] == 3


def test_every_file_is_flushed_to_disk_right_before_its_rename(tmp_path, text_file, monkeypatch):
    calls, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        calls.append(('fsync', os.fstat(fd).st_ino))  # the inode: the file, whatever its name
        real_fsync(fd)

    def replace(src, dst):
        calls.append(('replace', os.stat(src).st_ino, Path(dst).name))
        real_replace(src, dst)
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path / 'out')
    renamed = [(i, c) for i, c in enumerate(calls) if c[0] == 'replace']
    assert [c[2] for _, c in renamed] == ['train.bin', 'val.bin', 'meta.pkl']
    for i, (_, inode, name) in renamed:
        assert calls[i - 1] == ('fsync', inode), name


def test_temp_files_of_dead_runs_are_removed_and_those_of_live_runs_kept(tmp_path, text_file):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()  # ended and reaped: no process has its pid (unless a new one took it)
    assert not prepare_data.pid_alive(dead.pid)
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        stale = [out_dir / f'.train.bin.{dead.pid}.tmp', out_dir / f'.input.txt.{dead.pid}.tmp']
        kept = [out_dir / f'.train.bin.{live.pid}.tmp', out_dir / f'.old.bin.{os.getpid()}.tmp',
                out_dir / 'notes.tmp']  # the last: not a temp file of prepare_data.py
        for path in stale + kept:
            path.write_bytes(b'half a file')
        prepare('shakespeare_char', input_path=text_file, out_dir=out_dir)
        assert [p.exists() for p in stale] == [False, False]
        assert [p.read_bytes() for p in kept] == [b'half a file'] * 3
        assert is_prepared(out_dir) and read_meta(out_dir)['vocab_size'] == len(set(TEXT))
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize('content, message', [
    (b'', 'cannot be read (EOFError'),
    (pickle.dumps([1, 2, 3]), 'holds no vocab_size, so it is no meta.pkl of prepare_data.py'),
])
def test_a_broken_meta_is_a_clear_error(tmp_path, text_file, content, message):
    out_dir = prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)
    (out_dir / 'meta.pkl').write_bytes(content)
    with pytest.raises(PrepareError) as e:
        read_meta(out_dir)
    assert message in str(e.value) and '\n' not in str(e.value)
    assert str(e.value).endswith('prepare the dataset again')


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(PrepareError, match='--input .*nope.txt is not a file'):
        prepare('shakespeare_char', input_path=tmp_path / 'nope.txt', out_dir=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def no_network(url, timeout=None):
    raise URLError('[Errno -3] Temporary failure in name resolution')


def test_a_local_copy_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, 'urlopen', no_network)
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'input.txt').write_text(TEXT, encoding='utf-8')
    _, _, meta = load(prepare('shakespeare_char', out_dir=tmp_path / 'out'))
    assert meta['vocab_size'] == len(set(TEXT))


def test_shakespeare_input_is_the_default_for_input(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(prepare_data, 'urlopen', no_network)
    monkeypatch.setenv('SHAKESPEARE_INPUT', str(text_file))
    train, val, _ = load(prepare('shakespeare_char', out_dir=tmp_path / 'env'))
    assert len(train) + len(val) == len(TEXT)
    (tmp_path / 'other.txt').write_text('abc' * 20, encoding='utf-8')
    _, _, meta = load(prepare('shakespeare_char', input_path=tmp_path / 'other.txt',
                              out_dir=tmp_path / 'arg'))
    assert meta['vocab_size'] == 3  # --input wins
    monkeypatch.setenv('SHAKESPEARE_INPUT', str(tmp_path / 'nope.txt'))
    with pytest.raises(PrepareError, match=r'^SHAKESPEARE_INPUT=.*nope.txt is not a file: set'):
        prepare('shakespeare_char', out_dir=tmp_path / 'bad')
    assert not (tmp_path / 'bad').exists()


def test_download_when_no_copy_is_handed_in(tmp_path, monkeypatch):
    asked = []

    def urlopen(url, timeout=None):
        asked.append((url, timeout))
        return io.BytesIO(TEXT.encode())
    monkeypatch.setattr(prepare_data, 'urlopen', urlopen)
    out_dir = tmp_path / 'out'
    train, val, meta = load(prepare('shakespeare_char', out_dir=out_dir))
    assert asked == [(prepare_data.SHAKESPEARE_URL, 30)]  # a timeout: a dead network cannot hang it
    assert (out_dir / 'input.txt').read_text(encoding='utf-8') == TEXT
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val])) == TEXT
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ['input.txt', 'meta.pkl', 'train.bin', 'val.bin']
    prepare('shakespeare_char', out_dir=out_dir)
    assert len(asked) == 1  # the second time, the downloaded copy


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
    out_dir = tmp_path / 'out'
    with pytest.raises(PrepareError) as e:
        prepare('shakespeare', out_dir=out_dir)
    msg = str(e.value)
    assert '\n' not in msg and prepare_data.SHAKESPEARE_URL in msg
    assert '--input PATH' in msg and 'SHAKESPEARE_INPUT=PATH' in msg
    assert str(out_dir / 'input.txt') in msg
    assert list(out_dir.iterdir()) == []


def test_tiktoken_failure_is_a_clear_error(tmp_path, text_file, monkeypatch):
    import tiktoken

    def get_encoding(name):
        raise ConnectionError('offline')
    monkeypatch.setattr(tiktoken, 'get_encoding', get_encoding)
    with pytest.raises(PrepareError, match='TIKTOKEN_CACHE_DIR'):
        prepare('shakespeare', input_path=text_file, out_dir=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


@pytest.fixture
def empty_tiktoken_cache(tmp_path, monkeypatch):
    """This process as on a machine that never loaded GPT-2's BPE: an empty cache, none loaded."""
    import tiktoken.registry
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'tiktoken_cache'))
    monkeypatch.setattr(tiktoken.registry, 'ENCODINGS', {})  # tiktoken's encodings loaded so far
    return tmp_path / 'tiktoken_cache'


def test_with_an_empty_cache_a_failed_bpe_download_is_a_clear_error(empty_tiktoken_cache,
                                                                    monkeypatch):
    import tiktoken.load
    asked = []

    def read_file(url):  # tiktoken's download
        asked.append(url)
        raise ConnectionError('offline')
    monkeypatch.setattr(tiktoken.load, 'read_file', read_file)
    with pytest.raises(PrepareError) as e:
        prepare_data.get_encoding()
    assert asked == [R50K_URL]
    assert str(e.value) == ("could not load the tiktoken encoding 'r50k_base' (ConnectionError): "
                            "go online once, or set TIKTOKEN_CACHE_DIR to a folder holding its "
                            "cached file")


def test_with_an_empty_cache_the_bpe_is_downloaded_and_cached(empty_tiktoken_cache, gpt2_bpe,
                                                              monkeypatch):
    import tiktoken.load
    # the downloaded file's bytes, rebuilt from the encoding: a 'base64(token) rank' line per token
    ranks = sorted(gpt2_bpe._mergeable_ranks.items(), key=lambda item: item[1])
    blob = b''.join(base64.b64encode(token) + b' %d\n' % rank for token, rank in ranks)
    asked = []

    def read_file(url):
        asked.append(url)
        return blob
    monkeypatch.setattr(tiktoken.load, 'read_file', read_file)
    enc = prepare_data.get_encoding()
    assert asked == [R50K_URL] and enc is not gpt2_bpe  # loaded anew, from the download
    assert enc.n_vocab == 50257 and enc.encode_ordinary(TEXT) == gpt2_bpe.encode_ordinary(TEXT)
    assert len(list(empty_tiktoken_cache.iterdir())) == 1  # cached: the next load needs no network


def test_reprepare_replaces_old_dataset(tmp_path, text_file, gpt2_bpe):
    prepare('shakespeare', input_path=text_file, out_dir=tmp_path)
    text_file.write_text('abcabc' * 10, encoding='utf-8')
    train, val, meta = load(prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path))
    assert meta['vocab_size'] == 3 and len(train) + len(val) == 60


def test_failed_reprepare_is_not_prepared(tmp_path, text_file, monkeypatch):
    prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)
    text_file.write_text('abcabc' * 10, encoding='utf-8')

    def write_meta(out_dir, meta):
        raise OSError('No space left on device')
    monkeypatch.setattr(prepare_data, 'write_meta', write_meta)
    with pytest.raises(OSError):
        prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)
    assert not is_prepared(tmp_path)  # new .bin files beside the old meta.pkl: the wrong vocabulary


def test_openwebtext_writer_on_tiny_dataset(tmp_path, gpt2_bpe):
    import tiktoken
    from datasets import Dataset, DatasetDict
    docs = ['Hello world.', 'A second document,\nwith two lines.', '',
            'Fourth one <|endoftext|> as text.']
    dsets = DatasetDict({'train': Dataset.from_dict({'text': docs[:3]}),
                         'val': Dataset.from_dict({'text': docs[3:]})})
    prepare_data.write_bpe_splits(dsets, tmp_path)
    train, val, meta = load(tmp_path)
    assert meta == {'vocab_size': 50257, 'tokenizer': 'r50k_base'}
    enc = tiktoken.get_encoding('r50k_base')
    for split, want in ((train, docs[:3]), (val, docs[3:])):
        # one eot per document
        assert split[-1] == enc.eot_token and (split == enc.eot_token).sum() == len(want)
        assert enc.decode(split.tolist()) == ''.join(d + '<|endoftext|>' for d in want)


def test_openwebtext_split_and_max_docs():
    from datasets import Dataset
    dset = Dataset.from_dict({'text': [f'doc {i}' for i in range(50)]})
    split = prepare_data.split_docs(dset, max_docs=20)
    assert set(split) == {'train', 'val'}
    assert len(split['train']) + len(split['val']) == 20 and len(split['val']) >= 1
    texts = set(split['train']['text']) | set(split['val']['text'])
    assert texts == {f'doc {i}' for i in range(20)}
    with pytest.raises(PrepareError, match='--max_docs'):
        prepare_data.split_docs(dset, max_docs=1)


class BytesBPE:
    """A stand-in for GPT-2's BPE where the test is not about it: one token per UTF-8 byte."""
    n_vocab = 50257
    eot_token = 50256

    def encode_ordinary(self, text):
        return list(text.encode('utf-8'))


def test_openwebtext_download_with_the_hub_mocked(tmp_path, monkeypatch):
    import datasets
    docs = [f'document {i}: ' + 'words ' * i for i in range(40)]
    asked = []

    def load_dataset(name, **kw):  # the download from the Hugging Face hub
        asked.append(name)
        return datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': docs})})
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    monkeypatch.setattr(prepare_data, 'get_encoding', BytesBPE)
    out_dir = prepare('openwebtext', out_dir=tmp_path / 'out', max_docs=30, num_proc=1)
    assert asked == ['Skylion007/openwebtext']
    train, val, meta = load(out_dir)
    assert meta == {'vocab_size': 50257, 'tokenizer': 'r50k_base'} and is_prepared(out_dir)
    written = bytes(np.concatenate([train, val])[np.concatenate([train, val]) != 50256].tolist())
    assert sorted(written.decode()) == sorted(''.join(docs[:30]))  # the first 30, shuffled
    assert (train == 50256).sum() + (val == 50256).sum() == 30  # one <|endoftext|> per document


def test_openwebtext_offline_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def load_dataset(*args, **kw):
        raise ConnectionError("Couldn't reach 'openwebtext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    with pytest.raises(PrepareError,
                       match="could not load the Hugging Face dataset 'Skylion007/openwebtext'"):
        prepare('openwebtext', out_dir=tmp_path / 'out', num_proc=1)
    assert not (tmp_path / 'out').exists()


def run_script(*args):
    return subprocess.run([sys.executable, str(REPO / 'prepare_data.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_script_on_tiny_shakespeare(tmp_path, shakespeare):
    r = run_script('shakespeare_char', '--input', shakespeare, '--out_dir', tmp_path)
    assert r.returncode == 0, r.stderr
    train, val, meta = load(tmp_path)
    assert len(train) + len(val) == 1_115_394 and meta['vocab_size'] == 65


def test_tiny_shakespeare_in_gpt2_bpe_has_nanogpts_token_counts(tmp_path, shakespeare, gpt2_bpe):
    train, val, _ = load(prepare('shakespeare', input_path=shakespeare, out_dir=tmp_path))
    assert (len(train), len(val)) == (301_966, 36_059)  # nanoGPT's data/shakespeare/readme.md


def test_script_error_is_one_line_without_traceback(tmp_path):
    r = run_script('shakespeare_char', '--input', tmp_path / 'missing.txt',
                   '--out_dir', tmp_path / 'out')
    assert r.returncode != 0
    assert r.stderr.strip().count('\n') == 0 and 'Traceback' not in r.stderr
    assert 'missing.txt is not a file' in r.stderr


# a passkey sample as mix_passkey writes it: its own lines, the key closing the question
SAMPLE = re.compile(r'\n( [^\n]*)?\nThe pass key is (\d{5})\. Remember it\. (\d{5}) '
                    r'is the pass key\.\n([^\n]*)'
                    r'\nWhat is the pass key\? The pass key is (\d{5})\.\n')


def test_passkey_mix_round_trips(tmp_path):
    text = TEXT * 30
    (tmp_path / 'in.txt').write_text(text, encoding='utf-8')
    train, val, meta = load(prepare('shakespeare_char_passkey', input_path=tmp_path / 'in.txt',
                                    out_dir=tmp_path / 'out', passkey_len=160))
    assert set(meta['stoi']) >= set(text) | set('0123456789')
    assert meta['vocab_size'] == len(meta['stoi'])
    assert all(meta['itos'][i] == ch for ch, i in meta['stoi'].items())
    cut = int(0.9 * len(text))
    for ids, part, eval_keys in ((train, text[:cut], False), (val, text[cut:], True)):
        stream = ''.join(meta['itos'][i] for i in ids)
        samples = list(SAMPLE.finditer(stream))
        # the text, untouched, once the samples are cut out
        assert samples and SAMPLE.sub('', stream) == part
        for m in samples:
            assert m[2] == m[3] == m[5]  # the needle's key is the answer
            # training keys never in val and vice versa
            assert prepare_data.is_eval_key(int(m[2])) == eval_keys
            length = len(m[0]) - len('\n') - len('.\n')  # prompt + key
            # list: one token per character
            assert prepare_data.passkey_min_len(list) <= length <= 160
        in_samples = sum(len(m[0]) for m in samples) / len(stream)
        assert abs(in_samples - prepare_data.PASSKEY_FRACTION) < 0.1


def test_passkey_len_too_short_is_a_clear_error_and_loses_nothing(tmp_path, text_file):
    prepare('shakespeare_char', input_path=text_file, out_dir=tmp_path)
    with pytest.raises(PrepareError, match='passkey_len=50 is too short'):
        prepare('shakespeare_char_passkey', input_path=text_file, out_dir=tmp_path, passkey_len=50)
    assert is_prepared(tmp_path)  # the dataset already there is intact
