"""Mixture-of-experts MLP in the DeepSeekMoE style (routed + shared experts, aux-loss-free balance).

A dense MLP runs one big SwiGLU on every token. An MoE layer holds many small SwiGLU
"experts" and a router that sends each token to only `experts_per_token` of them, so the
model has many parameters but each token pays for only a few (active parameters << total).

Two ideas from DeepSeekMoE (Dai et al., 2024) shape this layer:

- Fine-grained experts: many small experts (expert_hidden is a fraction of a dense MLP's
  hidden size) with several picked per token, instead of a few big ones with top-1 or
  top-2. More experts per token means many more possible combinations, so experts can
  specialise more sharply for the same compute.
- Shared experts: `n_shared_experts` experts that every token always uses. They learn the
  common knowledge every token needs (syntax, frequent words), so the routed experts do not
  each have to relearn it and can spend their capacity on specialities.

Load balancing: if the router sends most tokens to a few experts, the others never learn
and (on many chips) the busy ones become the bottleneck. Three options (`moe_balance`):

- "bias": the auxiliary-loss-free method of DeepSeek-V3 (Wang et al., 2024). Each expert has
  a bias that is added to its affinity *only when choosing* the top-k experts. After each
  training forward, overloaded experts get their bias lowered and underloaded ones raised.
  The gate weights ignore the bias, so balancing never fights the language-model loss
  through the gradient, which is what an auxiliary loss does.
- "aux_loss": the classic Switch/GShard/DeepSeek auxiliary loss, added to the training loss.
- "none": no balancing, to watch the router collapse.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tinylm.config import MOE_BALANCE_KINDS
from tinylm.layers import SwiGLU


class MoE(nn.Module):
    """Routed + shared SwiGLU experts with sigmoid top-k routing (DeepSeek-V3 style).

    Reads from `config` (a GPTConfig): n_embd, n_experts, n_shared_experts, experts_per_token,
    expert_hidden, moe_balance, moe_aux_loss_coef, moe_bias_update_rate.

    After every forward, `self.aux_loss` holds the balance loss (a 0 tensor unless
    moe_balance == "aux_loss") and `self.last_expert_counts` the number of tokens routed to
    each expert (LongTensor [n_experts]).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        n_experts, k = config.n_experts, config.experts_per_token
        if config.moe_balance not in MOE_BALANCE_KINDS:
            raise ValueError(
                f"moe_balance={config.moe_balance!r} is not known; use one of {MOE_BALANCE_KINDS}"
            )
        if not 1 <= k <= n_experts:
            raise ValueError(
                f"experts_per_token={k} must be between 1 and n_experts={n_experts}; "
                "lower experts_per_token or add experts"
            )
        if config.n_shared_experts < 0:
            raise ValueError(
                f"n_shared_experts={config.n_shared_experts} is negative; use 0 for none"
            )
        self.n_experts = n_experts
        self.experts_per_token = k
        self.balance = config.moe_balance
        self.aux_loss_coef = config.moe_aux_loss_coef
        self.bias_update_rate = config.moe_bias_update_rate

        self.router = nn.Linear(config.n_embd, n_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config.n_embd, config.expert_hidden) for _ in range(n_experts)
        )
        # n shared experts of width h are computed as one SwiGLU of width n*h: same
        # parameters and output as summing n separate ones, in a single matmul.
        self.shared = (
            SwiGLU(config.n_embd, config.n_shared_experts * config.expert_hidden)
            if config.n_shared_experts > 0
            else None
        )
        # Persistent buffer: it is learned state (by the balancing rule, not by gradients),
        # so checkpoints and resumed runs must carry it.
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        self.aux_loss = torch.zeros(())
        self.last_expert_counts = torch.zeros(n_experts, dtype=torch.long)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens x [N, C] -> (affinities [N, E], expert ids [N, k], gate weights [N, k])."""
        # Sigmoid affinities (DeepSeek-V3) rather than a softmax: each expert's score is
        # independent of the others, so adding a per-expert bias shifts selection cleanly.
        # Routing runs in float32 so that low-precision weights do not flip close choices.
        scores = torch.sigmoid(self.router(x).float())
        # The bias only steers *which* experts are chosen ...
        _, idx = torch.topk(scores + self.expert_bias, self.experts_per_token, dim=-1)
        # ... the gate weights are the unbiased affinities of the chosen, normalised to sum 1.
        gates = scores.gather(-1, idx)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        return scores, idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]: shared(x) + sum over the chosen k of gate * expert(x)."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        scores, idx, gates = self.route(x)
        k = self.experts_per_token

        # Dispatch: sort the N*k (token, expert) assignments by expert so that each expert
        # runs once, on exactly the tokens routed to it (never on every token). A stable sort
        # keeps tokens in order within each group, so results are deterministic.
        flat_expert = idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // k  # assignment j belongs to token j // k
        gate_of = gates.reshape(-1)[order].to(x.dtype)
        counts = torch.bincount(flat_expert, minlength=self.n_experts)

        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts.tolist(), strict=True):
            if n == 0:  # an expert with no tokens does no work (and gets no gradient)
                continue
            tokens = token_of[start : start + n]
            y = expert(x[tokens]) * gate_of[start : start + n, None]
            # Scatter back; no token is ever dropped. A token appears at most once per expert,
            # so a plain indexed add is exact (and, unlike index_add_, stays fast on a busy
            # multi-threaded CPU, where index_add_ was measured ~1000x slower here).
            out[tokens] += y
            start += n
        if self.shared is not None:
            out = out + self.shared(x)

        self.last_expert_counts = counts.detach()
        self.aux_loss = self._aux_loss(scores, counts)
        if self.balance == "bias" and self.training and torch.is_grad_enabled():
            self._update_bias(counts)
        return out.reshape(B, T, C)

    def _aux_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """coef * E * sum_i f_i * P_i; equals coef when load is uniform, up to coef * E / k."""
        if self.balance != "aux_loss":
            return torch.zeros((), device=scores.device)
        # f_i: fraction of routed assignments that went to expert i (no gradient: a count).
        f = counts.float() / counts.sum()
        # P_i: mean normalised affinity for expert i (differentiable). The loss is lowest
        # when the router spreads its probability mass evenly, which evens out f too.
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
        return self.aux_loss_coef * self.n_experts * (f * p).sum()

    @torch.no_grad()
    def _update_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing: bias_i += rate * sign(mean load - load_i)."""
        load = counts.float()
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
