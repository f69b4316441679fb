"""Named training recipes and `load_or_train`: the trained models later chapters start from.

`load_or_train(name)` returns a ready model: it loads the cached checkpoint of a named recipe
(RECIPES) or trains it (2.5-3 minutes on two CPU cores for "default") and saves it;
`train_recipe(name, callback=LivePlot())` (re)trains and saves a recipe while you watch. A
recipe's checkpoint is retrained whenever what it trains changes (not its description).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tinylm import checkpoint as ckpt
from tinylm.data import load_corpus, prepare_tokens, split_text
from tinylm.device import describe_device, pick_device, seed_everything
from tinylm.model import GPT, GPTConfig
from tinylm.paths import cache_dir, checkpoint_dir, display_path
from tinylm.tokenizer import BPETokenizer
from tinylm.train import TrainConfig, evaluate_bpb, train


@dataclass
class Recipe:
    """Everything that defines a trained model: corpus, tokenizer size, model and training."""

    description: str
    model: dict[str, Any]  # GPTConfig fields; vocab_size comes from the tokenizer
    train: TrainConfig
    corpus: str = "stories"
    corpus_seed: int = 0
    corpus_kwargs: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 512
    val_fraction: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d


#: Named recipes for load_or_train. Later chapters add variants ("gqa", "mla", "moe", ...)
#: as entries here; a recipe's checkpoint is retrained whenever its entry changes.
RECIPES: dict[str, Recipe] = {
    # Tuned on 2 CPU cores: at this budget a ~1 M-parameter model taking many cheap steps
    # beats bigger ones taking fewer; vocab 1024 (~4 bytes per token) beat 2048, and lr 6e-3
    # beat 3e-3 and 1e-2. Muon for the matrices (tinylm.optim) instead of AdamW, and the
    # token embedding at 30x the lr without weight decay (embedding_lr_scale). On 300 stories
    # of an unseen seed, 900 steps end (seeds 0, 1, 2, 3; one thread):
    #   Muon, embedding lr 30x: 1.149, 1.151, 1.104, 1.099x the entropy floor
    #   Muon, embedding lr 1x:  1.173, 1.169, 1.179 (seeds 0, 1, 2)
    #   AdamW, embedding lr 1x, decayed (the earlier recipe): 1.268 (seed 0; 1800 steps: 1.16)
    # The seed matters because copying a name or toy from the story's start is learned in a
    # jump whose step varies. Embedding lr 10x 1.158, 100x 1.157 (seed 0). A Muon step costs
    # ~20% more time than an AdamW one (the Newton-Schulz products). Tried and no better per
    # second: more steps (1000-1100: 1.157-1.158 on seed 0, 1.078 on seed 1), batch 8 or 24
    # (same tokens), 2 or 8 heads, width 96 with more steps, context 256, vocab 2048, a lower
    # or higher min_lr, a warm-up-stable-decay schedule, zero-initialised output projections,
    # 3 Newton-Schulz steps, weight decay 0 everywhere, windows that start at a story's
    # start. The norms' gains at 10x the lr as well: 1.118, 1.158, 1.100, 1.091 (seeds 0-3),
    # within the seeds' spread, so left out. steps is the knob that sets the time.
    "default": Recipe(
        description="4-layer, 128-wide GPT on the generated stories, Muon; 2.5-3 minutes on 2 CPU cores",
        model={"context_length": 128, "n_layer": 4, "n_head": 4, "n_embd": 128},
        train=TrainConfig(
            steps=900,
            batch_size=16,
            lr=6e-3,
            min_lr=6e-4,
            warmup_steps=30,
            eval_interval=100,
            eval_batches=8,
            optimizer="muon",
            embedding_lr_scale=30.0,
        ),
        vocab_size=1024,
    ),
}


#: Chapter 05's variants train 1 / VARIANT_BUDGET_DIVISOR of the default's steps. Five of them
#: (four variants and a second seed) plus the router runs below make the chapter's first run;
#: a fifteenth (60 steps) keeps it short (2 cores: 160-300 ms a step with Muon). Measured in
#: the browser suite on a clean clone: at half the default's steps the chapter's first run
#: took 566 s, at a quarter 331 s (AdamW), at an eighth 212 s, a tenth 183-192 s and a
#: fifteenth 161 s (Muon).
VARIANT_BUDGET_DIVISOR = 15


def _same_budget_variant(description: str, train_seed: int = 0, **model_changes: Any) -> Recipe:
    """The "default" recipe with `model_changes` and a fraction of its steps (chapter 05).

    Chapter 05 trains four of these side by side (dense, GQA, MLA, MoE) with exactly the same
    budget: same corpus, tokenizer, batch, block size, learning-rate schedule and seed, and
    1 / VARIANT_BUDGET_DIVISOR of the default's steps (and evaluation interval). Derived from
    the default entry, they stay in step when it changes.
    train_seed seeds the initial weights and the batch order (a second seed measures how much
    of a difference between variants is noise). The embedding keeps the common learning rate:
    the default's 30x pays over 900 steps but not in a run this short (dense, 60 steps: 0.638
    bits/byte with it, 0.450 without; chapter 03's ablation shows the same on a small model).
    """
    base = RECIPES["default"]
    steps = max(1, base.train.steps // VARIANT_BUDGET_DIVISOR)
    train = dataclasses.replace(
        base.train,
        seed=train_seed,
        steps=steps,
        warmup_steps=min(base.train.warmup_steps, steps),
        eval_interval=max(1, base.train.eval_interval // VARIANT_BUDGET_DIVISOR),
        embedding_lr_scale=1.0,
    )
    model = {**base.model, **model_changes}
    return dataclasses.replace(base, description=description, model=model, train=train)


RECIPES.update(
    {
        "dense": _same_budget_variant(
            "chapter 05 baseline: the default model with a fifteenth of the default's steps"
        ),
        "gqa": _same_budget_variant(
            "chapter 05: grouped-query attention, half as many key/value heads as query heads",
            attention="gqa",
            n_kv_head=max(1, RECIPES["default"].model.get("n_head", 4) // 2),
        ),
        "mla": _same_budget_variant(
            "chapter 05: multi-head latent attention (GPTConfig's default latent sizes)",
            attention="mla",
        ),
        "moe": _same_budget_variant(
            "chapter 05: mixture of experts (8 routed of which 2 per token + 1 shared, "
            "bias-balanced) in every layer",
            mlp="moe",
            n_experts=8,
            experts_per_token=2,
            n_shared_experts=1,
            moe_balance="bias",
        ),
        # Chapter 05 measures how big seed noise is: the dense baseline again, same budget.
        "dense_seed1": _same_budget_variant(
            "chapter 05: the dense baseline with another seed (initial weights and batch order)",
            train_seed=1,
        ),
    }
)

#: Steps of chapter 05's router-balance runs (MoE steps ~190-220 ms on 2 cores). With
#: AdamW, at 40, 60, 80 and 120 steps the unbalanced router's busiest expert already carried
#: ~3x the average load; with Muon (the default recipe's optimizer since 2026-12-06) 40 steps
#: measured busiest/average 1.55x unbalanced, 1.51x with the auxiliary loss, 1.29x with the
#: bias. Chapter 05 prints what this length shows.
ROUTER_STEPS = 40


def _router_variant(description: str, balance: str) -> Recipe:
    """The "moe" recipe with `moe_balance=balance`, trained for ROUTER_STEPS steps.

    Chapter 05 trains three of these (no balancing, auxiliary loss, bias) with the same
    short budget, so that their expert loads differ only by how the router was balanced.
    """
    base = RECIPES["moe"]
    train = dataclasses.replace(
        base.train,
        steps=ROUTER_STEPS,
        warmup_steps=min(base.train.warmup_steps, ROUTER_STEPS),
        eval_interval=max(1, ROUTER_STEPS // 2),
    )
    model = {**base.model, "moe_balance": balance}
    return dataclasses.replace(base, description=description, model=model, train=train)


RECIPES.update(
    {
        "moe_unbalanced": _router_variant(
            "chapter 05: the moe model with no load balancing, short run (router collapse)",
            "none",
        ),
        "moe_aux_loss": _router_variant(
            "chapter 05: the moe model balanced by an auxiliary loss (Switch/GShard), short run",
            "aux_loss",
        ),
        "moe_bias_short": _router_variant(
            "chapter 05: the moe model balanced by DeepSeek-V3's bias, short run",
            "bias",
        ),
    }
)


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(
            f"no recipe named {name!r}; choose one of {sorted(RECIPES)} or add yours to tinylm.recipes.RECIPES"
        )
    return RECIPES[name]


def load_or_train(
    name: str = "default", device: str | torch.device | None = None, progress: bool = True
) -> tuple[torch.nn.Module, Any, dict]:
    """Return (model, tokenizer, meta) of recipe `name`: from its checkpoint, else trained now.

    The checkpoint lives in checkpoint_dir()/name. It is reused when it loads cleanly and was
    made by the same recipe; otherwise `train_recipe(name)` runs the recipe from scratch and
    saves the result (see there for what meta holds).
    """
    device = device if isinstance(device, torch.device) else pick_device(device)
    saved = load_recipe_checkpoint(name, device=device)
    if saved is not None:
        return saved
    return train_recipe(name, device=device, progress=progress)


def load_recipe_checkpoint(
    name: str = "default", device: str | torch.device | None = None
) -> tuple[torch.nn.Module, Any, dict] | None:
    """(model, tokenizer, meta) from recipe `name`'s checkpoint, or None if it must be retrained.

    None when there is no checkpoint, when it does not load (the reason is printed), or when
    it was made by a different recipe (another model, corpus or training setting).
    """
    recipe = _recipe(name)
    device = device if isinstance(device, torch.device) else pick_device(device)
    path = checkpoint_dir() / name
    if not path.exists():
        return None
    try:
        model, tokenizer, meta = ckpt.load(path, device=device)
    except (OSError, ValueError) as err:
        print(f"retraining {name!r}: the checkpoint at {display_path(path)} does not load ({err})")
        return None
    if _what_trains(meta.get("recipe")) != _what_trains(recipe.to_dict()):
        print(f"retraining {name!r}: the recipe changed since {display_path(path)} was saved")
        return None
    return model, tokenizer, meta


def _what_trains(recipe: dict | None) -> dict | None:
    """A recipe's dict without its prose: editing a description must not force a retrain."""
    return None if recipe is None else {k: v for k, v in recipe.items() if k != "description"}


def recipe_data(name: str = "default") -> tuple[Any, Any, Any]:
    """Return (corpus, tokenizer, token splits) of recipe `name`.

    The corpus comes from tinylm.data.load_corpus, the tokenizer is trained on the corpus's
    training split once and then loaded from cache_dir(), and the splits are
    tinylm.data.prepare_tokens with the recipe's val_fraction: exactly what train_recipe uses.
    """
    recipe = _recipe(name)
    corpus = load_corpus(recipe.corpus, seed=recipe.corpus_seed, **recipe.corpus_kwargs)
    tokenizer = _cached_tokenizer(corpus, recipe.vocab_size, recipe.val_fraction)
    data = prepare_tokens(corpus, tokenizer, val_fraction=recipe.val_fraction)
    return corpus, tokenizer, data


def train_recipe(
    name: str = "default",
    device: str | torch.device | None = None,
    progress: bool = True,
    callback: Callable[[dict], Any] | None = None,
) -> tuple[torch.nn.Module, Any, dict]:
    """Train recipe `name` from scratch, save it as its checkpoint, return (model, tokenizer, meta).

    This is what load_or_train runs when there is no valid checkpoint; call it directly to
    retrain while watching (callback as in `train`, e.g. LivePlot()). The checkpoint goes to
    checkpoint_dir()/name, replacing the old one atomically. meta holds the recipe, val_bpb
    (a full pass over the validation split), entropy_floor_bpb, train_time_s, tokens_per_s,
    tokens_seen, n_params, seed, the history and a sample. If training is interrupted
    (Ctrl-C), nothing is saved and KeyboardInterrupt is raised again.
    """
    recipe = _recipe(name)
    device = device if isinstance(device, torch.device) else pick_device(device)
    seed = recipe.train.seed
    seed_everything(seed)
    corpus, tokenizer, data = recipe_data(name)
    config = GPTConfig(**{**recipe.model, "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(seed)  # the model's initial weights
    model = GPT(config)
    train_config = dataclasses.replace(recipe.train, device=str(device))
    t0 = time.perf_counter()
    history = train(model, data, train_config, callback=callback, progress=progress)
    train_time = time.perf_counter() - t0
    if history.interrupted:  # never save a half-trained model under the recipe's name
        raise KeyboardInterrupt(
            f"training of recipe {name!r} was interrupted; nothing was saved "
            "(an existing checkpoint is left as it was)"
        )
    block_size = train_config.block_size or config.context_length
    val_bpb = evaluate_bpb(
        model, data.val, data.val_bytes_per_token, block_size, train_config.batch_size
    )
    meta = {
        "name": name,
        "recipe": recipe.to_dict(),
        "val_bpb": val_bpb,
        "entropy_floor_bpb": corpus.entropy_bits_per_byte,
        "train_time_s": train_time,
        "tokens_per_s": history[-1]["tokens_per_s"],
        "tokens_seen": history[-1]["tokens_seen"],
        "seed": seed,
        "device": describe_device(device),
        "torch": torch.__version__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "val_bytes_per_token": data.val_bytes_per_token,
        "history": list(history),
        "sample": _quick_sample(model, tokenizer, n_tokens=120, seed=seed),
    }
    ckpt.save(checkpoint_dir() / name, model, tokenizer, meta=meta)
    model.eval()
    return model, tokenizer, meta


def _cached_tokenizer(corpus: Any, vocab_size: int, val_fraction: float) -> Any:
    """Train a BPE tokenizer on the corpus's training split, or load it from cache_dir().

    Only the training text is used, so the validation text stays unseen by every learned
    part. The cache key hashes that text and includes the vocabulary size, so a changed
    corpus never reuses a stale tokenizer.
    """
    text = split_text(corpus.text, val_fraction)[0]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = cache_dir() / f"tokenizer-{corpus.name}-{digest}-v{vocab_size}.json"
    if path.is_file():
        try:
            return BPETokenizer.load(path)
        except (OSError, ValueError) as err:
            print(f"retraining the tokenizer: {display_path(path)} does not load ({err})")
    tokenizer = BPETokenizer.train(text, vocab_size)
    tokenizer.save(path)  # atomic: a crash never leaves a half-written tokenizer in the cache
    return tokenizer


@torch.no_grad()
def _quick_sample(
    model: torch.nn.Module,
    tokenizer: Any,
    n_tokens: int = 100,
    seed: int = 0,
    temperature: float = 0.8,
) -> str:
    """A short sample that starts after an end-of-text token (a fresh story), for meta and reports.

    Deliberately minimal (full recompute each token, temperature only); chapter 04's
    tinylm.generate is the real sampler.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([[tokenizer.eot_id]], device=device)
    for _ in range(n_tokens):
        logits = model(idx[:, -model.config.context_length :])[0, -1].float().cpu()
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=g)
        if nxt.item() == tokenizer.eot_id:
            break
        idx = torch.cat([idx, nxt.to(device)[None]], dim=1)
    model.train(was_training)
    return tokenizer.decode(idx[0, 1:].tolist())
