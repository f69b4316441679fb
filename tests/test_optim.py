"""Tests for tinylm.optim: Newton-Schulz orthogonalisation and the Muon + AdamW optimizer."""

from __future__ import annotations

import pytest
import torch

from tinylm import train as T
from tinylm.model import GPT, GPTConfig
from tinylm.optim import MuonWithAdamW, embedding_tables, hidden_matrices, orthogonalize
from tinylm.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 48)])
def test_orthogonalize_keeps_the_singular_vectors_and_pushes_the_values_near_one(shape):
    g = torch.Generator().manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=g), full_matrices=False)
    spread = torch.logspace(0, -2, min(shape))  # singular values from 1 down to 0.01
    matrix = u @ torch.diag(spread) @ vh * 7.0  # any overall scale
    out = orthogonalize(matrix)
    assert out.shape == matrix.shape
    # Same singular vectors: U^T out V is diagonal, its diagonal the new singular values.
    inside = u.T @ out @ vh.T
    diagonal = torch.diagonal(inside)
    off = inside - torch.diag(diagonal)
    assert off.abs().max() < 1e-3
    # Five quintic steps leave the values between ~0.5 and ~1.3 (not exactly 1), every one
    # of them, even the one that started 100x smaller than the largest.
    assert diagonal.min() > 0.5 and diagonal.max() < 1.3, diagonal


def test_orthogonalize_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match="2-D matrix"):
        orthogonalize(torch.ones(5))


def test_a_stack_of_matrices_is_orthogonalised_matrix_by_matrix():
    stack = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(2))
    stack[1] *= 100.0  # each matrix is normalised on its own, not by the stack's norm
    together = orthogonalize(stack)
    for i in range(3):
        torch.testing.assert_close(together[i], orthogonalize(stack[i]), rtol=1e-5, atol=1e-6)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(24, 12, requires_grad=True), torch.randn(12, requires_grad=True)


def test_muon_with_adamw_matches_torch_adamw_and_muon_updates():
    """AdamW groups equal torch.optim.AdamW; Muon groups follow torch.optim.Muon (if present)."""
    w, n = _pair()
    w_ref, n_ref = (t.detach().clone().requires_grad_() for t in (w, n))
    ours = MuonWithAdamW(
        [{"params": [w], "use_muon": True}, {"params": [n], "weight_decay": 0.0}],
        lr=0.02,
        weight_decay=0.1,
    )
    adamw = torch.optim.AdamW([n_ref], lr=0.02, betas=(0.9, 0.95), weight_decay=0.0)
    muon = (
        torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        if hasattr(torch.optim, "Muon")
        else None
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad_w, grad_n = torch.randn(24, 12, generator=g), torch.randn(12, generator=g)
        before = w.detach().clone()
        w.grad, n.grad, w_ref.grad, n_ref.grad = grad_w, grad_n, grad_w.clone(), grad_n.clone()
        ours.step()
        adamw.step()
        torch.testing.assert_close(n, n_ref, rtol=1e-6, atol=1e-7)
        if muon is not None:
            muon.step()
            # torch runs Newton-Schulz in bfloat16, we in float32: compare the two steps as
            # wholes (relative Frobenius distance), where bfloat16's 8-bit mantissa shows.
            ours_step, torch_step = w - before, w_ref - before
            assert (ours_step - torch_step).norm() < 0.02 * ours_step.norm()
            w_ref.data.copy_(w.detach())  # keep the next comparison one step deep


def test_muon_step_has_the_size_of_an_adamw_step():
    """match-RMS rule: a Muon update's RMS is ~0.2 * lr whatever the matrix's shape."""
    for shape in [(64, 16), (16, 64), (32, 32)]:
        w = torch.zeros(*shape, requires_grad=True)
        w.grad = torch.randn(*shape)
        MuonWithAdamW([{"params": [w], "use_muon": True}], lr=0.1, weight_decay=0.0).step()
        rms = w.detach().pow(2).mean().sqrt().item()
        assert 0.1 * 0.2 * 0.6 < rms < 0.1 * 0.2 * 1.3, (shape, rms)


def test_muon_refuses_a_tensor_that_is_not_a_matrix():
    with pytest.raises(ValueError, match="use_muon=False"):
        MuonWithAdamW([{"params": [torch.zeros(4, requires_grad=True)], "use_muon": True}])
    with pytest.raises(ValueError, match="closure"):
        MuonWithAdamW([{"params": [torch.zeros(4, requires_grad=True)]}]).step(lambda: 0.0)


@pytest.mark.parametrize("tie", [False, True])
def test_make_optimizer_muon_takes_the_hidden_matrices_and_adamw_the_rest(tie):
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=tie
    )
    model = GPT(config)
    opt = T.make_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1))
    assert isinstance(opt, MuonWithAdamW)
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    adam = [p for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    linears = [m.weight for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert (
        {id(p) for p in muon} == {id(p) for p in linears} == {id(p) for p in hidden_matrices(model)}
    )
    assert id(model.tok_emb.weight) in {id(p) for p in adam}
    assert id(model.lm_head.weight) in {id(p) for p in adam}
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))
    tables = {id(p) for p in embedding_tables(model)}  # untied: its own group, no decay
    assert tables == (set() if tie else {id(model.tok_emb.weight)})
    for group in opt.param_groups:
        decays = group["weight_decay"] > 0
        assert decays == all(p.dim() >= 2 and id(p) not in tables for p in group["params"])


def test_train_config_names_the_known_optimizers():
    with pytest.raises(ValueError, match="optimizer='sgd'.*adamw"):
        TrainConfig(optimizer="sgd")
