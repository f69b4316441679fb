"""GPTConfig: the hyperparameters of a tinylm GPT, checked, and the kinds of layer it can use.

Everything here is plain Python (no torch), so the cost model (`tinylm.costs`) and the
quantisation code share one definition of the attention and MLP kinds and of what a KV
cache stores per token, without importing the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from tinylm.util import check_int, is_number

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
MLP_KINDS = ("dense", "moe")
MOE_BALANCE_KINDS = ("bias", "aux_loss", "none")
POSITION_KINDS = ("rope", "none")  # "none": no positional signal but the causal mask (NoPE)
NORM_PLACEMENTS = ("pre", "post")  # "post": the original Transformer's x = norm(x + f(x))


#: Named sizes of the same architecture (GPTConfig.preset). The big ones scale the default's
#: 1024-token vocabulary up to 8192 so that most weights sit in the blocks, as in real LLMs.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "100M": dict(vocab_size=8192, context_length=1024, n_layer=12, n_head=12, n_embd=768),
    "300M": dict(vocab_size=8192, context_length=1024, n_layer=24, n_head=16, n_embd=1024),
}


def _round_to_multiple(x: float, multiple: int = 8) -> int:
    """Round x to the nearest multiple (at least one multiple): friendlier matmul shapes."""
    return max(multiple, multiple * round(x / multiple))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    check_int(f"GPTConfig.{name}", value, minimum, fix="set it to one")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GPTConfig: unknown {name}={value!r}; choose one of {choices}.")


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT. Defaults give a ~1M-parameter model that trains on a CPU.

    Fields left as None are resolved in __post_init__ (so to_dict() holds the real sizes),
    but only for the kind in use: MLA sizes only for attention="mla", mlp_hidden only for
    mlp="dense", expert sizes only for mlp="moe". Fields of a kind not in use are ignored.
    """

    vocab_size: int = 1024
    context_length: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    # attention: "mha", "gqa" (n_kv_head K/V heads), "mqa" (one K/V head), "mla" (latent)
    attention: str = "mha"
    n_kv_head: int | None = None  # None -> n_head (mha, mla) or 1 (mqa); gqa must set it
    kv_lora_rank: int | None = None  # MLA latent width; None -> n_embd // 2
    q_lora_rank: int | None = None  # MLA query bottleneck; None = full-rank query
    rope_head_dim: int | None = None  # MLA decoupled RoPE width; None -> ~head_dim // 2 (even)
    # MLP: "dense" SwiGLU or "moe" (routed + shared SwiGLU experts, see tinylm.moe)
    mlp: str = "dense"
    mlp_hidden: int | None = None  # None -> 8/3 * n_embd rounded to a multiple of 8
    n_experts: int = 8
    n_shared_experts: int = 1
    experts_per_token: int = 2
    expert_hidden: int | None = None  # None -> dense hidden / (active experts per token)
    moe_balance: str = "bias"  # "bias" (DeepSeek-V3, aux-loss-free), "aux_loss", "none"
    moe_aux_loss_coef: float = 0.01
    moe_bias_update_rate: float = 1e-3
    # ablation switches (chapter 03): the defaults are the Llama layout every port assumes
    position: str = "rope"  # "rope", or "none": attention sees no positions (NoPE)
    norm_placement: str = "pre"  # "pre": x + f(norm(x)); "post": norm(x + f(x))
    # numerics
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1+'s RoPE frequency scaling ({"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}); None = plain RoPE
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            _check_int(name, getattr(self, name))
        _check_choice("attention", self.attention, ATTENTION_KINDS)
        _check_choice("mlp", self.mlp, MLP_KINDS)
        _check_choice("moe_balance", self.moe_balance, MOE_BALANCE_KINDS)
        _check_choice("position", self.position, POSITION_KINDS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_head={self.n_head} does not divide n_embd={self.n_embd} (each "
                f"head gets n_embd // n_head channels); use n_head in {_divisors(self.n_embd)} "
                "or change n_embd."
            )
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a number > 0, got {value!r}.")
        self._check_rope_scaling()
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"GPTConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}."
            )
        self._resolve_attention()
        self._resolve_mlp()

    def _check_rope_scaling(self) -> None:
        s = self.rope_scaling
        if s is None:
            return
        keys = {"rope_type", "factor", "low_freq_factor", "high_freq_factor"}
        keys.add("original_max_position_embeddings")
        if not isinstance(s, dict) or s.get("rope_type") != "llama3" or set(s) != keys:
            raise ValueError(
                f"GPTConfig.rope_scaling={s!r}: only Llama 3's scaling is implemented, a dict "
                f"with exactly the keys {sorted(keys)} and rope_type='llama3'; or use None."
            )
        for key in keys - {"rope_type"}:
            value = s[key]
            if not is_number(value) or value <= 0:
                raise ValueError(f"GPTConfig.rope_scaling[{key!r}] must be > 0, got {value!r}.")
        if s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ValueError(
                "GPTConfig.rope_scaling: high_freq_factor must exceed low_freq_factor (the "
                f"band between them is interpolated), got {s['high_freq_factor']} <= "
                f"{s['low_freq_factor']}."
            )

    def _resolve_attention(self) -> None:
        H, D = self.n_head, self.head_dim
        if self.attention == "mla":
            if self.n_kv_head not in (None, H):
                raise ValueError(
                    f"GPTConfig: attention='mla' has one key/value per query head, so n_kv_head "
                    f"must be None or n_head={H}, got {self.n_kv_head}; remove n_kv_head."
                )
            self.n_kv_head = H
            if self.kv_lora_rank is None:
                self.kv_lora_rank = max(1, self.n_embd // 2)
            if self.rope_head_dim is None:
                self.rope_head_dim = max(2, D // 4 * 2)
            _check_int("kv_lora_rank", self.kv_lora_rank)
            _check_int("rope_head_dim", self.rope_head_dim)
            if self.q_lora_rank is not None:
                _check_int("q_lora_rank", self.q_lora_rank)
            if self.rope_head_dim % 2:
                raise ValueError(
                    f"GPTConfig: rope_head_dim={self.rope_head_dim} is odd, but RoPE rotates "
                    "channel pairs; use an even rope_head_dim."
                )
            return
        if self.n_kv_head is None:
            if self.attention == "gqa":
                raise ValueError(
                    "GPTConfig: attention='gqa' needs n_kv_head (the number of key/value heads); "
                    f"set it to a divisor of n_head={H} below n_head, e.g. {max(1, H // 2)}."
                )
            self.n_kv_head = 1 if self.attention == "mqa" else H
        _check_int("n_kv_head", self.n_kv_head)
        if self.attention == "mha" and self.n_kv_head != H:
            raise ValueError(
                f"GPTConfig: attention='mha' means n_kv_head == n_head={H}, got n_kv_head="
                f"{self.n_kv_head}; use attention='gqa' for fewer key/value heads."
            )
        if self.attention == "mqa" and self.n_kv_head != 1:
            raise ValueError(
                f"GPTConfig: attention='mqa' means n_kv_head=1, got {self.n_kv_head}; "
                "use attention='gqa' for more than one key/value head."
            )
        if H % self.n_kv_head:
            raise ValueError(
                f"GPTConfig: n_kv_head={self.n_kv_head} does not divide n_head={H} (each key/"
                f"value head serves n_head // n_kv_head query heads); use one of {_divisors(H)}."
            )
        if D % 2:
            raise ValueError(
                f"GPTConfig: head_dim = n_embd // n_head = {D} is odd, but RoPE rotates channel "
                "pairs; choose n_embd and n_head so that n_embd // n_head is even."
            )

    def _resolve_mlp(self) -> None:
        dense_hidden = _round_to_multiple(8 * self.n_embd / 3)
        if self.mlp == "dense":
            if self.mlp_hidden is None:
                self.mlp_hidden = dense_hidden
            _check_int("mlp_hidden", self.mlp_hidden)
            return
        _check_int("n_experts", self.n_experts)
        _check_int("experts_per_token", self.experts_per_token)
        _check_int("n_shared_experts", self.n_shared_experts, minimum=0)
        if self.experts_per_token > self.n_experts:
            raise ValueError(
                f"GPTConfig: experts_per_token={self.experts_per_token} > n_experts="
                f"{self.n_experts}: a token cannot use more experts than exist; lower "
                "experts_per_token or raise n_experts."
            )
        if self.expert_hidden is None:
            # Fine-grained experts: the experts a token runs add up to about one dense MLP,
            # so an MoE costs about the same FLOPs per token as the dense model it replaces.
            active = self.experts_per_token + self.n_shared_experts
            self.expert_hidden = _round_to_multiple(dense_hidden / active)
        _check_int("expert_hidden", self.expert_hidden)
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"GPTConfig.{name} must be a number >= 0, got {value!r}.")

    @property
    def head_dim(self) -> int:
        """Channels per attention head (for MLA: the non-RoPE query/key part and the value)."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of all fields (resolved sizes included)."""
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named size of the same GPT: "default" (~1M), "100M" or "300M" parameters.

        The big presets exist to time decoding on models that do not fit a CPU's caches
        (nobody trains them here: random weights time the same). GPT(config) checks that the
        float32 weights fit in RAM before allocating them. overrides: any other field.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """Build a config from `to_dict()` output; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"GPTConfig.from_dict: unknown key(s) {unknown}; known keys are {sorted(known)}. "
                "Fix the spelling or remove them (was the config written by another version?)."
            )
        return cls(**d)


def kv_vectors_per_token(shape: Any) -> tuple[int, int]:
    """(vectors, width): what a KV cache stores per token over all layers.

    MHA/GQA/MQA: a key and a value per K/V head and layer, 2 * n_layer * n_kv_head vectors of
    head_dim numbers; MLA: one latent plus the shared RoPE key per layer, n_layer vectors of
    kv_lora_rank + rope_head_dim numbers. `shape` is a GPTConfig or a tinylm.costs.ModelShape
    (both name these fields alike). Bytes follow from the storage format, e.g. elements *
    bytes per element, or (width + 2) bytes per vector for int8 codes with an fp16 scale.
    """
    if shape.attention == "mla":
        return shape.n_layer, shape.kv_lora_rank + shape.rope_head_dim
    return 2 * shape.n_layer * shape.n_kv_head, shape.head_dim
