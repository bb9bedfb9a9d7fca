"""bench_vram.py: the CPU memory tracker is exact, every variant's measured decoding state equals
the formula, the decode table's formulas count the bytes and FLOPs of each form, and a cell that
runs out of memory or time is reported as such while the others complete."""
import csv
import json
import math
import re

import pytest
import torch

import bench_vram
from bench_vram import Tracker
from model import GPT, GPTConfig

MiB = 2**20


def test_tracker_is_exact_on_known_allocations():
    before = torch.zeros(8 * MiB, dtype=torch.uint8)  # made before the tracker: never counted
    with Tracker() as t:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(3 * MiB, dtype=torch.uint8)
        assert (t.current, t.peak) == (4 * MiB, 4 * MiB)
        views = [b[1:], b.view(torch.float32), b.view(3, MiB), b.view(3, MiB).t(), b.split(MiB)[1]]
        b.add_(1), a.mul_(2), before.add_(1), before[:10].zero_()  # in place, also on older ones
        assert t.current == 4 * MiB  # views and in-place results add nothing
        del b
        assert t.current == 4 * MiB  # the views still hold b's storage
        del views
        assert t.current == MiB
        c = torch.empty(2 * MiB, dtype=torch.uint8)
        assert (t.current, t.peak) == (3 * MiB, 4 * MiB)
        d = a.float()  # 1 Mi elements of 4 bytes
        assert (t.current, t.peak) == (7 * MiB, 7 * MiB)
        del a, c, d, before  # freeing the older tensor does not go below zero
        assert (t.current, t.peak) == (0, 7 * MiB)


def test_tracker_counts_the_backward_pass():
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB, made before the tracker
    with Tracker() as t:
        y = (x * 2).sum()  # x * 2 is not saved for backward: freed at once, the scalar y stays
        assert t.current == 4
        y.backward()
        assert t.current == 4 + x.grad.nbytes  # the gradient is allocated inside the tracked region
        x.grad = None
        assert t.current == 4


def test_tiny_run_of_every_variant_state_equals_formula(tmp_path, capsys):
    out_json, out_csv = tmp_path / 'bench.json', tmp_path / 'bench.csv'
    bench_vram.main(['--preset', 'tiny', '--contexts', '32,64', '--mode', 'state,prefill',
                     '--json', str(out_json), '--csv', str(out_csv)])
    run = json.loads(out_json.read_text())
    names = list(bench_vram.variants())
    assert set(bench_vram.ATTENTIONS) <= set(names)  # every registered class, plus ablation rows
    assert {c['variant'] for c in run['cells']} == set(names)
    assert len(run['cells']) == 2 * 2 * len(names)
    cells = {(c['variant'], c['T'], c['mode']): c for c in run['cells']}
    for (v, T, mode), c in cells.items():
        assert c['status'] == 'ok', (v, T, c)
        if mode == 'state':
            assert c['state_bytes'] == c['formula_bytes'] > 0
            # the state is alive at the peak
            assert cells[(v, T, 'prefill')]['peak_bytes'] >= c['state_bytes']
    for T in (32, 64):  # InAttention keeps d numbers per token instead of 2·L·d (tiny: L = 2)
        state = {v: cells[(v, T, 'state')]['state_bytes'] for v in names}
        assert state['causal'] == 2 * 2 * 64 * 4 * T
        assert state['inattention'] * 4 == state['causal'] == state['inattention-kv']
    with open(out_csv) as f:
        assert len(list(csv.DictReader(f))) == len(run['cells'])
    text = capsys.readouterr().out
    assert '### state' in text and '### budget' in text and '\n| 64 |' in text


def test_decode_reports_the_limits_and_skips_the_long_uncached_path(monkeypatch, tmp_path, capsys):
    # the decode table: tok/s beside the formulas' bytes and FLOPs, the probes and the fraction of
    # the limit; the uncached path is skipped above UNCACHED_MAX_T (here 32) unless --uncached
    monkeypatch.setattr(bench_vram, 'UNCACHED_MAX_T', 32)
    names = ['causal', 'inattention-gemm', 'inattention-stream']
    argv = ['--preset', 'tiny', '--variants', ','.join(names), '--contexts', '32,64',
            '--mode', 'decode', '--batch', '2']
    cells = bench_vram.main(argv + ['--predict', 'RTX-4090'])
    text = capsys.readouterr().out
    assert '| variant | T | batch | decode tok/s | limit tok/s | % of limit |' in text
    assert 'RTX-4090 predicted tok/s, batch 1 | RTX-4090 predicted tok/s, batch 16 |' in text
    assert '| causal | 64 | 2 |' in text and 'skipped' in text
    for (v, T, mode), c in cells.items():
        assert c['status'] == 'ok' and c['batch'] == 2, (v, T, c)
        assert c['decode_tok_s'] > 0 and c['bandwidth'] > 0 and c['gemm_flops'] > 0
        assert c['linear_bandwidth'] > 0
        assert c['limit_fraction'] > 0
        assert (c['recompute_tok_s'] is None) == (T > 32)
    # the formulas at T = 64 (the middle of the timed steps); tiny: 2 layers, 2 heads, n_embd 64
    d, L, T = 64, 2, 64 + 1 + bench_vram.DECODE_STEPS // 2
    tiny = GPT(GPTConfig(**bench_vram.PRESETS['tiny']))
    # read once per step in fp32; of the position table, one row
    weights = sum(4 * p.numel() for name, p in tiny.named_parameters() if 'wpe' not in name)
    s_bytes = 2 * T * d * 4  # 2 sequences: s, or K, or V of one layer
    step = {v: cells[(v, 64, 'decode')] for v in names}
    assert step['causal']['step_bytes'] == weights + 2 * L * s_bytes  # K and V of every layer
    ln_in = 2 * d * 4
    assert step['inattention-gemm']['step_bytes'] == weights + ln_in + 2 * L * s_bytes  # s twice
    assert step['inattention-stream']['step_bytes'] == weights + ln_in + L * s_bytes  # s once
    # every head of the absorbed step scores and sums all d numbers of s_j, not hd = d / 2
    extra = step['inattention-gemm']['step_flops'] - step['causal']['step_flops']
    assert extra == 2 * 4 * L * (2 - 1) * T * d
    cells = bench_vram.main(argv[:3] + ['causal', '--contexts', '64', '--mode', 'decode',
                                        '--uncached'])
    assert cells[('causal', 64, 'decode')]['recompute_tok_s'] > 0


def hand_counted_p1():
    """InAttention over one causal block, 2 layers, 2 heads, d = 8, T = 5, fp32, one pass over s
    (stream), batch 1: -> (model, bytes and FLOPs of the attention state, counted by hand)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8,
                          attention='inattention', inattn_prefix=1, inattn_decode='stream'))
    causal_bytes, causal_flops = 2 * 5 * 8 * 4, 4 * 5 * 8  # block 0: K and V; q·k and p·v
    absorbed_bytes, absorbed_flops = 1 * 5 * 8 * 4, 4 * 2 * 5 * 8  # block 1: s once; 2 heads x d
    return model, causal_bytes + absorbed_bytes, causal_flops + absorbed_flops  # 480 B, 480 FLOPs


def test_decode_cost_asks_each_block_a_causal_prefix_block_costs_as_causal():
    model, state_bytes, state_flops = hand_counted_p1()
    params = [p for name, p in model.named_parameters() if 'wpe' not in name]
    weight_bytes = 4 * sum(p.numel() for p in params)
    weight_flops = 2 * sum(p.numel() for p in params if p.dim() == 2)
    n_bytes, flops = bench_vram.decode_cost(model, 5, torch.float32, 1, 'cpu')
    assert (state_bytes, state_flops) == (480, 480)
    assert (n_bytes - weight_bytes, flops - weight_flops) == (state_bytes, state_flops)
    n16, f16 = bench_vram.decode_cost(model, 5, torch.float32, 16, 'cpu')  # weights read once
    assert (n16 - weight_bytes, f16 - 16 * weight_flops) == (16 * 480, 16 * 480)


def test_prediction_is_the_slower_of_bytes_over_bandwidth_and_flops_over_peak(monkeypatch):
    model, _, _ = hand_counted_p1()
    n_bytes, flops = bench_vram.decode_cost(model, 5, torch.float32, 1, 'cpu')
    # a made-up GPU: 1000 B/s and 10 FLOP/s, then 10 FLOP/s and 10^12 B/s
    monkeypatch.setitem(bench_vram.GPUS, 'slow', dict(bandwidth=1000.0, flops=10.0))
    monkeypatch.setitem(bench_vram.GPUS, 'wide', dict(bandwidth=1e12, flops=10.0))
    predicted = bench_vram.predict_tok_s(model, 5, torch.float32, 1, 'slow')
    assert predicted == pytest.approx(1 / max(n_bytes / 1000, flops / 10))
    assert bench_vram.predict_tok_s(model, 5, torch.float32, 1, 'wide') == pytest.approx(
        10 / flops)  # compute-bound: FLOPs / peak
    # the table: bf16, every GPU named with its datasheet figures
    assert bench_vram.GPUS['H100-SXM'] == dict(bandwidth=3.35e12, flops=989.4e12)
    assert bench_vram.GPUS['A100-80GB-SXM'] == dict(bandwidth=2.039e12, flops=312e12)
    assert bench_vram.GPUS['RTX-4090'] == dict(bandwidth=1.008e12, flops=165.2e12)


def test_fit_line_and_the_training_budget_hand_counted():
    # three points on peak = 1000 + 10·T: the line is found; one point: through the origin
    a, b = bench_vram.fit_line([(100, 2000), (200, 3000), (400, 5000)])
    assert (a, b) == (pytest.approx(1000), pytest.approx(10))
    assert bench_vram.fit_line([(100, 2000)]) == (0.0, 20.0)
    # 1000 parameters: weights 4000 B + AdamW 8000 B; the step: 1000 + 10·T; budget 100,000 B:
    # 12000 + 1000 + 10·T <= 100,000  ->  T = 8700
    assert bench_vram.train_budget(1000, 1000.0, 10.0, 100_000) == 8700
    assert bench_vram.train_budget(1000, 1000.0, 10.0, 13_009) == 0  # weights alone nearly fill it
    assert bench_vram.train_budget(1000, 1000.0, 0.0, 100_000) is None  # no growth measured


def test_train_mode_measures_with_and_without_checkpointing_and_the_budget_follows(capsys):
    cells = bench_vram.main(['--preset', 'small', '--variants', 'causal', '--contexts', '128,512',
                             '--mode', 'train'])
    c = {T: cells[('causal', T, 'train')] for T in (128, 512)}
    assert c[512]['peak_bytes_ckpt'] < 0.8 * c[512]['peak_bytes']  # checkpointing saves memory
    assert c[512]['ckpt_ratio'] == c[512]['peak_bytes_ckpt'] / c[512]['peak_bytes']
    text = capsys.readouterr().out
    assert '### training budget' in text and 'extrapolated' in text
    # the row: the small preset's parameters, the longest T from the two measured points
    params = sum(p.numel() for p in GPT(GPTConfig(**bench_vram.PRESETS['small'],
                                                  block_size=529)).parameters())  # 512 + 17 decode
    b = (c[512]['peak_bytes'] - c[128]['peak_bytes']) / (512 - 128)
    a = c[128]['peak_bytes'] - 128 * b
    longest = math.floor((24 * 2**30 - 12 * params - a) / b)
    assert f"| causal | {params / 1e6:.1f}M | {bench_vram.fmt_bytes(12 * params)} |" in text
    assert abs(int(re.search(r'^\| causal \|.*', text, re.M).group(0).split('|')[9]
                   .strip().replace(',', '')) - longest) <= 1


def test_out_of_memory_cell_is_reported_and_the_others_complete(capsys):
    # the T x T attention of 65536 tokens needs 32 GiB: under a 1 GiB limit it fails at once
    cells = bench_vram.main(['--preset', 'tiny', '--variants', 'causal-materialised',
                             '--contexts', '64,65536', '--mode', 'state', '--mem_limit', '1GiB'])
    assert cells[('causal-materialised', 65536, 'state')]['status'] == 'OOM'
    assert cells[('causal-materialised', 64, 'state')]['status'] == 'ok'
    assert '| 65536 | OOM | OOM |' in capsys.readouterr().out


def test_timeout_cell_is_reported():
    cells = bench_vram.main(['--preset', 'tiny', '--variants', 'causal-materialised',
                             '--contexts', '4096', '--mode', 'prefill', '--timeout', '0.01'])
    assert cells[('causal-materialised', 4096, 'prefill')]['status'] == 'timeout'


@pytest.mark.parametrize('argv', [['--variants', 'nope'], ['--mode', 'speed'], ['--contexts', '1k'],
                                  ['--budget', 'lots'],
                                  ['--mode', 'train', '--tokens_per_step', '10']])
def test_bad_input_is_one_clear_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_vram.parse_args(argv)
    assert e.value.code == 2
    assert 'error:' in capsys.readouterr().err
