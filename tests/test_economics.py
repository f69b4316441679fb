"""Tests for tinylm.economics: hourly cost, break-even, the frontier, request cost, fleets.

Expected figures are worked out by hand in the comments, never copied from a run.
"""

from __future__ import annotations

import csv
import math

import pytest

from tinylm.costs import ModelShape, decode_attention_per_cached_token, estimate, load_models
from tinylm.economics import (
    PRICE_CSV_COLUMNS,
    ChipPrice,
    FrontierPoint,
    batch_sweep,
    best_at_interactivity,
    break_even_usd_per_hour,
    capital_usd_per_hour,
    fleet_tokens_per_day,
    frontier,
    hourly_cost,
    load_prices,
    pareto,
    provisioned_watts,
    request_cost,
    usd_per_million,
)
from tinylm.hardware import Chip, load_chips, ridge_point

# The toy model and chip of test_costs.py (same numbers, worked out there): decode at batch 1,
# prompt 4, 3 new tokens takes 3.44 us; prefill 10.112 us; weights 2896 B, KV 224 B per
# sequence; the chip holds 4000 B, so at most 4 sequences fit.
TOY = ModelShape(
    n_layer=2, d_model=8, n_head=2, n_kv_head=1, head_dim=4, vocab=16, attention="gqa",
    mlp_hidden=16, name="toy",
)  # fmt: skip
TOY_CHIP = Chip(
    "toy chip", bf16_tflops=1e-3, int8_tops=2e-3, memory_gb=4e-6, memory_gbps=1.0,
    link_gbps=1.0, watts=10, usd_per_hour=3.6,
)  # fmt: skip


def test_capital_per_hour_by_hand():
    # no interest: 8760 USD over 1 year is 1 USD per hour
    assert capital_usd_per_hour(8760, 1) == pytest.approx(1.0)
    # 10% over 2 years: 1000 * 0.1 / (1 - 1/1.21) = 100 / 0.173554 = 576.19 USD a year
    assert capital_usd_per_hour(1000, 2, 0.10) == pytest.approx(576.19 / 8760, rel=1e-4)
    # interest always costs more than none
    assert capital_usd_per_hour(1000, 4, 0.05) > capital_usd_per_hour(1000, 4, 0.0)
    with pytest.raises(ValueError, match="years=0 must be > 0"):
        capital_usd_per_hour(1000, 0)


def test_hourly_cost_by_hand():
    price = ChipPrice(
        "toy chip", chip_usd=5840, system_fraction=0.5, amortisation_years=1,
        cost_of_capital=0.0, host_power_fraction=1.0, pue=1.5, usd_per_kwh=0.2,
    )  # fmt: skip
    cost = hourly_cost(price, TOY_CHIP)
    # capital 5840 * 1.5 = 8760 USD over one year: 1 USD/h
    assert cost.capital_usd_per_hour == pytest.approx(1.0)
    # power 10 W * (1 + 1.0) * 1.5 = 30 W = 0.03 kW at 0.2 USD/kWh: 0.006 USD/h
    assert provisioned_watts(10, 1.0, 1.5) == cost.provisioned_watts == 30
    assert cost.power_usd_per_hour == pytest.approx(0.006)
    assert cost.usd_per_hour == pytest.approx(1.006)
    with pytest.raises(ValueError, match="pue=0.9 must be >= 1"):
        ChipPrice("x", chip_usd=1, pue=0.9)
    with pytest.raises(ValueError, match="has no watts"):
        hourly_cost(
            price, Chip("no power", bf16_tflops=1, int8_tops=None, memory_gb=1, memory_gbps=1)
        )


def test_shipped_prices_load_with_sources():
    prices, chips = load_prices(), load_chips()
    for name in ("H100 SXM", "H20", "Ascend 910B", "Ascend 910C"):
        p = prices[name]
        assert p.chip_usd > 0 and p.amortisation_years == 4  # the shared "default" row
        # every figure says where it came from or that it is an assumption
        assert p.sources["chip_usd"] or p.certainty["chip_usd"] == "assumption"
        assert hourly_cost(p, chips[name]).usd_per_hour > 0
    # the H20 price is the FT/SemiAnalysis figure: 12B USD / 1M chips
    assert prices["H20"].chip_usd == 12_000
    assert "SemiAnalysis" in prices["H20"].certainty["chip_usd"]


def test_load_prices_errors(tmp_path):
    def write(rows):
        path = tmp_path / "p.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(PRICE_CSV_COLUMNS)
            w.writerows(rows)
        return path

    ok = write([["default", "pue", "1.2", "ratio", "", "assumption", ""],
                ["chip", "chip_usd", "100", "USD", "", "assumption", ""]])  # fmt: skip
    assert load_prices(ok)["chip"] == ChipPrice("chip", chip_usd=100, pue=1.2)
    with pytest.raises(ValueError, match="has no chip_usd row"):
        load_prices(write([["chip", "pue", "1.2", "ratio", "", "", ""]]))
    with pytest.raises(ValueError, match="unit 'EUR', expected 'USD'"):
        load_prices(write([["chip", "chip_usd", "100", "EUR", "", "", ""]]))
    with pytest.raises(ValueError, match="unknown field 'rent'"):
        load_prices(write([["chip", "rent", "1", "USD", "", "", ""]]))
    with pytest.raises(ValueError, match="'12k' of 'chip' / chip_usd is not a number"):
        load_prices(write([["chip", "chip_usd", "12k", "USD", "", "", ""]]))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_prices(tmp_path / "nope.csv")


def test_break_even_by_hand():
    # A chip at half the reference throughput matches its $ per token at half its price.
    assert break_even_usd_per_hour(2.0, 100.0, 50.0) == pytest.approx(1.0)
    assert break_even_usd_per_hour(2.5, 1000.0, 1500.0) == pytest.approx(3.75)
    # at the break-even price the two $ per million tokens are equal
    assert usd_per_million(1.0, 50.0) == pytest.approx(usd_per_million(2.0, 100.0))
    # 3600 USD/h producing 1 token/s: 1 USD per token, 1e6 USD per million
    assert usd_per_million(3600, 1) == pytest.approx(1e6)
    with pytest.raises(ValueError, match="tokens_per_s_per_chip=0 must be > 0"):
        break_even_usd_per_hour(2.0, 100.0, 0)


def test_batch_sweep():
    assert batch_sweep(4) == [1, 2, 4]
    assert batch_sweep(5) == [1, 2, 4, 5]
    assert batch_sweep(1) == [1]
    assert batch_sweep(0) == []


def test_frontier_points_by_hand():
    points = frontier(TOY, TOY_CHIP, usd_per_hour_per_chip=3.6, watts_per_chip=10,
                      prompt_len=4, new_tokens=3)  # fmt: skip
    # max batch 4 (see the toy figures above): batches 1, 2, 4 and no more
    assert [p.batch for p in points] == [1, 2, 4]
    first = points[0]
    # batch 1: a step of 3.44 us gives the user 1 / 3.44e-6 tokens/s, and the one chip the same
    assert first.tokens_per_s_per_user == pytest.approx(1 / 3.44e-6)
    assert first.tokens_per_s_per_chip == pytest.approx(1 / 3.44e-6)
    # 3.6 USD/h = 0.001 USD/s: 0.001 * 3.44e-6 * 1e6 = 0.00344 USD per million tokens
    assert first.usd_per_million_output == pytest.approx(0.00344)
    # per provisioned MW: (1 / 3.44e-6) tokens/s per 10 W -> x 1e5 per MW
    assert first.tokens_per_s_per_mw == pytest.approx(1 / 3.44e-6 * 1e5)
    # each point is the cost model's estimate at that batch, and fits
    for p in points:
        est = estimate(TOY, TOY_CHIP, p.batch, 4, 3)
        assert est.fits
        assert p.tokens_per_s_per_user == pytest.approx(1 / est.decode_seconds_per_token)
        assert p.tokens_per_s_per_chip == pytest.approx(est.tokens_per_second)
    # batching trades per-user speed for throughput
    assert points[-1].tokens_per_s_per_chip > first.tokens_per_s_per_chip
    assert points[-1].tokens_per_s_per_user < first.tokens_per_s_per_user
    # a context at which nothing fits gives no point at all
    assert frontier(TOY, TOY_CHIP, 3.6, 10, prompt_len=60, new_tokens=10) == []


def test_pareto_and_best_at_interactivity():
    def fp(user, chip):
        return FrontierPoint("c", 1, 1, user, chip, 1.0, 1.0, "memory", 1.0)

    pts = [fp(100, 10), fp(90, 5), fp(50, 40), fp(20, 30), fp(10, 60)]
    # (90, 5) is beaten by (100, 10); (20, 30) by (50, 40)
    assert [(p.tokens_per_s_per_user, p.tokens_per_s_per_chip) for p in pareto(pts)] == [
        (100, 10), (50, 40), (10, 60),
    ]  # fmt: skip
    assert best_at_interactivity(pts, 20).tokens_per_s_per_chip == 40
    assert best_at_interactivity(pts, 200) is None


def test_request_cost_by_hand():
    est = estimate(TOY, TOY_CHIP, batch=1, prompt_len=4, new_tokens=3)
    cost = request_cost(est, usd_per_hour_per_chip=3.6)
    # prefill 10.112 us + 3 decode steps of 3.44 us = 20.432 us of one chip at 0.001 USD/s
    assert cost.prefill_chip_seconds == pytest.approx(10.112e-6)
    assert cost.decode_chip_seconds == pytest.approx(10.32e-6)
    assert cost.usd == pytest.approx(20.432e-9)
    assert cost.prefill_share == pytest.approx(10.112 / 20.432)
    # blended over 4 + 3 tokens
    assert cost.usd_per_million_tokens == pytest.approx(20.432e-9 / 7 * 1e6)
    # two sequences share the decode steps: cheaper per request
    two = request_cost(estimate(TOY, TOY_CHIP, batch=2, prompt_len=4, new_tokens=3), 3.6)
    assert two.decode_chip_seconds < cost.decode_chip_seconds


def test_fleet_tokens_per_day_by_hand():
    # 1000 chips at 10 tokens/s, busy half the time: 1000 * 10 * 0.5 * 86400 = 432 M tokens
    assert fleet_tokens_per_day(1000, 10, 0.5) == 432e6
    with pytest.raises(ValueError, match="utilisation=0 must be in"):
        fleet_tokens_per_day(1000, 10, 0)


def test_headline_configurations_fit_or_say_so():
    models, chips = load_models(), load_chips()
    ds = models["DeepSeek-V3"]
    # 671B weights in 8 bits over 8 H100s: 84 GB per chip > 80 GB, so it does NOT fit
    assert ds.total_params * 1 / 8 > 80e9
    assert not estimate(ds, chips["H100 SXM"], 1, 2048, 512, weight_bits=8, tp=8).fits
    # ... while 8 H20s (96 GB each) hold it
    assert estimate(ds, chips["H20"], 1, 2048, 512, weight_bits=8, tp=8).fits
    # and the frontier of the H100 tp=8 configuration is empty
    assert frontier(ds, chips["H100 SXM"], 2.5, 1000, 2048, 512, weight_bits=8, tps=(8,)) == []


def test_mla_decode_attention_is_compute_bound_on_low_flop_chips():
    models, chips = load_models(), load_chips()
    ds, llama = models["DeepSeek-V3"], models["Llama-3-70B"]
    flops, nbytes = decode_attention_per_cached_token(ds)
    # absorbed MLA: 2 * 61 layers * 128 heads * (576 + 512) = 16,990,208 FLOPs per 70,272 B
    assert flops == 2 * 61 * 128 * 1088 == 16_990_208 and nbytes == 70_272
    intensity = flops / nbytes  # 241.8 FLOP/B
    assert intensity == pytest.approx(241.78, rel=1e-4)
    assert intensity > ridge_point(chips["H20"])  # 37: compute-bound
    assert intensity > ridge_point(chips["Ascend 910B"])  # 200: compute-bound
    assert intensity < ridge_point(chips["H100 SXM"])  # 295: still memory-bound
    # the plain (expanded) form: 2 * 61 * 128 * (192 + 128) FLOPs per cached token
    plain, _ = decode_attention_per_cached_token(ds, absorbed=False)
    assert plain == 2 * 61 * 128 * 320
    # GQA Llama-3-70B: 2 * 80 * 64 * 256 FLOPs per 2 * 80 * 8 * 128 * 2 bytes = 8 FLOP/B
    g_flops, g_bytes = decode_attention_per_cached_token(llama)
    assert g_flops / g_bytes == pytest.approx(8.0)
    assert math.isclose(decode_attention_per_cached_token(ds, kv_bits=8)[1], 35_136)
