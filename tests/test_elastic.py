"""Tests for tinylm.elastic: Young/Daly by hand, and a torchrun job surviving a killed worker."""

from __future__ import annotations

import math

import psutil
import pytest
import torch

from tinylm.elastic import (
    ElasticJob,
    ElasticRun,
    batch_for,
    cluster_mtbf_hours,
    optimal_checkpoint_interval,
    wasted_fraction,
    young_interval,
)

TINY = dict(vocab_size=64, context_length=32, n_layer=1, n_head=2, n_embd=32)


def test_young_daly_by_hand():
    # delta = 60 s, M = 5 h = 18000 s: Young sqrt(2 * 60 * 18000) = sqrt(2.16e6) = 1469.69 s.
    assert young_interval(60, 18_000) == pytest.approx(1469.6938, rel=1e-6)
    # Daly: x = 60 / 36000 = 1/600; 1469.6938 * (1 + sqrt(1/600)/3 + 1/5400) - 60
    #     = 1469.6938 * 1.0137935 - 60 = 1429.966 s.
    assert optimal_checkpoint_interval(60, 18_000) == pytest.approx(1429.966, rel=1e-5)
    # A checkpoint longer than 2 M: checkpoint every M.
    assert optimal_checkpoint_interval(50, 20) == 20
    # 10,000 chips of 50,000 h MTBF each fail, as a job, every 5 h.
    assert cluster_mtbf_hours(50_000, 10_000) == pytest.approx(5.0)


def test_wasted_fraction_is_least_near_the_optimum():
    delta, mtbf, restart = 60.0, 18_000.0, 300.0
    # By hand at tau = 1200: 60/1200 + (300 + 630)/18000 = 0.05 + 0.051667 = 0.101667.
    assert wasted_fraction(1200, delta, mtbf, restart) == pytest.approx(0.101667, rel=1e-5)
    best = optimal_checkpoint_interval(delta, mtbf)
    grid = [best * f for f in (0.25, 0.5, 0.8, 1.25, 2, 4)]
    assert all(wasted_fraction(best, delta, mtbf) < wasted_fraction(t, delta, mtbf) for t in grid)
    # d/dtau of the first-order waste vanishes at Young's interval.
    tau, h = young_interval(delta, mtbf), 1e-3
    slope = (wasted_fraction(tau + h, delta, mtbf) - wasted_fraction(tau - h, delta, mtbf)) / 2 / h
    assert abs(slope) < 1e-9


@pytest.mark.parametrize(
    "call",
    [
        lambda: young_interval(0, 10),
        lambda: optimal_checkpoint_interval(10, -1),
        lambda: wasted_fraction(10, 1, math.inf),
        lambda: cluster_mtbf_hours(100, 0),
        lambda: ElasticJob(model=TINY, steps=10, kill_at_step=10),
        lambda: ElasticJob(model=TINY, checkpoint_every=0),
    ],
)
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()


def test_batches_depend_only_on_seed_step_and_rank():
    tokens = torch.arange(1000)
    job = ElasticJob(model=TINY)
    a, b = batch_for(tokens, job, 7, 1), batch_for(tokens, job, 7, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], a[0] + 1)
    assert not torch.equal(batch_for(tokens, job, 7, 0)[0], a[0])
    assert not torch.equal(batch_for(tokens, job, 8, 1)[0], a[0])


def test_run_refuses_a_folder_with_an_earlier_run(tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    with pytest.raises(ValueError, match="earlier run"):
        ElasticRun(ElasticJob(model=TINY), torch.arange(500), tmp_path)


@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_checkpoint_with_the_uninterrupted_weights(tmp_path):
    tokens = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0))
    runs = {}
    for kill in (None, 13):
        job = ElasticJob(model=TINY, steps=16, checkpoint_every=5, kill_at_step=kill)
        with ElasticRun(job, tokens, tmp_path / f"kill{kill}") as run:
            run.wait(timeout_s=240)
        runs[kill] = run
    clean, failed = runs[None], runs[13]
    assert (clean.restarts, clean.lost_steps) == (0, 0)
    # Killed before step 13 (0-based): steps 11..13 after the checkpoint at 10 are redone.
    assert failed.restarts == 1
    assert failed.lost_steps == 13 - 10
    kinds = [(e["event"], e.get("step")) for e in failed.events()]
    assert ("killed", 13) in kinds and kinds.count(("start", 10)) == 1
    assert failed.lost_seconds() > 0
    want, got = clean.final_weights(), failed.final_weights()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # bit-identical
    # And training did something: the weights moved away from the initial ones.
    torch.manual_seed(0)
    from tinylm.model import GPT, GPTConfig

    init = GPT(GPTConfig(**TINY)).state_dict()
    assert not torch.equal(init["blocks.0.mlp.up.weight"], got["blocks.0.mlp.up.weight"])
    # No process of either run is left.
    for run in runs.values():
        assert len(run.worker_pids) >= 2
        assert not any(psutil.pid_exists(pid) for pid in run.worker_pids)
