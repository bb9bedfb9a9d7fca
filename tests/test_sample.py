"""sample.py: streams what the model generates,
decoded with the checkpoint's own vocabulary; clear errors."""
import re
from dataclasses import asdict

import pytest
import torch

import sample
from conftest import TEXT, one_line_error, run, run_here
from model import GPT, GPTConfig


@pytest.fixture(scope='module')
def char_ckpt(first_run):
    return first_run[0]  # conftest.py: a few iterations of a tiny model on a character dataset


@pytest.fixture(scope='module')
def bpe_ckpt(tmp_path_factory, gpt2_bpe):  # gpt2_bpe: the test is skipped where there is none
    """A tiny untrained GPT over GPT-2's BPE (vocabulary
    padded to 50304 as train.py does), saved like train.py."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    out = tmp_path_factory.mktemp('bpe') / 'out'
    out.mkdir()
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config),
                'meta': {'vocab_size': 50257, 'tokenizer': 'r50k_base'}}, out / 'ckpt.pt')
    return out


def greedy(out_dir, prompt_ids, n):
    """What the checkpoint generates greedily, computed here without sample.py."""
    model, _ = sample.load_model('resume', str(out_dir))
    out = model.eval().generate(torch.tensor([prompt_ids]), n, temperature=0)
    return out[0, len(prompt_ids):].tolist()


def body(stdout):
    """The first sample's text, without the separator and the stats lines."""
    return stdout.split('\n---------------\n')[0]


def test_prints_the_prompt_then_what_the_model_generates(char_ckpt, tmp_path):
    r = run('sample.py', f'--out_dir={char_ckpt}', '--device=cpu', '--start=First',
            '--num_samples=1', '--max_new_tokens=20', '--temperature=0', cwd=tmp_path)
    itos = torch.load(char_ckpt / 'ckpt.pt', weights_only=False)['meta']['itos']
    stoi = {c: i for i, c in itos.items()}
    expected = ''.join(itos[i] for i in greedy(char_ckpt, [stoi[c] for c in 'First'], 20))
    assert body(r.stdout) == 'First' + expected


def test_samples_differ_and_the_prompt_can_come_from_a_file(char_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'prompt.txt').write_text('All:\n')
    _, stdout, _ = run_here('sample.py', f'--out_dir={char_ckpt}', '--device=cpu',
                            '--start=FILE:prompt.txt', '--num_samples=2', '--max_new_tokens=30',
                            '--temperature=2.0', '--top_k=0')
    samples = stdout.split('\n---------------\n')[:2]
    assert all(s.startswith('All:\n') and len(s) == 5 + 30 and set(s) <= set(TEXT) for s in samples)
    assert samples[0] != samples[1]


def test_stats_report_speed_and_the_measured_and_formula_state_memory(char_ckpt):
    _, stdout, _ = run_here('sample.py', f'--out_dir={char_ckpt}', '--device=cpu',
                            '--num_samples=1', '--max_new_tokens=40', '--stats',
                            '--prefill_chunk=8')
    assert re.search(r'^stats: prefill [\d,]+ tokens/s \(1 prompt tokens.*'
                     r'decode [\d,]+ tokens/s \(40 tokens\)', stdout, re.M)
    # generation feeds the prompt and 39 of the 40 tokens: at 33 tokens the window (block_size=32)
    # slides to the last 16, and 7 more follow: the cache held 23 tokens when the last was drawn;
    # causal keeps K and V: 2·T·C·L floats
    m = re.search(r'decoding state after 23 tokens \(causal, torch.float32\): '
                  r'measured cache.nbytes\(\) = ([\d,]+) '
                  r'bytes, formula decode_state_bytes\(23\) = ([\d,]+) bytes', stdout)
    assert m and m.group(1) == m.group(2) == f'{2 * 23 * 32 * 2 * 4:,}', stdout


def test_bpe_checkpoint_streams_text_equal_to_decoding_all_tokens(bpe_ckpt, gpt2_bpe):
    encode, _, empty = sample.tokenizer({'tokenizer': 'r50k_base'})
    _, stdout, _ = run_here('sample.py', f'--out_dir={bpe_ckpt}', '--device=cpu', '--num_samples=1',
                            '--max_new_tokens=25', '--temperature=0', '--start=Hello, wörld')
    ids = [i for i in greedy(bpe_ckpt, encode('Hello, wörld'), 25) if i < gpt2_bpe.n_vocab]
    assert body(stdout) == 'Hello, wörld' + gpt2_bpe.decode(ids)
    assert encode(empty) == [50256]  # an empty prompt starts from <|endoftext|>


def test_bpe_stream_waits_for_characters_split_across_tokens(gpt2_bpe):
    encode, decode_stream, _ = sample.tokenizer({'tokenizer': 'r50k_base'})
    text = 'naïve 语言模型 ≥ €5 🙂'
    ids = encode(text)
    pieces = list(decode_stream(ids))
    assert ''.join(pieces) == text and '\ufffd' not in ''.join(pieces)
    # some tokens end inside a character: they print nothing until it is complete
    assert '' in pieces


def char_ids(char_ckpt, text):
    stoi = torch.load(char_ckpt / 'ckpt.pt', weights_only=False)['meta']['stoi']
    return [stoi[c] for c in text]


def decode(char_ckpt, ids):
    itos = torch.load(char_ckpt / 'ckpt.pt', weights_only=False)['meta']['itos']
    return ''.join(itos[i] for i in ids)


def test_empty_prompt_starts_from_a_newline(char_ckpt):
    status, stdout, stderr = run_here('sample.py', f'--out_dir={char_ckpt}', '--device=cpu',
                                      '--start=', '--num_samples=1', '--max_new_tokens=20',
                                      '--temperature=0')
    assert status == 0 and stderr == ''
    assert body(stdout) == decode(char_ckpt, greedy(char_ckpt, char_ids(char_ckpt, '\n'), 20))


def test_prompt_longer_than_the_context_keeps_its_last_block_size_tokens(char_ckpt):
    # 61 characters; block_size is 32
    prompt = 'First Citizen:\nBefore we proceed any further, hear me speak.\n'
    status, stdout, stderr = run_here('sample.py', f'--out_dir={char_ckpt}', '--device=cpu',
                                      f'--start={prompt}', '--num_samples=1',
                                      '--max_new_tokens=10', '--temperature=0')
    assert status == 0 and stderr == ("note: the prompt has 61 tokens, more than the model's "
                                      "context of 32: it is generated from the last 32\n")
    expected = greedy(char_ckpt, char_ids(char_ckpt, prompt[-32:]), 10)
    # the whole prompt is printed, then the sample
    assert body(stdout) == prompt + decode(char_ckpt, expected)


def test_character_not_in_the_vocabulary_is_an_error(char_ckpt, tmp_path):
    r = run('sample.py', f'--out_dir={char_ckpt}', '--device=cpu', '--start=Fïrst Z', cwd=tmp_path,
            expect_ok=False)
    line = one_line_error(r, 1)
    assert "not in the model's vocabulary" in line and "'Z', 'ï'" in line


@pytest.mark.parametrize('arg, message', [
    ('--max_new_tokens=0', 'max_new_tokens=0: it must be at least 1'),
    ('--max_new_tokens=-5', 'max_new_tokens=-5: it must be at least 1'),
    ('--num_samples=0', 'num_samples=0: it must be at least 1'),
    ('--top_k=-1', 'top_k=-1: use 0 (all tokens) or more'),
    ('--start=FILE:nope.txt', "--start=FILE:nope.txt: no file 'nope.txt'")])
def test_impossible_settings_are_one_line_errors(arg, message, char_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stdout, stderr = run_here('sample.py', f'--out_dir={char_ckpt}', arg)
    assert status in (1, 2) and stdout == '' and len(stderr.splitlines()) == 1
    assert stderr.startswith(f'sample.py: error: {message}')


def test_missing_checkpoint_names_the_path_and_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run_here('sample.py', '--out_dir=out-inattn-shakespeare-char')
    assert status == 1 and len(stderr.splitlines()) == 1
    assert 'no checkpoint at out-inattn-shakespeare-char/ckpt.pt' in stderr
    assert '`python train.py config/inattn_shakespeare_char.py`' in stderr


def test_gates_prints_each_infini_heads_sigmoid_beta(char_ckpt, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=37, n_layer=2, n_head=2, n_embd=16,
                          attention='infini', pos_emb='none'))
    with torch.no_grad():
        model.transformer.h[1].attn.beta.copy_(torch.tensor([0.0, 2.0]))
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config),
                'meta': {'vocab_size': 37, 'stoi': {}, 'itos': {}}}, tmp_path / 'ckpt.pt')
    status, out, _ = run_here('sample.py', f'--out_dir={tmp_path}', '--gates')
    assert status == 0 and out.splitlines() == ['layer 0: sigmoid(beta) = 0.500 0.500',
                                                'layer 1: sigmoid(beta) = 0.500 0.881']
    # a causal model has no gates
    status, _, err = run_here('sample.py', f'--out_dir={char_ckpt}', '--gates')
    assert status == 1 and 'no memory gates' in err
