"""Tests for tinylm.distributed: sharding, tensor-parallel workers, failure and clean-up."""

from __future__ import annotations

import psutil
import pytest
import torch

from tinylm.costs import ModelShape, estimate
from tinylm.distributed import (
    AllReduceBench,
    ShardedGPT,
    TPServer,
    check_tp,
    fit_allreduce,
    modelled_comm_seconds,
    shard_state_dict,
    simulate_tp,
    valid_tp,
)
from tinylm.generate import generate
from tinylm.hardware import this_machine
from tinylm.model import GPT, GPTConfig

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [20, 21, 22, 23]]


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, context_length=48, n_layer=2, n_head=4, n_embd=32) | kw
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights: peaked logits, so greedy has no near-ties
        model.lm_head.weight.mul_(20)
    return model


def workers() -> list[psutil.Process]:
    """Live child processes started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


# ----------------------------------------------------------------------------- in process


def test_shards_partition_the_weights():
    model = tiny()
    shards = [shard_state_dict(model, r, 2) for r in range(2)]
    full = model.state_dict()
    q = torch.cat([s["blocks.0.attn.q_proj.weight"] for s in shards], dim=0)
    down = torch.cat([s["blocks.1.mlp.down.weight"] for s in shards], dim=1)
    assert torch.equal(q, full["blocks.0.attn.q_proj.weight"])
    assert torch.equal(down, full["blocks.1.mlp.down.weight"])
    assert torch.equal(shards[1]["lm_head.weight"], full["lm_head.weight"])  # replicated
    assert shards[0]["blocks.0.mlp.up.weight"].shape[0] == model.config.mlp_hidden // 2


@pytest.mark.parametrize(
    "kw, world",
    [({}, 1), ({}, 2), ({}, 4), ({"attention": "gqa", "n_kv_head": 2}, 2)],
)
def test_simulated_tp_equals_model(kw, world):
    model = tiny(**kw)
    idx = torch.tensor([PROMPTS[0] * 3])
    with torch.no_grad():
        want = model(idx)
    torch.testing.assert_close(simulate_tp(model, idx, world), want, atol=1e-5, rtol=1e-5)


def test_sharded_cache_equals_full_forward():
    model = tiny(attention="gqa", n_kv_head=2)
    shard = ShardedGPT(model.config, shard_state_dict(model, 0, 1), 1)
    cache = shard.new_cache(1)
    idx = torch.tensor([PROMPTS[0]])
    steps = [shard(idx[:, :3], cache)[:, -1]] + [
        shard(idx[:, t : t + 1], cache)[:, -1] for t in (3, 4)
    ]
    with torch.no_grad():
        full = model(idx)[0, 2:]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


def test_bad_configurations_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="use one of"):
        check_tp(tiny().config, 3)
    with pytest.raises(ValueError, match="dense MHA/GQA"):
        check_tp(tiny(attention="mqa").config, 2)
    assert valid_tp(tiny().config, 4) and not valid_tp(tiny().config, 3)
    with pytest.raises(ValueError, match="rank must be"):
        shard_state_dict(tiny(), 2, 2)


def test_modelled_comm_matches_the_cost_model():
    cfg = tiny().config
    chip = this_machine(1.0, 10.0, link_gbps=3.0)
    est = estimate(ModelShape.from_config(cfg), chip, batch=1, tp=2, allreduce_latency_s=1e-4)
    ours = modelled_comm_seconds(cfg, tokens=1, world=2, link_gbps=3.0, latency_s=1e-4,
                                 bytes_per_value=2)  # fmt: skip
    assert ours == pytest.approx(est.decode.comm_seconds)
    assert modelled_comm_seconds(cfg, 1, 1, 3.0, 1e-4) == 0.0


def test_allreduce_fit_recovers_known_latency_and_bandwidth():
    # t = 50 us + sent / 2 GB/s with sent = 2 (w-1)/w x size for w = 4, over 4 decades of
    # sizes, with +-3% multiplicative noise (seeded): the fit must find both within a few %.
    sizes = [2**k for k in range(8, 24)] * 5
    g = torch.Generator().manual_seed(0)
    noise = 1 + 0.03 * (2 * torch.rand(len(sizes), generator=g) - 1)
    seconds = [(50e-6 + 1.5 * s / 2e9) * float(n) for s, n in zip(sizes, noise, strict=True)]
    fit = fit_allreduce(sizes, seconds, world=4)
    assert fit.latency_s == pytest.approx(50e-6, rel=0.05)
    assert fit.gbps == pytest.approx(2.0, rel=0.05)
    assert max(abs(r) for r in fit.residuals) < 0.06
    assert fit.seconds(1e6) == pytest.approx(fit.latency_s + 1.5e6 / (fit.gbps * 1e9))
    # Exact data: exact answer, and AllReduceBench.link() is the same fit.
    exact = [1e-4 + 1.5 * s / 2e9 for s in sizes[:16]]
    gbps, latency = AllReduceBench(4, sizes[:16], exact).link()
    assert gbps == pytest.approx(2.0, rel=1e-9) and latency == pytest.approx(1e-4, rel=1e-9)


def test_allreduce_fit_refuses_unusable_timings():
    with pytest.raises(ValueError, match="two different"):
        fit_allreduce([1000, 1000], [1e-4, 1e-4], world=2)
    with pytest.raises(ValueError, match="unphysical"):  # time falls with size
        fit_allreduce([1000, 10_000, 100_000], [3e-3, 2e-3, 1e-3], world=2)
    with pytest.raises(ValueError, match="world"):
        fit_allreduce([1000, 2000], [1e-4, 2e-4], world=1)


# ----------------------------------------------------------------------------- processes


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_tp_workers_match_survive_a_kill_and_clean_up():
    model = tiny()
    want = [generate(model, p, 8, temperature=0) for p in PROMPTS]
    before = {p.pid for p in workers()}
    with pytest.raises(KeyboardInterrupt):  # clean-up must happen even on an error
        with TPServer(model, world_size=2, step_timeout_s=30) as server:
            pids = server.pids
            assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
            # Logits and greedy tokens equal the single-process model.
            logits = server.forward_last(PROMPTS[0], new_request=True)
            with torch.no_grad():
                ref = model(torch.tensor([PROMPTS[0]]))[0, -1]
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
            server.reset_stats()
            assert server.generate(PROMPTS[:1], 8) == want[:1]
            for s in server.stats():  # 1 prefill + 7 decode forwards, 2 all-reduces per layer
                assert s["allreduces"] == 8 * 2 * model.config.n_layer
                assert s["comm_seconds"] > 0

            # SIGKILL rank 1 mid-stream of the second request: every request still completes
            # with the tokens it would have produced.
            def crash(srv, request, done):
                if request == 1 and done == 3:
                    srv.kill_worker(1)

            assert server.generate(PROMPTS, 8, on_token=crash) == want
            (event,) = server.failures
            assert (event.request, event.tokens_done, event.rank) == (1, 3, 1)
            assert (event.old_world, event.new_world) == (2, 1)
            assert event.detect_seconds < 30  # bounded: noticed long before any timeout
            assert not {p.pid for p in workers()} & set(pids)  # the old group is gone
            raise KeyboardInterrupt  # leave the with-block by an exception
    assert [p for p in workers() if p.pid not in before] == []
