"""Tests for tinylm.profile: timers, generation timing, op breakdown, FLOPs, bytes, roofline.

Tiny models only, and no wall-clock values asserted: the tests pin what is called, how
samples are summarised, and the counted FLOPs / bytes against hand computations.
"""

from __future__ import annotations

import math
import statistics
import time

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F

import tinylm.generate as gen
import tinylm.profile as prof
from tinylm.costs import ModelShape, estimate
from tinylm.hardware import Chip, this_machine
from tinylm.model import GPT, GPTConfig, flops_per_token
from tinylm.port.numpy_runtime import NumpyLM

C, V, L, CTX = 16, 64, 2, 32  # n_embd, vocab, layers, context of the tiny model


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads can stall tiny ops badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    plt.close("all")


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=V, context_length=CTX, n_layer=L, n_head=2, n_embd=C, **kw)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(**kw))


def fake_record(batch=2, context=6, new_tokens=3, ttft=0.01, loop=0.03) -> prof.GenerationRecord:
    """A record with made-up times, for the parts that only do arithmetic on them."""
    return prof.GenerationRecord(
        batch, context, new_tokens, prof.Timing((ttft,) * 3), prof.Timing((loop,) * 3)
    )


# ----------------------------------------------------------------------------- time_fn


def test_time_fn_calls_warmup_plus_repeats_and_reports_the_median():
    calls = []
    timing = prof.time_fn(lambda: calls.append(1), repeats=5, warmup=3, device="cpu")
    assert len(calls) == 8
    assert len(timing.samples) == 5 and all(s >= 0 for s in timing.samples)
    assert timing.median == statistics.median(timing.samples)
    q1, q3 = timing.quartiles
    assert timing.min <= q1 <= timing.median <= q3 <= timing.max
    assert timing.iqr == q3 - q1
    assert "median" in str(timing)


def test_timing_summaries_of_known_samples():
    t = prof.Timing((0.004, 0.001, 0.003, 0.002, 0.100))
    assert t.median == 0.003  # the outlier does not move it
    assert (t.min, t.max) == (0.001, 0.100)
    assert t.quartiles == (0.002, 0.004)
    assert prof.Timing((0.5,)).quartiles == (0.5, 0.5)


def test_time_fn_synchronizes_around_every_timed_call(monkeypatch):
    synced = []
    monkeypatch.setattr(prof, "synchronize", lambda device: synced.append(device))
    prof.time_fn(lambda: None, repeats=4, warmup=1, device="cpu")
    assert len(synced) == 8  # before starting and before stopping the clock
    assert all(d == torch.device("cpu") for d in synced)


def test_time_fn_setup_runs_before_each_call_and_feeds_it():
    made, seen = [], []

    def setup():
        made.append(len(made))
        return made[-1]

    prof.time_fn(seen.append, repeats=3, warmup=2, device="cpu", setup=setup)
    assert made == [0, 1, 2, 3, 4] and seen == made


@pytest.mark.parametrize("kw", [dict(repeats=0), dict(warmup=-1), dict(repeats=1.5)])
def test_time_fn_rejects_bad_counts(kw):
    with pytest.raises(ValueError, match="integer"):
        prof.time_fn(lambda: None, device="cpu", **kw)


def test_median_seconds_takes_turns_and_returns_one_median_per_function(monkeypatch):
    order = []
    fns = [lambda name=name: order.append(name) for name in "abc"]
    clock = iter(range(1000))  # every clock read advances by 1 s ...
    monkeypatch.setattr(prof.time, "perf_counter", lambda: float(next(clock)))
    medians = prof.median_seconds(*fns, repeats=4, warmup=2, device="cpu")
    assert order == list("abc") * 6  # warm-up rounds then timed rounds, always in turn
    assert medians == [1.0, 1.0, 1.0]  # ... so each timed call lasted exactly 1 s


def test_median_seconds_ignores_a_spoiled_round(monkeypatch):
    durations = iter([1, 2, 1, 2, 50, 60, 1, 2])  # round 3 was hit by a busy neighbour
    now = [0.0]

    def perf_counter():
        return now[0]

    def call():
        now[0] += next(durations)

    monkeypatch.setattr(prof.time, "perf_counter", perf_counter)
    assert prof.median_seconds(call, call, repeats=4, warmup=0, device="cpu") == [1.0, 2.0]


def test_median_seconds_needs_functions_and_valid_counts():
    with pytest.raises(ValueError, match="at least one function"):
        prof.median_seconds(device="cpu")
    with pytest.raises(ValueError, match="integer"):
        prof.median_seconds(lambda: None, repeats=0, device="cpu")


# ----------------------------------------------------------------------------- time_generation


def test_time_generation_returns_the_grid_of_records():
    model = tiny().train()
    table = prof.time_generation(model, (1, 2), (4, 6), new_tokens=3, repeats=2, warmup=0)
    assert [(r.batch, r.context) for r in table] == [(1, 4), (1, 6), (2, 4), (2, 6)]
    for r in table:
        assert r.new_tokens == 3
        assert len(r.prefill.samples) == len(r.decode.samples) == 2
        assert r.ttft_s > 0 and r.tpot_s > 0
        assert r.tpot_s == pytest.approx(r.decode.median / 3)
        assert r.prefill_tokens_per_s == pytest.approx(r.batch * r.context / r.ttft_s)
        assert r.decode_tokens_per_s == pytest.approx(r.batch / r.tpot_s)
    assert model.training  # mode restored
    rows = table.to_rows()
    assert rows[0]["batch"] == 1 and set(rows[0]) >= {"ttft_ms", "tpot_ms", "decode_tok/s"}
    text = str(table)
    assert text.splitlines()[0].split()[:2] == ["batch", "context"] and len(text.splitlines()) == 6


def test_time_generation_runs_generates_prefill_and_decode_step(monkeypatch):
    counts = {"prefill": 0, "decode": 0}
    real_prefill, real_decode = gen.prefill, gen.decode_step

    def prefill(*a, **k):
        counts["prefill"] += 1
        return real_prefill(*a, **k)

    def decode_step(*a, **k):
        counts["decode"] += 1
        return real_decode(*a, **k)

    monkeypatch.setattr(gen, "prefill", prefill)
    monkeypatch.setattr(gen, "decode_step", decode_step)
    prof.time_generation(tiny(), (2,), (5,), new_tokens=4, repeats=2, warmup=1)
    # (warmup + repeats) timed prefills, and as many untimed ones to set up the decode loops
    assert counts == {"prefill": 6, "decode": 3 * 4}


def test_time_generation_works_with_a_port():
    port = NumpyLM.from_model(tiny())
    table = prof.time_generation(port, (2,), (4,), new_tokens=2, repeats=1, warmup=0)
    assert len(table) == 1 and table[0].ttft_s > 0 and table[0].tpot_s > 0


def test_time_generation_errors_are_clear():
    with pytest.raises(ValueError, match="context_length=32"):
        prof.time_generation(tiny(), (1,), (30,), new_tokens=4)
    with pytest.raises(ValueError, match="batch size"):
        prof.time_generation(tiny(), (0,), (4,))
    with pytest.raises(TypeError, match="CachedLM"):
        prof.time_generation(object(), (1,), (4,))


# ----------------------------------------------------------------------------- op breakdown


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_op_breakdown_shares_sum_to_one_and_show_the_matmuls(phase):
    model = tiny()
    rows = prof.op_breakdown(model, torch.randint(0, V, (2, 6)), phase=phase, repeats=2)
    assert sum(r.share for r in rows) == pytest.approx(1.0)
    assert all(r.self_cpu_s >= 0 and r.calls > 0 for r in rows)
    assert [r.share for r in rows] == sorted((r.share for r in rows), reverse=True)
    names = {r.op for r in rows}
    assert names & {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
    mm = [r for r in rows if r.op == "aten::mm"]
    if mm:  # 7 projections per layer + the head, each called once per run
        assert mm[0].calls == pytest.approx(7 * L + 1)


def test_op_breakdown_top_merges_the_rest():
    rows = prof.op_breakdown(tiny(), [1, 2, 3], top=3, repeats=1)
    assert len(rows) == 4 and rows[-1].op == "other"
    assert sum(r.share for r in rows) == pytest.approx(1.0)
    fig = prof.plot_op_breakdown(rows, title="prefill")
    assert len(fig.axes[0].patches) == 4


def test_op_breakdown_rejects_bad_input():
    with pytest.raises(ValueError, match="phase"):
        prof.op_breakdown(tiny(), [1, 2], phase="train")
    with pytest.raises(TypeError, match="torch model"):
        prof.op_breakdown(NumpyLM.from_model(tiny()), [1, 2])


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("kw", [{}, {"attention": "gqa", "n_kv_head": 1}])
def test_count_flops_equals_flops_per_token(kw):
    model, B, T = tiny(**kw).eval(), 2, 8
    ids = torch.randint(0, V, (B, T))
    assert prof.count_flops(model, ids) == flops_per_token(model.config, T) * B * T
    cache = model.new_cache(B)
    with torch.no_grad():
        model(ids, cache=cache)
    step = prof.count_flops(model, torch.randint(0, V, (B, 1)), cache=cache)
    assert step == flops_per_token(model.config, T + 1) * B  # position T attends T + 1 keys


def test_flop_counter_counts_the_fused_cpu_attention():
    B, H, T, S, D = 2, 3, 5, 5, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    with prof.flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert counter.get_total_flops() == 2 * (2 * B * H * T * S * D)  # QK^T and scores x V


# ----------------------------------------------------------------------------- bytes


def _hand_bytes(batch, context, phase, wb, kb, ab):
    """The tiny dense MHA model, counted by hand: weights, KV, matmul inputs and outputs."""
    Fh = 40  # mlp_hidden: 8/3 * 16 rounded to a multiple of 8
    layer = 2 * C + 4 * C * C + 3 * C * Fh  # two norms, q/k/v/o, gate/up/down
    tokens = batch * context if phase == "prefill" else batch
    # every weight but the embedding table, of which only the looked-up rows
    weights = (L * layer + C * V + C + tokens * C) * wb
    kv_token = 2 * L * C * kb  # a key and a value of C channels per layer
    act_token = L * (4 * 2 * C + 2 * (C + Fh) + (Fh + C))  # in + out of each matmul
    head = batch * (C + V)  # the head runs once per sequence: reads C, writes V logits
    if phase == "prefill":
        return weights, 0, tokens * kv_token, (tokens * act_token + head) * ab
    return weights, batch * context * kv_token, batch * kv_token, (act_token * batch + head) * ab


@pytest.mark.parametrize(
    "batch, context, phase, sizes",
    [
        (2, 8, "prefill", (4, 4, 4)),
        (2, 9, "decode", (4, 4, 4)),
        (3, 5, "decode", (1, 2, 2)),
        (1, 7, "prefill", (0.5, 1, 4)),
    ],
)
def test_bytes_per_step_matches_a_hand_count(batch, context, phase, sizes):
    wb, kb, ab = sizes
    got = prof.bytes_per_step(
        tiny_config(), batch, context, phase, weight_bytes=wb, kv_bytes=kb, activation_bytes=ab
    )
    expected = _hand_bytes(batch, context, phase, wb, kb, ab)
    assert (got.weights, got.kv_read, got.kv_write, got.activations) == pytest.approx(expected)
    assert got.total == pytest.approx(sum(expected))


def test_bytes_per_step_errors_name_the_fix():
    with pytest.raises(ValueError, match="phase"):
        prof.bytes_per_step(tiny_config(), 1, 4, "train")
    with pytest.raises(ValueError, match="context must be an integer >= 2"):
        prof.bytes_per_step(tiny_config(), 1, 1, "decode")
    with pytest.raises(ValueError, match="weight_bytes=3"):
        prof.bytes_per_step(tiny_config(), 1, 4, "prefill", weight_bytes=3)


# ----------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_large_cpu_allocation():
    def allocate():
        x = torch.ones(16 * 2**20)  # 64 MiB: above glibc's mmap threshold, so fresh pages
        time.sleep(0.02)  # hold it long enough for the sampler to see it
        return float(x[0])

    peak = prof.peak_memory(allocate, device="cpu")
    assert isinstance(peak, int) and peak >= 32 * 2**20


# ----------------------------------------------------------------------------- roofline


def test_measure_roofline_on_a_tiny_size_returns_a_chip():
    roof = prof.measure_roofline("cpu", dtypes=("float32", "int8"), size=32, copy_bytes=2**16)
    assert "float32" in roof.peak_flops  # int8 may be skipped where torch._int_mm is missing
    for value in [*roof.peak_flops.values(), roof.bandwidth]:
        assert math.isfinite(value) and value > 0
    assert isinstance(roof.chip, Chip)
    assert roof.chip.bf16_tflops * 1e12 == pytest.approx(roof.peak_flops["float32"])
    assert roof.chip.memory_gbps * 1e9 == pytest.approx(roof.bandwidth)
    assert roof.ridge_point("float32") == pytest.approx(roof.peak_flops["float32"] / roof.bandwidth)
    ridge = roof.ridge_point()
    assert roof.attainable(ridge / 2) == pytest.approx(roof.bandwidth * ridge / 2)
    assert roof.attainable(ridge * 2) == pytest.approx(roof.peak_flops["float32"])
    assert roof.as_chip("float32").bf16_tflops == roof.chip.bf16_tflops
    assert "GB/s" in roof.summary()
    with pytest.raises(ValueError, match="not measured"):
        roof.ridge_point("float16")


def test_measure_roofline_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match="float type"):
        prof.measure_roofline("cpu", dtypes=("float8",), size=32)


def test_generation_points_use_counted_flops_and_costs_bytes():
    model, rec = tiny(), fake_record(batch=2, context=6, new_tokens=3)
    prefill, decode = prof.generation_points(model, rec)
    c = model.config
    assert prefill.flops == flops_per_token(c, 6) * 2 * 6
    assert decode.flops == pytest.approx(sum(flops_per_token(c, 6 + i) * 2 for i in (1, 2, 3)) / 3)
    assert prefill.bytes == prof.bytes_per_step(c, 2, 6, "prefill").total
    decode_bytes = [prof.bytes_per_step(c, 2, 6 + i, "decode").total for i in (1, 2, 3)]
    assert decode.bytes == pytest.approx(sum(decode_bytes) / 3)
    assert (prefill.seconds, decode.seconds) == (rec.ttft_s, rec.tpot_s)
    assert decode.intensity == pytest.approx(decode.flops / decode.bytes)
    assert decode.achieved_flops == pytest.approx(decode.flops / decode.seconds)
    # a port gets the analytic count, which the torch count equals
    port_points = prof.generation_points(NumpyLM.from_model(model), rec)
    assert [p.flops for p in port_points] == pytest.approx([prefill.flops, decode.flops])


def test_plot_roofline_draws_a_roof_per_dtype_and_the_points():
    roof = prof.Roofline(
        device="test",
        peak_flops={"float32": 1e11, "bfloat16": 5e10},
        bandwidth=1e10,
        chip=this_machine(0.1, 10.0),
        matmul_size=32,
        copy_bytes=64,
    )
    points = [prof.RooflinePoint("decode", 1e6, 1e6, 1e-3), prof.RooflinePoint("p", 1e9, 1e7, 0.1)]
    assert points[0].efficiency(roof) == pytest.approx(1e9 / 1e10)
    fig = prof.plot_roofline(roof, points)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 + 2 and ax.get_xscale() == "log"


def test_predicted_vs_measured_divides_by_the_estimate():
    config, chip = tiny_config(), this_machine(0.05, 10.0)
    rec = fake_record(batch=2, context=6, new_tokens=3)
    (row,) = prof.predicted_vs_measured([rec], config, chip)
    est = estimate(ModelShape.from_config(config), chip, 2, 6, 3, weight_bits=32, kv_bits=32)
    assert row.predicted_prefill_s == est.prefill_seconds
    assert row.predicted_decode_s == est.decode_seconds_per_token
    assert row.prefill_ratio == pytest.approx(rec.ttft_s / est.prefill_seconds)
    assert row.decode_ratio == pytest.approx(rec.tpot_s / est.decode_seconds_per_token)
