"""Train a tinylm GPT: AdamW or Muon, warm-up + cosine schedule, clipping, bits-per-byte evaluation.

The loop is the classic nanoGPT one, written to be read:

    for each step:
        lr    = lr_at(step, config)                 # warm-up, then cosine decay to min_lr
        x, y  = a random batch of windows           # from a generator seeded by config.seed
        training_step(model, optimizer, x, y, lr, config.grad_clip):
            loss = cross_entropy(model(x), y) + model.aux_loss()
            loss.backward(); clip the gradient norm; optimizer.step()
        every eval_interval steps: bits per byte on fixed validation windows
        every checkpoint_interval steps: a resumable checkpoint

`training_step` is that one update; `train` adds the bookkeeping around it (records,
evaluation, checkpoints, the progress bar, resuming, stopping on NaN).

Everything that decides the result is seeded and saved in checkpoints (weights, optimizer
moments, the batch generator's state), so a run that is stopped and resumed ends with
exactly the same weights as one that ran straight through.

Named recipes and `load_or_train` (the trained models later chapters start from) live in
`tinylm.recipes`; `LivePlot`, the live loss plot, in `tinylm.course.plots`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tinylm import checkpoint as ckpt
from tinylm.course.plots import LivePlot  # noqa: F401  (re-exported: train(..., callback=LivePlot()))
from tinylm.data import EOT, bits_per_byte, get_batch
from tinylm.device import pick_device
from tinylm.optim import MuonWithAdamW, embedding_tables, hidden_matrices
from tinylm.util import in_notebook

# --------------------------------------------------------------------------- configuration

OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (validated on creation; JSON-safe via to_dict)."""

    steps: int = 1000  # optimizer updates; the schedule spans exactly this many
    batch_size: int = 16  # sequences per step
    block_size: int | None = None  # tokens per sequence; None: the model's context_length
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-4  # the cosine decay ends here at the last step
    warmup_steps: int = 50  # linear warm-up from lr/warmup_steps to lr
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only, never on norms or biases
    embedding_lr_scale: float = 1.0  # the token embedding's lr is lr x this (make_optimizer)
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the hidden matrices (tinylm.optim)
    beta1: float = 0.9
    beta2: float = 0.95  # < 0.999: adapts faster, the usual choice for small fast LM runs
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    eval_interval: int = 100  # evaluate every this many steps (and at the last step)
    eval_batches: int = 8  # fixed validation windows per evaluation: eval_batches * eval_batch_size
    eval_batch_size: int | None = None  # None: batch_size
    checkpoint_interval: int | None = (
        None  # save every this many steps when checkpoint_dir is given
    )
    seed: int = 0  # seeds batch sampling and the evaluation windows (not the model's init)
    device: str | None = None  # None: tinylm.device.pick_device() ($TINYLM_DEVICE, else the best)

    def __post_init__(self) -> None:
        def need(ok: bool, problem: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {problem}; {fix}")

        need(self.steps >= 1, f"steps={self.steps} must be at least 1", "train for 1 or more steps")
        need(
            self.batch_size >= 1,
            f"batch_size={self.batch_size} must be at least 1",
            "use 1 or more",
        )
        need(
            self.block_size is None or self.block_size >= 1,
            f"block_size={self.block_size} must be positive",
            "use None for the model's context length",
        )
        need(self.lr > 0, f"lr={self.lr} must be positive", "a small model trains well near 1e-3")
        need(
            0 <= self.min_lr <= self.lr,
            f"min_lr={self.min_lr} must be between 0 and lr={self.lr}",
            "use about lr/10",
        )
        need(
            0 <= self.warmup_steps <= self.steps,
            f"warmup_steps={self.warmup_steps} must be between 0 and steps={self.steps}",
            "use a few percent of steps",
        )
        need(
            self.weight_decay >= 0, f"weight_decay={self.weight_decay} is negative", "use 0 or more"
        )
        need(
            math.isfinite(self.embedding_lr_scale) and self.embedding_lr_scale > 0,
            f"embedding_lr_scale={self.embedding_lr_scale} must be a positive number",
            "use 1.0 for the same lr as every other weight",
        )
        need(
            self.optimizer in OPTIMIZERS,
            f"optimizer={self.optimizer!r} is not one of {OPTIMIZERS}",
            'use "adamw" or "muon"',
        )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            need(0 <= value < 1, f"{name}={value} must be in [0, 1)", "use 0.9 and 0.95")
        need(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip={self.grad_clip} must be positive",
            "use None to turn clipping off",
        )
        need(
            self.eval_interval >= 1,
            f"eval_interval={self.eval_interval} must be at least 1",
            "use 1 or more",
        )
        need(
            self.eval_batches >= 1,
            f"eval_batches={self.eval_batches} must be at least 1",
            "use 1 or more",
        )
        need(
            self.eval_batch_size is None or self.eval_batch_size >= 1,
            f"eval_batch_size={self.eval_batch_size} must be positive",
            "use None for batch_size",
        )
        need(
            self.checkpoint_interval is None or self.checkpoint_interval >= 1,
            f"checkpoint_interval={self.checkpoint_interval} must be positive",
            "use None to save only at the end",
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-safe dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build a TrainConfig from to_dict() output; unknown keys are an error (not ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"TrainConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)} "
                "(was this saved by another version of tinylm?)"
            )
        return cls(**d)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for update `step` (0-based): linear warm-up, then cosine decay to min_lr.

    Warm-up: the first updates use a small lr because Adam's moment estimates start from
    nothing and early gradients are large; the cosine decay then lowers the lr smoothly so
    the last steps settle into a minimum instead of bouncing around it. The last step
    (steps - 1) uses exactly min_lr.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = config.steps - 1 - config.warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer config.optimizer names, over up to four groups of parameters.

    - Muon's matrices ("muon" only): the linear layers inside the model (attention, MLP,
      router), tinylm.optim.hidden_matrices;
    - the other matrices (the output head; with "adamw" also the ones above): decayed;
    - the token embedding, if untied (tinylm.optim.embedding_tables): its group's
      "lr_scale" is config.embedding_lr_scale, which training_step multiplies the
      schedule's lr by. Not decayed: decay at a 30x lr would shrink the table 30x faster
      (default recipe: 1.17x the floor with decay vs 1.15x without, one run each);
    - the 1-D tensors (norm gains, biases): not decayed, which on a gain would fight the
      normalisation and on a bias only add noise.

    "adamw": torch.optim.AdamW for every group. "muon": tinylm.optim.MuonWithAdamW, AdamW
    for the groups that are not Muon's. parameters() lists a tied weight once, so it is
    updated once; empty groups are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    tables = {id(p) for p in embedding_tables(model)}
    hidden = {id(p) for p in hidden_matrices(model)} if config.optimizer == "muon" else set()
    special = hidden | tables
    other_matrices = [p for p in params if p.dim() >= 2 and id(p) not in special]
    groups = [
        {"params": [p for p in params if id(p) in hidden], "use_muon": True},
        {"params": other_matrices},
        {
            "params": [p for p in params if id(p) in tables],
            "lr_scale": config.embedding_lr_scale,
            "weight_decay": 0.0,
        },
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    common = dict(
        lr=config.lr, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
    )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, **common)
    return MuonWithAdamW(groups, **common)


# --------------------------------------------------------------------------- history


class History(list):
    """The records of a run, one dict per step: step, lr, train_loss (nats/token), train_bpb,
    aux_loss, grad_norm (before clipping), tokens_seen, elapsed (s), tokens_per_s, and
    val_bpb on evaluation steps. A plain list of dicts, so it is JSON-safe as it is."""

    interrupted: bool = False

    def column(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record that has `key` (e.g. "val_bpb" only at evals)."""
        rows = [r for r in self if r.get(key) is not None]
        return [r["step"] for r in rows], [r[key] for r in rows]

    @property
    def final_val_bpb(self) -> float | None:
        """The last validation bits per byte, or None if there was no evaluation."""
        values = self.column("val_bpb")[1]
        return values[-1] if values else None


# --------------------------------------------------------------------------- one step


class TrainingDiverged(FloatingPointError):
    """The loss or gradient became NaN or infinite; training stopped before saving anything.

    `what` ("loss" or "gradient norm"), `value` and `lr` say what went wrong where it did.
    """

    what: str = ""
    value: float = math.nan
    lr: float = math.nan


@dataclass(frozen=True)
class StepResult:
    """What one training_step measured: figures taken before the update was applied."""

    loss: float  # cross-entropy of the batch, nats per token
    aux_loss: float  # the model's auxiliary loss (MoE balance; 0 for a dense model)
    grad_norm: float  # global gradient norm before clipping


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    grad_clip: float | None,
) -> StepResult:
    """One optimizer update on the batch (x, y), the step `train` repeats; returns its figures.

    Set the lr on every parameter group (times the group's "lr_scale", if make_optimizer
    gave it one: the embedding's), forward, cross-entropy on the float logits plus
    the model's aux_loss(), forget the last step's gradients, backward, clip the global
    gradient norm to grad_clip (None: no clipping), optimizer step. The order matters bit for
    bit: gradients are zeroed before backward (else they add up over steps) and clipped
    before the step. Raises TrainingDiverged, before the weights change, when the loss or
    the gradient norm is not finite.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
    aux = model.aux_loss() if hasattr(model, "aux_loss") else torch.zeros((), device=loss.device)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise _diverged("loss", loss_value, lr)
    optimizer.zero_grad(set_to_none=True)
    (loss + aux).backward()
    max_norm = math.inf if grad_clip is None else grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    if not math.isfinite(grad_norm):
        raise _diverged("gradient norm", grad_norm, lr)
    optimizer.step()
    return StepResult(loss=loss_value, aux_loss=float(aux.item()), grad_norm=grad_norm)


def _diverged(
    what: str, value: float, lr: float, step: int | None = None, checkpoint_dir: Any = None
) -> TrainingDiverged:
    """A TrainingDiverged that names the problem, the likely causes and the fixes."""
    where = "" if step is None else f" at step {step}"
    kept = (
        f" The last good checkpoint in {checkpoint_dir} was left untouched."
        if checkpoint_dir is not None
        else ""
    )
    err = TrainingDiverged(
        f"training diverged{where}: the {what} is {value} (lr={lr:.3g}). Likely causes: the "
        "learning rate is too high (lower lr, lengthen warm-up_steps, keep grad_clip on), fp16 "
        "overflow (train in float32 or bfloat16), or bad input data. Nothing was saved for this step."
        f"{kept}"
    )
    err.what, err.value, err.lr = what, value, lr
    return err


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    block_size: int | None = None,
    batch_size: int = 16,
    n_batches: int | None = None,
    seed: int = 0,
) -> float:
    """Mean cross-entropy (nats per predicted token) of `model` on a 1-D token tensor.

    n_batches=None: one full pass over non-overlapping windows (every token predicted once,
    the exact figure). n_batches=k: k batches of windows at random offsets drawn from a
    generator seeded with `seed`, the same windows on every call, so evaluations during
    training are comparable with each other and cost a fixed amount.
    """
    block_size = block_size or model.config.context_length
    if tokens.dim() != 1:
        raise ValueError(
            f"tokens must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}"
        )
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"only {len(tokens)} tokens to evaluate, fewer than block_size + 1 = {block_size + 1}; "
            "use a bigger corpus (or val_fraction) or a smaller block_size"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in _eval_windows(tokens, block_size, batch_size, n_batches, seed):
            logits = model(x.to(device))
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                y.to(device).reshape(-1),
                reduction="sum",
            )
            total += loss.item()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count


def _eval_windows(
    tokens: torch.Tensor, block_size: int, batch_size: int, n_batches: int | None, seed: int
):
    """Yield (x, y) batches on the CPU: seeded random windows, or all windows in order."""
    if n_batches is not None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - block_size, (n_batches * batch_size,), generator=g)
        offsets = torch.arange(block_size + 1)
        for b in range(n_batches):
            rows = tokens[starts[b * batch_size : (b + 1) * batch_size, None] + offsets]
            yield rows[:, :-1], rows[:, 1:]
        return
    # Full pass: windows of block_size targets side by side; the last, shorter one on its own.
    n_full = (len(tokens) - 1) // block_size
    for b in range(0, n_full, batch_size):
        starts = torch.arange(b, min(b + batch_size, n_full)) * block_size
        rows = tokens[starts[:, None] + torch.arange(block_size + 1)]
        yield rows[:, :-1], rows[:, 1:]
    rest = tokens[n_full * block_size :]
    if len(rest) > 1:
        yield rest[None, :-1], rest[None, 1:]


def evaluate_bpb(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    bytes_per_token: float,
    block_size: int | None = None,
    batch_size: int = 16,
    n_batches: int | None = None,
    seed: int = 0,
) -> float:
    """Bits per byte of `model` on `tokens` (see evaluate_loss for the windows).

    Bits per byte = (nats per token) / ln 2 / (bytes per token): the same units as the
    corpus's entropy floor and comparable across tokenizers, unlike loss per token.
    """
    loss = evaluate_loss(model, tokens, block_size, batch_size, n_batches, seed)
    return bits_per_byte(loss, bytes_per_token)


@torch.no_grad()
def evaluate_stories_bpb(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = 16,
    stride: int | None = None,
) -> float:
    """Bits per byte of `model` on whole stories, each read from its own start.

    Every story is scored as the corpus writes it, EOT + story + EOT: the model is given the
    EOT and predicts every token of the story and the final EOT. So no position lacks the
    story's beginning (as the early positions of a random window do), unless a story is
    longer than the model's context: then windows of context_length tokens slide by
    `stride` (default: half the context) and each target is scored once, with as much of
    its story as fits. The bytes counted are those of story + EOT, the same units as
    tinylm.data.stories_entropy_bits_per_byte on the same texts.
    """
    if not texts:
        raise ValueError("no stories given; pass a non-empty list of story texts (without EOT)")
    if tokenizer.eot_id is None:
        raise ValueError("the tokenizer has no end-of-text token; train it on a corpus with EOT")
    ctx = model.config.context_length
    stride = stride or max(1, ctx // 2)
    if not 1 <= stride <= ctx:
        raise ValueError(f"stride={stride} must be between 1 and the context length {ctx}")
    rows = []  # (input ids, target ids, how many trailing targets to score)
    for text in texts:
        ids = [tokenizer.eot_id, *tokenizer.encode(text), tokenizer.eot_id]
        end, scored = min(len(ids), ctx + 1), 0
        while True:
            start = max(0, end - ctx - 1)
            window = ids[start:end]
            rows.append((window[:-1], window[1:], end - 1 - scored))
            scored = end - 1
            if end == len(ids):
                break
            end = min(len(ids), end + stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nats = 0.0
    try:
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            T = max(len(x) for x, _, _ in batch)
            x = torch.zeros(len(batch), T, dtype=torch.long)
            y = torch.full((len(batch), T), -100, dtype=torch.long)  # -100: not scored
            for i, (xs, ys, n) in enumerate(batch):
                x[i, : len(xs)] = torch.tensor(xs)  # right padding never reaches earlier tokens
                y[i, len(ys) - n : len(ys)] = torch.tensor(ys[len(ys) - n :])
            logits = model(x.to(device)).float()
            total_nats += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                y.to(device).reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
    finally:
        model.train(was_training)
    n_bytes = sum(len((text + EOT).encode("utf-8")) for text in texts)
    return total_nats / math.log(2) / n_bytes


# --------------------------------------------------------------------------- training


# Fields of TrainConfig that may change between a checkpoint and a resumed run: they do not
# change what the updates compute (steps does change the schedule; train() warns about it).
_RESUMABLE_CHANGES = {
    "steps",
    "eval_interval",
    "eval_batches",
    "eval_batch_size",
    "checkpoint_interval",
    "device",
}


def train(
    model: torch.nn.Module,
    data: Any,
    config: TrainConfig,
    callback: Callable[[dict], Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    tokenizer: Any = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> History:
    """Train `model` in place on `data` (a tinylm.data.TokenSplits) and return its History.

    callback(record) is called after every step with that step's record (see History).
    checkpoint_dir: save a resumable checkpoint there every config.checkpoint_interval steps
    and when training stops (with `tokenizer` if given). resume=True: continue from the
    checkpoint in checkpoint_dir if there is one (else start fresh); the result is
    bit-identical to an uninterrupted run. stop_at: stop after this many steps although the
    schedule spans config.steps (to split a run in two). Ctrl-C (KeyboardInterrupt) stops
    cleanly: the model keeps its weights so far and the history has `interrupted = True`.
    Raises TrainingDiverged when the loss or gradient stops being finite.
    """
    device = pick_device(config.device)
    model.to(device)
    block_size = config.block_size or model.config.context_length
    if block_size > model.config.context_length:
        raise ValueError(
            f"block_size={block_size} is longer than the model's context_length={model.config.context_length}; "
            "use a smaller block_size or a model with a longer context"
        )
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n < block_size + 1:
            raise ValueError(
                f"the {split} split has {n} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a bigger corpus or a smaller block_size"
            )
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    eval_batch_size = config.eval_batch_size or config.batch_size

    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)  # batch order: the only randomness
    history = History()
    start, elapsed_before = 0, 0.0
    if resume and checkpoint_dir is not None and _has_train_state(checkpoint_dir):
        start, elapsed_before, history = _restore(
            checkpoint_dir, model, optimizer, generator, config
        )
    model.train()

    def evaluate() -> float:
        # Seed differs from the batch seed so eval windows are not the first training windows.
        return evaluate_bpb(
            model,
            data.val,
            data.val_bytes_per_token,
            block_size,
            eval_batch_size,
            config.eval_batches,
            config.seed + 1,
        )

    def save_checkpoint(step: int, elapsed: float) -> None:
        train_state = {
            "step": step,
            "elapsed": elapsed,
            "train_config": config.to_dict(),
            "history": list(history),
            "generator_state": generator.get_state(),
            # Not used by a GPT without dropout, but cheap insurance for models that draw noise.
            "torch_rng_state": torch.get_rng_state(),
        }
        meta = {"train_config": config.to_dict(), "step": step, "val_bpb": history.final_val_bpb}
        ckpt.save(
            checkpoint_dir,
            model,
            tokenizer,
            meta=meta,
            optimizer=optimizer,
            train_state=train_state,
        )

    bar = _progress_bar(config.steps, start, progress)
    tokens_per_step = config.batch_size * block_size
    t_start = time.perf_counter()
    train_time = 0.0  # seconds spent in training steps, without evaluation and saving
    rate = None  # smoothed tokens/s for the progress bar
    last_val = history.final_val_bpb
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, config)
            x, y = get_batch(data.train, config.batch_size, block_size, generator, device=device)
            try:
                result = training_step(model, optimizer, x, y, lr, config.grad_clip)
            except TrainingDiverged as err:  # say which step, and that the checkpoint is safe
                raise _diverged(err.what, err.value, lr, step + 1, checkpoint_dir) from None
            dt = time.perf_counter() - t0
            train_time += dt
            rate = tokens_per_step / dt if rate is None else 0.9 * rate + 0.1 * tokens_per_step / dt

            done = step + 1
            record = {
                "step": done,
                "lr": lr,
                "train_loss": result.loss,
                "train_bpb": bits_per_byte(result.loss, data.train_bytes_per_token),
                "aux_loss": result.aux_loss,
                "grad_norm": result.grad_norm,
                "tokens_seen": done * tokens_per_step,
                "elapsed": elapsed_before + time.perf_counter() - t_start,
                "tokens_per_s": (done - start) * tokens_per_step / train_time,
                "total_steps": config.steps,
            }
            if done % config.eval_interval == 0 or done == config.steps:
                last_val = record["val_bpb"] = evaluate()
            history.append(record)
            if callback is not None:
                callback(record)
            postfix = {"loss": f"{result.loss:.3f}", "tok/s": f"{rate:,.0f}"}
            if last_val is not None:
                postfix["val_bpb"] = f"{last_val:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if (
                checkpoint_dir is not None
                and config.checkpoint_interval
                and done % config.checkpoint_interval == 0
            ):
                save_checkpoint(done, record["elapsed"])
    except KeyboardInterrupt:
        history.interrupted = True
        done = history[-1]["step"] if history else start
        bar.write(f"training interrupted after step {done}; the model keeps its weights so far")
    finally:
        bar.close()
        if progress and in_notebook():
            # A notebook bar is a widget; viewers without widgets (GitHub, nbviewer) show the
            # text it had when it appeared (0%), so also leave its final state as plain text.
            print(bar, flush=True)
    if checkpoint_dir is not None and not history.interrupted and end > start:
        saved_every = config.checkpoint_interval
        if not (saved_every and end % saved_every == 0):  # not saved at this very step already
            save_checkpoint(end, elapsed_before + time.perf_counter() - t_start)
    return history


def _progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm.auto bar (a widget in notebooks, text in a terminal); a silent stand-in if disabled.

    It redraws at most once a second (tqdm's default is ten times): in a notebook each redraw
    is a message the browser must render, CPU time taken from the training on a small machine.
    """
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        unit="step",
        leave=True,
        mininterval=1.0,
    )


def _has_train_state(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ckpt.TRAIN_STATE_JSON).is_file()


def _restore(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: TrainConfig,
) -> tuple[int, float, History]:
    """Load weights, optimizer moments, RNG states and history; return (step, elapsed, history)."""
    saved_model = ckpt.load_config(directory).to_dict()
    if saved_model != model.config.to_dict():
        changed = sorted(
            k
            for k in set(saved_model) | set(model.config.to_dict())
            if saved_model.get(k) != model.config.to_dict().get(k)
        )
        raise ValueError(
            f"cannot resume from {directory}: it holds a different model (config differs in {changed}). "
            "Fix: resume with the same GPTConfig, use another checkpoint_dir, or pass resume=False."
        )
    state = ckpt.load_train_state(directory, optimizer)
    saved = TrainConfig.from_dict(state["train_config"])
    changed = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(saved, f.name) != getattr(config, f.name)
    ]
    fixed = [name for name in changed if name not in _RESUMABLE_CHANGES]
    if fixed:
        raise ValueError(
            f"cannot resume from {directory}: TrainConfig differs in {fixed}, which would change the "
            "updates. Fix: resume with the saved settings, or pass resume=False to start over."
        )
    if "steps" in changed:
        print(
            f"resuming with steps={config.steps} (saved run had {saved.steps}): the lr schedule changes from here on"
        )
    ckpt.load_weights(directory, model)
    generator.set_state(state["generator_state"])
    if "torch_rng_state" in state:
        torch.set_rng_state(state["torch_rng_state"])
    return int(state["step"]), float(state["elapsed"]), History(state["history"])


# --------------------------------------------------------------------------- live plot
