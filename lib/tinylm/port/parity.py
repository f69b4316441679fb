"""Layer-by-layer parity between the PyTorch model and a port, with a vendor-style verdict.

    report = compare(model, NumpyLM.from_model(model), prompts, val_tokens=..., bytes_per_token=...)
    report                       # a table in a notebook (also str(report) as text)
    report.first_failure()       # e.g. "layers.2.attn", or None when the port passes

A port is trusted when its numbers match, and when they do not, the question is *where*
they start to differ. So the reference (a tinylm GPT, whose activations are collected with
forward hooks) and the port run the same prompts and every named activation is compared:
embed, then per layer attn_norm / attn / mlp_norm / mlp / the block output, then norm and
logits (the names of `tinylm.port.numpy_runtime.activation_names`). Errors propagate
downstream, so the first layer that fails is where to look.

Per activation: max absolute error, max relative error, relative L2 error, cosine
similarity; on the logits also the KL divergence of the next-token distributions. End to
end: top-1 agreement of the next-token predictions, greedy-decoding agreement, and the
change in bits per byte on validation tokens.

The verdict rules. Accelerator vendors publish acceptance thresholds for exactly this kind
of comparison. Huawei's Ascend CANN documentation (PyTorch accuracy comparison, "computation
accuracy evaluation indicators", CANN 7.0.0) gives as acceptable a cosine similarity above
0.99 and a maximum absolute error below 0.001:
https://www.hiascend.com/doc_center/source/zh/canncommercial/700/modeldevpt/ptmigr/AImpug_000197.html
(MindStudio's Model Accuracy Analyzer docs give the same cosine threshold, plus relative
Euclidean distance < 0.05 and KL < 0.005:
https://www.hiascend.com/document/detail/en/mindstudio/700/TITools/ModelAccuracyAnalyzer/atlasaccuracy_16_0045.html).
`VENDOR_RULE` requires both cosine and max abs. The vendor's comparison tool applies the same
two thresholds the other way round: `CANN_TOOL_RULE` is the verdict column ("Accuracy Reached
or Not") of Ascend's accuracy tool msprobe (`check_accuracy` in
debug/accuracy_tools/msprobe/core/compare/multiprocessing_compute.py of
https://gitee.com/ascend/mstt), which flags a tensor only when *both* thresholds miss
(cosine < 0.99 and max abs > 0.001), or when one misses badly (cosine < 0.9 or max abs > 1).

Those thresholds are meant for ports that change precision (fp16/bf16 kernels), and the
absolute one silently assumes activations of order 1: on a freshly initialised tinylm
(activations ~0.01) a wrong RoPE convention stays below 1e-3 in the layer that has it, and
on activations of order 10 a correct float32 port already differs by 1e-5. A float32 port of
float32 weights runs the same arithmetic in another order, so it must agree to float32
rounding whatever the scale: `FP32_RULE` asks for a relative L2 error below 1e-5 (correct
ports measure 1e-7..2e-6; one layer in fp16 measures ~4e-4), which is what catches the
subtle bugs the vendor rule lets through.
"""

from __future__ import annotations

import copy
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinylm.port.numpy_runtime import NumpyLM, activation_names

# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A pass/fail rule for one compared tensor; every threshold that is set must hold.

    min_cosine: cosine similarity must exceed it. max_abs: max |port - ref| must stay below.
    max_rel_l2: ||port - ref|| / ||ref|| must stay below (scale-free, unlike max_abs).
    """

    name: str
    min_cosine: float | None = None
    max_abs: float | None = None
    max_rel_l2: float | None = None
    source: str = ""

    def passes(self, cosine: float, max_abs: float, rel_l2: float) -> bool:
        return (
            (self.min_cosine is None or cosine > self.min_cosine)
            and (self.max_abs is None or max_abs < self.max_abs)
            and (self.max_rel_l2 is None or rel_l2 < self.max_rel_l2)
        )

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"cosine > {self.min_cosine:g}")
        if self.max_abs is not None:
            parts.append(f"max abs error < {self.max_abs:g}")
        if self.max_rel_l2 is not None:
            parts.append(f"relative L2 error < {self.max_rel_l2:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class FlagRule(Rule):
    """A rule in the style of a comparison tool's verdict column: a tensor *fails* only when
    both min_cosine and max_abs miss, or when either misses its hard limit (hard_min_cosine,
    hard_max_abs). Looser than `Rule`, which fails a tensor as soon as one threshold misses."""

    hard_min_cosine: float = 0.9
    hard_max_abs: float = 1.0

    def passes(self, cosine: float, max_abs: float, rel_l2: float) -> bool:
        if cosine < self.min_cosine and max_abs > self.max_abs:
            return False
        return not (cosine < self.hard_min_cosine or max_abs > self.hard_max_abs)

    def describe(self) -> str:
        return (
            f"flagged only if cosine < {self.min_cosine:g} and max abs error > {self.max_abs:g}, "
            f"or cosine < {self.hard_min_cosine:g}, or max abs error > {self.hard_max_abs:g}"
        )


VENDOR_RULE = Rule(
    "vendor",
    min_cosine=0.99,
    max_abs=1e-3,
    source="Huawei Ascend CANN 7.0.0, PyTorch accuracy comparison, computation accuracy "
    "evaluation indicators: https://www.hiascend.com/doc_center/source/zh/canncommercial/700/"
    "modeldevpt/ptmigr/AImpug_000197.html",
)
CANN_TOOL_RULE = FlagRule(
    "CANN tool",
    min_cosine=0.99,
    max_abs=1e-3,
    hard_min_cosine=0.9,
    hard_max_abs=1.0,
    source="Huawei Ascend msprobe accuracy comparison, check_accuracy() in "
    "debug/accuracy_tools/msprobe/core/compare/multiprocessing_compute.py "
    "(https://gitee.com/ascend/mstt): No when cos < 0.99 and max abs > 0.001, or cos < 0.9, "
    "or max abs > 1",
)
FP32_RULE = Rule(
    "fp32",
    max_rel_l2=1e-5,
    source="tinylm: a float32 port of float32 weights differs from the reference only by float32 "
    "rounding (relative error ~1e-7..1e-6); half precision anywhere gives ~1e-4 or more",
)


# ----------------------------------------------------------------------------- metrics


def max_abs_error(ref: np.ndarray, port: np.ndarray) -> float:
    """max |port - ref| (inf if shapes differ or anything is not finite)."""
    d = np.abs(port.astype(np.float64) - ref.astype(np.float64))
    return float(d.max()) if d.size and np.isfinite(d).all() else math.inf


def max_rel_error(ref: np.ndarray, port: np.ndarray, floor: float = 1e-6) -> float:
    """max |port - ref| / max(|ref|, floor): the floor keeps zeros in ref from giving inf.

    Informational only (no rule uses it): elements of ref near zero make it large even
    when the port is fine, which is why vendors judge by cosine and absolute error.
    """
    r = ref.astype(np.float64)
    d = np.abs(port.astype(np.float64) - r) / np.maximum(np.abs(r), floor)
    return float(d.max()) if d.size and np.isfinite(d).all() else math.inf


def relative_l2_error(ref: np.ndarray, port: np.ndarray) -> float:
    """||port - ref|| / ||ref|| over the flattened tensors (Ascend's RelativeEuclideanDistance).

    Scale-free: it reads the same for activations of size 0.01 and 10, where an absolute
    threshold is too lax for the first and too strict for the second.
    """
    a, b = ref.astype(np.float64).ravel(), port.astype(np.float64).ravel()
    if not np.isfinite(b).all():
        return math.inf
    norm = np.linalg.norm(a)
    diff = np.linalg.norm(b - a)
    return float(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


def cosine_similarity(ref: np.ndarray, port: np.ndarray) -> float:
    """Cosine of the angle between the flattened tensors (1 for two all-zero tensors)."""
    a, b = ref.astype(np.float64).ravel(), port.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return -math.inf  # NaN/inf in a port is the worst possible outcome: fail every rule
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, port_logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_port) in nats for each position of logits [..., V] -> [...]."""
    lp, lq = _log_softmax(ref_logits), _log_softmax(port_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


# ----------------------------------------------------------------------------- the reference


def _is_torch_model(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and hasattr(obj, "config")


class TorchReference:
    """A tinylm GPT (PyTorch) behind the port interface: logits, trace, generate.

    trace() collects activations with forward hooks on the modules that produce them, under
    the names the ports use, so any port can be compared with the model it came from.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config.to_dict()

    def _modules(self) -> dict[str, Any]:
        m = self.model
        named = {"embed": m.tok_emb}
        for i, block in enumerate(m.blocks):
            for part in ("attn_norm", "attn", "mlp_norm", "mlp"):
                named[f"layers.{i}.{part}"] = getattr(block, part)
            named[f"layers.{i}"] = block
        named["norm"], named["logits"] = m.norm, m.lm_head
        return named

    def logits(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        out = self.trace(ids)["logits"]
        return out[0] if arr.ndim == 1 else out

    def trace(self, ids: Any) -> dict[str, np.ndarray]:
        import torch

        acts: dict[str, np.ndarray] = {}

        def hook(name: str) -> Callable:
            def record(module: Any, inputs: Any, output: Any) -> None:
                acts[name] = output.detach().float().cpu().numpy()

            return record

        handles = [mod.register_forward_hook(hook(n)) for n, mod in self._modules().items()]
        was_training = self.model.training
        self.model.eval()
        try:
            arr = np.asarray(ids, dtype=np.int64)
            device = next(self.model.parameters()).device
            x = torch.as_tensor(arr.reshape(-1, arr.shape[-1]), device=device)
            with torch.inference_mode():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        return acts

    def generate(self, prompt_ids: Any, max_new_tokens: int, **kw: Any) -> list:
        from tinylm.generate import generate

        return generate(self.model, prompt_ids, max_new_tokens, **kw)


def _as_port(obj: Any) -> Any:
    """Torch models get wrapped; anything else must already look like a port."""
    if _is_torch_model(obj) and not hasattr(obj, "logits"):
        return TorchReference(obj)
    if not callable(getattr(obj, "logits", None)):
        raise TypeError(
            f"{type(obj).__name__} is neither a tinylm GPT nor a port: a port needs a "
            "logits(ids) method (and optionally trace(ids) and generate(...))."
        )
    return obj


def _can_trace(port: Any) -> bool:
    """Whether a port exposes its activations (an OnnxLM only if exported with them)."""
    return callable(getattr(port, "trace", None)) and getattr(port, "has_activations", True)


def _greedy(port: Any, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens: the port's own generate() if it has one, else recompute logits."""
    if callable(getattr(port, "generate", None)):
        return list(port.generate(prompt, n, temperature=0))
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.asarray(port.logits(seq))[-1].argmax()))
    return seq[len(prompt) :]


def _port_name(port: Any) -> str:
    name = type(port).__name__
    if isinstance(port, TorchReference):
        return f"{type(port.model).__name__} (PyTorch)"
    fault = getattr(port, "fault", None)
    return f"{name} [broken: {fault}]" if fault else name


# ----------------------------------------------------------------------------- the report


@dataclass
class LayerResult:
    """The comparison of one named activation, aggregated over all prompts (worst case)."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    verdicts: dict[str, bool]
    kl_mean: float | None = None  # logits only


@dataclass
class ParityReport:
    """The result of `compare`: per-layer rows, end-to-end agreement and a verdict per rule."""

    reference: str
    port: str
    n_prompts: int
    layers: list[LayerResult]
    rules: tuple[Rule, ...]
    kl_mean: float
    kl_max: float
    top1_agreement: float
    greedy_tokens: int
    greedy_prefix_agreement: float | None  # mean fraction of tokens before the first divergence
    greedy_identical: float | None  # fraction of prompts with identical continuations
    bpb_reference: float | None = None
    bpb_port: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bpb_diff(self) -> float | None:
        """Bits per byte of the port minus the reference's (positive = the port is worse)."""
        if self.bpb_reference is None or self.bpb_port is None:
            return None
        return self.bpb_port - self.bpb_reference

    def _rule(self, rule: Rule | str | None) -> Rule:
        if rule is None:
            return self.rules[0]
        name = rule.name if isinstance(rule, Rule) else rule
        for r in self.rules:
            if r.name == name:
                return r
        raise ValueError(
            f"rule {name!r} was not evaluated; choose from {[r.name for r in self.rules]}."
        )

    def first_failure(self, rule: Rule | str | None = None) -> str | None:
        """Name of the first activation (in execution order) that fails `rule` (default: the
        first rule given to compare, the vendor rule), or None if every layer passes."""
        r = self._rule(rule)
        return next((lr.name for lr in self.layers if not lr.verdicts[r.name]), None)

    def passed(self, rule: Rule | str | None = None) -> bool:
        """True when every compared activation passes `rule`."""
        return self.first_failure(rule) is None

    # ------------------------------------------------------------------ rendering

    def _summary_lines(self) -> list[str]:
        lines = []
        for r in self.rules:
            bad = self.first_failure(r)
            lines.append(
                f"{r.name} rule ({r.describe()}): "
                + ("PASS" if bad is None else f"FAIL, first failing layer: {bad}")
            )
        lines.append(
            f"next-token distribution: KL mean {self.kl_mean:.3g} nats, max {self.kl_max:.3g}; "
            f"top-1 agreement {100 * self.top1_agreement:.2f}%"
        )
        if self.greedy_prefix_agreement is not None:
            lines.append(
                f"greedy decoding ({self.greedy_tokens} tokens per prompt): "
                f"{100 * self.greedy_prefix_agreement:.1f}% of tokens before the first "
                f"divergence, {100 * self.greedy_identical:.1f}% of prompts identical"
            )
        if self.bpb_diff is not None:
            lines.append(
                f"bits per byte: reference {self.bpb_reference:.4f}, port {self.bpb_port:.4f}, "
                f"difference {self.bpb_diff:+.2e}"
            )
        return lines + self.notes

    def _columns(self) -> list[str]:
        return ["layer", "shape", "max abs", "max rel", "rel L2", "cosine"] + [
            r.name for r in self.rules
        ]

    def to_text(self) -> str:
        """The report as a plain-text table (the first rule's first failing row is named below)."""
        head = f"Parity: {self.port} vs {self.reference}, {self.n_prompts} prompts"
        cols = self._columns()
        rows = [
            [
                lr.name,
                "x".join(map(str, lr.shape)),
                f"{lr.max_abs:.2e}",
                f"{lr.max_rel:.2e}",
                f"{lr.rel_l2:.2e}",
                f"{lr.cosine:.8f}",
                *["ok" if lr.verdicts[r.name] else "FAIL" for r in self.rules],
            ]
            for lr in self.layers
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=True)]
        fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True))
        table = [fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, rows)]
        return "\n".join([head, *table, "", *self._summary_lines()])

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        esc = html.escape
        first = self.first_failure()
        head = "".join(f"<th>{esc(c)}</th>" for c in self._columns())
        body = []
        for lr in self.layers:
            style = ' style="background:#fde2e1;font-weight:bold"' if lr.name == first else ""
            cells = [
                esc(lr.name),
                "&times;".join(map(str, lr.shape)),
                f"{lr.max_abs:.2e}",
                f"{lr.max_rel:.2e}",
                f"{lr.rel_l2:.2e}",
                f"{lr.cosine:.8f}",
            ]
            verdicts = [
                '<td style="color:#137333">ok</td>'
                if lr.verdicts[r.name]
                else '<td style="color:#c5221f;font-weight:bold">FAIL</td>'
                for r in self.rules
            ]
            body.append(
                f"<tr{style}>"
                + "".join(f"<td>{c}</td>" for c in cells)
                + "".join(verdicts)
                + "</tr>"
            )
        summary = "".join(f"<li>{esc(line)}</li>" for line in self._summary_lines())
        return (
            f"<div><b>Parity: {esc(self.port)} vs {esc(self.reference)}, {self.n_prompts} prompts"
            f"</b><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<ul>{summary}</ul></div>"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (for meta.json or a CI log)."""
        return {
            "reference": self.reference,
            "port": self.port,
            "n_prompts": self.n_prompts,
            "passed": {r.name: self.passed(r) for r in self.rules},
            "first_failure": {r.name: self.first_failure(r) for r in self.rules},
            "kl_mean": self.kl_mean,
            "kl_max": self.kl_max,
            "top1_agreement": self.top1_agreement,
            "greedy_prefix_agreement": self.greedy_prefix_agreement,
            "greedy_identical": self.greedy_identical,
            "bpb_reference": self.bpb_reference,
            "bpb_port": self.bpb_port,
            "layers": [
                {k: v for k, v in vars(lr).items() if k != "shape"} | {"shape": list(lr.shape)}
                for lr in self.layers
            ],
        }


# ----------------------------------------------------------------------------- compare


def _bits_per_byte(
    port: Any, tokens: np.ndarray, bytes_per_token: float, context: int, max_tokens: int
) -> float:
    """Mean next-token loss over non-overlapping context windows, as bits per byte."""
    tokens = tokens[: max_tokens + 1]
    n_windows = max(1, (len(tokens) - 1) // context)
    nll, count = 0.0, 0
    for w in range(n_windows):
        window = tokens[w * context : (w + 1) * context + 1]
        if len(window) < 2:
            break
        logp = _log_softmax(np.asarray(port.logits(window[:-1])))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return nll / count / math.log(2) / bytes_per_token


def compare(
    reference: Any,
    port: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    rules: Sequence[Rule] = (VENDOR_RULE, FP32_RULE, CANN_TOOL_RULE),
    greedy_tokens: int = 16,
    val_tokens: Any = None,
    bytes_per_token: float | None = None,
    max_eval_tokens: int = 4096,
) -> ParityReport:
    """Run reference and port on the same prompts and compare them layer by layer.

    reference: a tinylm GPT (activations via forward hooks) or any port. port: anything with
        `logits(ids)`; with `trace(ids) -> {name: activation}` (NumpyLM, OnnxLM exported with
        activations=True) every layer is compared, otherwise the logits only; with
        `generate(...)` greedy decoding uses it (the KV-cache path), else logits recompute.
    prompts: token-id sequences (any lengths, each run alone, batch 1).
    rules: verdicts to evaluate; the first one decides `passed()` / `first_failure()`.
    greedy_tokens: greedy continuation length per prompt (0 skips it; capped by the context).
    val_tokens, bytes_per_token: validation tokens (e.g. TokenSplits.val and
        .val_bytes_per_token) to measure bits per byte of both; up to max_eval_tokens.
    """
    ref, prt = _as_port(reference), _as_port(port)
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    if not prompts or any(p.size == 0 for p in prompts):
        raise ValueError("give at least one non-empty prompt (a list of token ids).")
    if not rules:
        raise ValueError("give at least one Rule (e.g. VENDOR_RULE).")
    if val_tokens is not None and bytes_per_token is None:
        raise ValueError(
            "val_tokens needs bytes_per_token to turn the loss into bits per byte; pass "
            "e.g. splits.val_bytes_per_token from tinylm.data.prepare_tokens."
        )
    config = ref.config if isinstance(ref.config, dict) else ref.config.to_dict()

    stats, kl_all, top1 = _compare_activations(ref, prt, prompts, config["n_layer"])
    layers = [
        LayerResult(
            name,
            s.shape,
            s.max_abs,
            s.max_rel,
            s.rel_l2,
            s.cosine,
            {r.name: r.passes(s.cosine, s.max_abs, s.rel_l2) for r in rules},
            float(kl_all.mean()) if name == "logits" else None,
        )
        for name, s in stats.items()
    ]
    notes: list[str] = []
    n_new, prefix, identical = _greedy_agreement(
        ref, prt, prompts, greedy_tokens, config["context_length"], notes
    )
    if not (_can_trace(prt) and _can_trace(ref)):
        notes.append("no trace() on one side (see OnnxLM activations=True): logits compared only.")
    bpb_ref = bpb_port = None
    if val_tokens is not None:
        toks = np.asarray(val_tokens, dtype=np.int64).reshape(-1)
        ctx = config["context_length"]
        bpb_ref = _bits_per_byte(ref, toks, bytes_per_token, ctx, max_eval_tokens)
        bpb_port = _bits_per_byte(prt, toks, bytes_per_token, ctx, max_eval_tokens)

    return ParityReport(
        reference=_port_name(ref),
        port=_port_name(prt),
        n_prompts=len(prompts),
        layers=layers,
        rules=tuple(rules),
        kl_mean=float(kl_all.mean()),
        kl_max=float(kl_all.max()),
        top1_agreement=float(top1.mean()),
        greedy_tokens=n_new,
        greedy_prefix_agreement=prefix,
        greedy_identical=identical,
        bpb_reference=bpb_ref,
        bpb_port=bpb_port,
        notes=notes,
    )


@dataclass
class ErrorStats:
    """How far a port's activation is from the reference's: the worst case over prompts."""

    shape: tuple[int, ...]
    max_abs: float = 0.0
    max_rel: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0

    def update(self, ref: np.ndarray, port: np.ndarray) -> None:
        """Fold in one prompt's pair of activations (keeping the worst of each measure)."""
        self.max_abs = max(self.max_abs, max_abs_error(ref, port))
        self.max_rel = max(self.max_rel, max_rel_error(ref, port))
        self.rel_l2 = max(self.rel_l2, relative_l2_error(ref, port))
        self.cosine = min(self.cosine, cosine_similarity(ref, port))
        if ref.size > np.prod(self.shape):  # report the largest shape seen
            self.shape = tuple(int(d) for d in ref.shape)


def _compare_activations(
    ref: Any, prt: Any, prompts: list[np.ndarray], n_layer: int
) -> tuple[dict[str, ErrorStats], np.ndarray, np.ndarray]:
    """Per named activation the worst-case errors; per position the KL and top-1 agreement."""
    stats: dict[str, ErrorStats] = {}
    kls: list[np.ndarray] = []
    top1: list[np.ndarray] = []
    for p in prompts:
        ref_acts = ref.trace(p) if _can_trace(ref) else {"logits": np.asarray(ref.logits(p))[None]}
        port_acts = prt.trace(p) if _can_trace(prt) else {"logits": np.asarray(prt.logits(p))[None]}
        for name in activation_names(n_layer):
            if name not in ref_acts or name not in port_acts:
                continue
            a, b = np.asarray(ref_acts[name]), np.asarray(port_acts[name])
            if a.shape != b.shape:
                raise ValueError(
                    f"activation {name!r}: reference shape {a.shape} but port shape {b.shape}; "
                    "the port computes a different function (check its config)."
                )
            stats.setdefault(name, ErrorStats(tuple(int(d) for d in a.shape))).update(a, b)
        ref_logits, port_logits = ref_acts["logits"][0], np.asarray(port_acts["logits"])[0]
        kls.append(kl_divergence(ref_logits, port_logits))
        top1.append(ref_logits.argmax(-1) == port_logits.argmax(-1))
    return stats, np.concatenate(kls), np.concatenate(top1)


def _greedy_agreement(
    ref: Any, prt: Any, prompts: list[np.ndarray], greedy_tokens: int, ctx: int, notes: list[str]
) -> tuple[int, float | None, float | None]:
    """(tokens decoded, mean fraction before the first divergence, fraction identical)."""
    if greedy_tokens <= 0:
        return 0, None, None
    n_new = min(greedy_tokens, ctx - max(p.size for p in prompts))
    if n_new <= 0:
        notes.append("greedy decoding skipped: the longest prompt fills the context.")
        return n_new, None, None
    fractions = []
    for p in prompts:
        a, b = _greedy(ref, p.tolist(), n_new), _greedy(prt, p.tolist(), n_new)
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), n_new)
        fractions.append(same / n_new)
    return n_new, float(np.mean(fractions)), float(np.mean([f == 1.0 for f in fractions]))


# ----------------------------------------------------------------------------- broken ports


def rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE with the *other* pairing convention: channels (2i, 2i+1) instead of (i, i + d/2).

    GPT-J and Meta's original Llama code rotate adjacent pairs; Hugging Face / tinylm rotate
    the two halves. Both are valid RoPE, but weights trained with one give wrong attention
    under the other: the classic bug of porting Llama checkpoints between codebases. It is
    invisible at position 0 (no rotation) and grows with the position.
    """
    half = cos.shape[-1] // 2
    c = np.repeat(cos[:, :half], 2, axis=-1)  # frequency i for both channels of pair i
    s = np.repeat(sin[:, :half], 2, axis=-1)
    rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * c + rotated * s


class _HalfPrecision:
    """Run a layer's MLP in float16 (inputs, hidden and output rounded to fp16).

    A stand-in for a kernel that computes in half precision: values above 65504 overflow to
    inf, and everything else loses ~3 decimal digits. That is within the vendor rule on
    typical activations but far outside float32 parity.
    """

    def __init__(self, mlp: Any) -> None:
        self.mlp = mlp

    def __call__(self, x: np.ndarray) -> np.ndarray:
        half = lambda a: a.astype(np.float16).astype(np.float32)
        with np.errstate(over="ignore"):
            return half(self.mlp(half(x)))


class _GeluMlp:
    """A layer's SwiGLU with GELU (tanh approximation) where SiLU belongs: the bug of reading
    a config's `hidden_act` wrong. GELU and SiLU are close curves (both ~x for large x, ~0 for
    very negative x), so the error is moderate: cosine ~0.9-0.99 on the MLP output."""

    def __init__(self, mlp: Any) -> None:
        self.mlp = mlp

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gate, up = np.split(self.mlp.gate_up(x), 2, axis=-1)
        inner = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)
        gelu = 0.5 * gate * (1 + np.tanh(inner))
        return self.mlp.down(gelu.astype(gate.dtype) * up)


FAULTS = ("rope_interleaved", "fp16_mlp", "gelu_mlp")


def make_broken_port(
    port_or_model: Any, fault: str = "rope_interleaved", layer: int = 1
) -> NumpyLM:
    """A NumpyLM with one deliberate porting bug in one layer, to watch `compare` find it.

    port_or_model: a NumpyLM (left untouched: the broken one is a copy) or a tinylm GPT.
    fault: "rope_interleaved" (the wrong RoPE pairing convention in layer `layer`'s
        attention; the first failing activation is layers.{layer}.attn) or "fp16_mlp"
        (layer `layer`'s MLP in half precision; caught by FP32_RULE at layers.{layer}.mlp)
        or "gelu_mlp" (GELU instead of SiLU in layer `layer`'s dense MLP).
    """
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {FAULTS}.")
    base = (
        port_or_model if isinstance(port_or_model, NumpyLM) else NumpyLM.from_model(port_or_model)
    )
    n_layer = base.config["n_layer"]
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer={layer} is out of range for a model with {n_layer} layers.")
    broken = copy.copy(base)  # shares the weights; only the lists below are new
    broken.rope_fns = list(base.rope_fns)
    broken.blocks = list(base.blocks)
    if fault == "rope_interleaved":
        broken.rope_fns[layer] = rope_interleaved
    else:
        block = copy.copy(base.blocks[layer])
        if fault == "gelu_mlp" and not hasattr(block.mlp, "gate_up"):
            raise ValueError(
                f"fault 'gelu_mlp' needs a dense SwiGLU MLP in layer {layer}; this layer has "
                f"{type(block.mlp).__name__}. Pick a dense layer or another fault."
            )
        block.mlp = _GeluMlp(block.mlp) if fault == "gelu_mlp" else _HalfPrecision(block.mlp)
        broken.blocks[layer] = block
    broken.fault = f"{fault} in layer {layer}"
    return broken


__all__ = [
    "CANN_TOOL_RULE",
    "FP32_RULE",
    "FlagRule",
    "VENDOR_RULE",
    "LayerResult",
    "ParityReport",
    "Rule",
    "TorchReference",
    "compare",
    "cosine_similarity",
    "kl_divergence",
    "relative_l2_error",
    "make_broken_port",
    "max_abs_error",
    "max_rel_error",
    "rope_interleaved",
]
