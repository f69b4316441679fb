"""Tests for tinylm.moe: routing, dispatch, shared experts and load balancing."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from tinylm.moe import MoE

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, E, K, H = 16, 8, 2, 12  # n_embd, n_experts, experts_per_token, expert_hidden

MOE_FIELDS = dict(
    n_embd=C,
    n_experts=E,
    n_shared_experts=1,
    experts_per_token=K,
    expert_hidden=H,
    moe_balance="bias",
    moe_aux_loss_coef=0.01,
    moe_bias_update_rate=0.01,
)


def make_config(**overrides):
    """A tiny MoE config: the real GPTConfig when model.py has it, else a namespace."""
    fields = {**MOE_FIELDS, **overrides}
    try:
        from tinylm.model import GPTConfig
    except ImportError:
        return types.SimpleNamespace(**fields)
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    extra = dict(mlp="moe", n_head=4) if "mlp" in names else {}
    return GPTConfig(**extra, **fields)


def make_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    return MoE(make_config(**overrides))


def swiglu(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.down.weight @ (F.silu(m.gate.weight @ x) * (m.up.weight @ x))


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Naive MoE: every expert on every token, combined with a dense [N, E] gate matrix."""
    xs = x.reshape(-1, C)
    scores = torch.sigmoid(xs @ moe.router.weight.T)
    _, idx = torch.topk(scores + moe.expert_bias, K, dim=-1)
    chosen = scores.gather(-1, idx)
    dense_gates = torch.zeros_like(scores).scatter(-1, idx, chosen / chosen.sum(-1, keepdim=True))
    out = torch.zeros_like(xs)
    for e, expert in enumerate(moe.experts):
        out += dense_gates[:, e : e + 1] * swiglu(expert, xs.T).T
    if moe.shared is not None:
        out += swiglu(moe.shared, xs.T).T
    return out.reshape(x.shape)


def skewed_moe(n_tokens: int = 64, **overrides) -> tuple[MoE, torch.Tensor]:
    """A MoE whose router sends every token to experts 0 and 1, and inputs that show it."""
    moe = make_moe(**overrides)
    x = torch.randn(n_tokens // 16, 16, C, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 3.0  # a feature every token shares ...
    with torch.no_grad():
        moe.router.weight[:2, 0] = 2.0  # ... that experts 0 and 1 love
    return moe, x


def test_parameter_layout_and_state_dict():
    moe = make_moe()
    assert moe.router.weight.shape == (E, C) and moe.router.bias is None
    assert len(moe.experts) == E
    assert moe.experts[0].gate.weight.shape == (H, C)
    assert moe.shared.up.weight.shape == (1 * H, C)
    assert make_moe(n_shared_experts=3).shared.gate.weight.shape == (3 * H, C)
    assert make_moe(n_shared_experts=0).shared is None
    state = moe.state_dict()
    assert state["expert_bias"].dtype == torch.float32
    assert torch.equal(state["expert_bias"], torch.zeros(E))
    # The bias is learned state: a fresh module loading the state dict gets it back.
    moe.expert_bias += torch.arange(E, dtype=torch.float32)
    fresh = make_moe(seed=1)
    fresh.load_state_dict(moe.state_dict())
    assert torch.equal(fresh.expert_bias, moe.expert_bias)


@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("train", [False, True])
def test_matches_naive_reference(n_shared, train):
    moe = make_moe(n_shared_experts=n_shared).train(train)
    moe.expert_bias += 0.1 * torch.randn(E)  # a nonzero bias must steer selection the same way
    x = torch.randn(2, 5, C)
    expected = reference(moe, x)  # with the bias as it was before this forward
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_each_expert_runs_once_on_exactly_its_tokens():
    moe = make_moe().eval()
    x = torch.randn(3, 7, C)
    seen = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: seen.setdefault(e, []).append(inp[0]))
    moe(x)
    _, idx, _ = moe.route(x.reshape(-1, C))
    assert idx.shape == (21, K)
    # Each token uses exactly k distinct routed experts.
    assert all(len(set(row)) == K for row in idx.tolist())
    for e in range(E):
        mine = (idx == e).any(dim=-1)
        if not mine.any():
            assert e not in seen  # an expert with no tokens is never called
            continue
        assert len(seen[e]) == 1  # one call per expert, on its group of tokens only
        torch.testing.assert_close(seen[e][0], x.reshape(-1, C)[mine], rtol=0, atol=0)


def test_counts_no_token_dropped():
    moe, x = skewed_moe()
    moe.eval()
    moe(x)
    counts = moe.last_expert_counts
    assert counts.dtype == torch.long and counts.shape == (E,)
    assert counts.sum().item() == 4 * 16 * K  # even with the router collapsed: no capacity limit
    _, idx, _ = moe.route(x.reshape(-1, C))
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=E))


def test_shared_expert_always_contributes():
    moe = make_moe(n_shared_experts=1).eval()
    with torch.no_grad():
        for expert in moe.experts:
            expert.down.weight.zero_()  # silence every routed expert
    x = torch.randn(2, 3, C)
    out = moe(x)
    assert out.abs().min() > 0
    torch.testing.assert_close(out, moe.shared(x))


def test_selection_uses_bias_but_gates_do_not():
    moe = make_moe().eval()
    x = torch.randn(10, C)
    scores, idx, gates = moe.route(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    moe.expert_bias[E - 1] = 10.0  # far above any sigmoid gap: always selected
    scores2, idx2, gates2 = moe.route(x)
    assert torch.equal(scores2, scores)  # affinities do not see the bias
    assert (idx2 == E - 1).any(dim=-1).all()
    chosen = scores.gather(-1, idx2)
    torch.testing.assert_close(gates2, chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.slow
def test_bias_update_direction_and_balance():
    moe, x = skewed_moe(n_tokens=512, moe_bias_update_rate=0.02)
    moe.train()
    moe(x)
    first = moe.last_expert_counts.float()
    assert first[0] == first[1] == 512 and first.min() == 0  # collapsed: six experts idle
    # One update: overloaded experts pushed down, idle ones pushed up, by exactly the rate.
    torch.testing.assert_close(moe.expert_bias, 0.02 * torch.sign(first.mean() - first))
    for _ in range(50):
        moe(x)
    # The bias has overcome the router's preference: every expert works, loads are close.
    last = moe.last_expert_counts.float()
    assert last.min() > 0 and last.max() / last.min() < 3
    assert moe.expert_bias[:2].max() < moe.expert_bias[2:].min()


def test_no_balancing_leaves_a_collapsed_router_collapsed():
    # The same skewed router as above, trained 50 forwards with moe_balance="none": nothing
    # pushes the load apart, so experts 0 and 1 keep every token and the bias never moves.
    moe, x = skewed_moe(n_tokens=512, moe_balance="none")
    moe.train()
    for _ in range(50):
        moe(x)
    counts = moe.last_expert_counts
    assert counts[0] == counts[1] == 512 and counts[2:].sum() == 0
    assert torch.equal(moe.expert_bias, torch.zeros(E)) and moe.aux_loss.item() == 0.0


@pytest.mark.parametrize("balance", ["bias", "aux_loss", "none"])
def test_bias_frozen_in_eval_and_no_grad(balance):
    moe, x = skewed_moe(moe_balance=balance)
    moe.eval()
    out1 = moe(x)
    out2 = moe(x)
    assert torch.equal(out1, out2)
    assert torch.equal(moe.expert_bias, torch.zeros(E))
    moe.train()
    with torch.no_grad():  # e.g. evaluation inside a training loop without .eval()
        moe(x)
    assert torch.equal(moe.expert_bias, torch.zeros(E))
    moe(x)
    moved = balance == "bias"
    assert bool(moe.expert_bias.abs().sum() > 0) == moved


def test_aux_loss_gradient_and_size():
    coef = 0.01
    moe, x = skewed_moe(moe_balance="aux_loss", moe_aux_loss_coef=coef)
    with torch.no_grad():
        moe.router.weight[2:, 0] = -2.0  # and the others hate: affinity mass on experts 0, 1
    moe.train()
    moe(x)
    collapsed = moe.aux_loss
    assert collapsed.shape == () and collapsed.requires_grad
    collapsed.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    # Uniform affinities give the minimum, coef (whatever the ties pick); a fully collapsed
    # router gives coef * E / k = 4 * coef.
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(coef))
    assert collapsed.item() > 3 * coef


@pytest.mark.parametrize("balance", ["bias", "none"])
def test_aux_loss_zero_without_aux_balance(balance):
    moe, x = skewed_moe(moe_balance=balance)
    moe.train()
    moe(x)
    assert moe.aux_loss.shape == () and moe.aux_loss.item() == 0.0


def test_gradients_reach_selected_experts_only():
    moe = make_moe().train()
    moe.expert_bias[E - 1] = -10.0  # never selected
    moe(torch.randn(2, 8, C)).pow(2).sum().backward()
    assert moe.last_expert_counts[E - 1] == 0
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        if moe.last_expert_counts[e] > 0:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), e
        else:
            assert all(g is None for g in grads), e
    assert moe.shared.gate.weight.grad.abs().sum() > 0
    assert moe.router.weight.grad.abs().sum() > 0  # through the gate weights


def test_tokens_are_independent():
    # No capacity limit, so a token's output does not depend on the other tokens in the batch:
    # decoding one token at a time (KV cache) gives the same result as the full sequence.
    moe = make_moe().eval()
    x = torch.randn(2, 9, C)
    full = moe(x)
    for t in range(9):
        torch.testing.assert_close(moe(x[:, t : t + 1]), full[:, t : t + 1])


def test_deterministic():
    x = torch.randn(2, 6, C)
    a, b = make_moe(seed=3).eval(), make_moe(seed=3).eval()
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.last_expert_counts, b.last_expert_counts)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(experts_per_token=E + 1), "experts_per_token"),
        (dict(experts_per_token=0), "experts_per_token"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(moe_balance="softmax"), "moe_balance"),
    ],
)
def test_bad_config(overrides, match):
    # A bare namespace: GPTConfig may (rightly) reject these before MoE sees them.
    with pytest.raises(ValueError, match=match):
        MoE(types.SimpleNamespace(**{**MOE_FIELDS, **overrides}))
