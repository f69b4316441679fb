"""Save and load checkpoints safely: safetensors + JSON, verified, written atomically.

A checkpoint is a folder:

    model.safetensors        the weights (one copy of tied tensors; the tie is restored on load)
    config.json              GPTConfig.to_dict(): enough to rebuild the model
    tokenizer.json           tokenizer.save() (absent if no tokenizer was given)
    meta.json                anything JSON-safe: recipe, scores, timings, history ...
    optimizer.safetensors    optimizer state tensors     } only when saved for resuming
    optimizer.json           optimizer scalars and groups } training (optimizer=...)
    train_state.safetensors  tensors of train_state (e.g. the batch generator's state)
    train_state.json         the rest of train_state (step, history, ...)
    manifest.json            size and SHA-256 of every file above

Why no pickle: `torch.load` of a pickle can run arbitrary code, so a checkpoint downloaded
from someone else is a program you execute. safetensors holds only tensors and JSON holds only
data, so loading a checkpoint can never run code.

Why atomic: `save` writes everything into a temporary sibling folder, flushes it to disk,
and only then swaps it into place. A crash (or Ctrl-C) mid-save leaves the old checkpoint
as it was; the manifest catches anything that was damaged afterwards (a truncated copy).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tinylm.config import GPTConfig
from tinylm.device import pick_device
from tinylm.model import GPT
from tinylm.tokenizer import BPETokenizer
from tinylm.util import sha256_file

FORMAT = "tinylm-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
META = "meta.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"

# Metadata key in model.safetensors that lists tied (aliased) tensors: {alias: source}.
_TIED_KEY = "tinylm.tied"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, damaged or does not match its config."""


# --------------------------------------------------------------------------- saving


def save(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any = None,
    meta: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically and return its path.

    model must have a `.config` with `.to_dict()` (a tinylm GPT). tokenizer needs `.save(path)`.
    meta must be JSON-safe. optimizer and train_state are only needed to resume training:
    train_state values that are tensors go to train_state.safetensors, the rest to JSON.
    An existing checkpoint at `directory` is replaced only once the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so the final rename is a cheap metadata operation.
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_weights(tmp / WEIGHTS, model)
        _write_json(tmp / CONFIG, model.config.to_dict())
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        _write_json(tmp / META, meta or {})
        if optimizer is not None:
            tensors, scalars = _split_optimizer_state(optimizer.state_dict())
            save_file(tensors, tmp / OPTIMIZER_TENSORS)
            _write_json(tmp / OPTIMIZER_JSON, scalars)
        if train_state is not None:
            tensors = {
                k: v.detach().cpu().contiguous()
                for k, v in train_state.items()
                if torch.is_tensor(v)
            }
            rest = {k: v for k, v in train_state.items() if not torch.is_tensor(v)}
            save_file(tensors, tmp / TRAIN_STATE_TENSORS)
            _write_json(tmp / TRAIN_STATE_JSON, rest)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "files": {
                name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                for name in files
            },
        }
        _write_json(tmp / MANIFEST, manifest)
        for name in [*files, MANIFEST]:
            _fsync(tmp / name)
        _fsync_dir(tmp)
        _swap_into_place(tmp, directory)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a temporary folder behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _swap_into_place(tmp: Path, directory: Path) -> None:
    """Move the finished folder `tmp` to `directory`, replacing an old checkpoint there.

    POSIX cannot rename a folder over a non-empty one, so the old checkpoint is first renamed
    aside and deleted only after the new one is in place. Between the two renames (a few
    microseconds) `directory` does not exist; a crash exactly there leaves the old checkpoint
    complete in the `.old-` sibling, which `load` points at in its error message. Two
    processes saving to the same folder at once (two notebooks training the same recipe)
    both succeed: the one that renames last wins, whole.
    """
    for _ in range(10):
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(directory, old)
            except FileNotFoundError:  # another writer moved it aside first
                old = None
        try:
            os.replace(tmp, directory)
        except OSError:
            # Another writer put its checkpoint in place between our two renames: again.
            if not directory.exists():
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            continue
        _fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(
        f"could not move the new checkpoint into {directory}: other processes kept replacing it"
    )


def _write_weights(path: Path, model: torch.nn.Module) -> None:
    """Save the state dict with one copy of each tied tensor (safetensors refuses aliases)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        # Two names are the same tensor when they share storage, offset, shape and strides.
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.device,
        )
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, path, metadata={_TIED_KEY: json.dumps(tied, sort_keys=True)})


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-safe scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state_scalars": scalars}


def _write_json(path: Path, obj: Any) -> None:
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True)
    except TypeError as err:
        raise TypeError(
            f"{path.name}: {err}; pass only JSON-safe values (numbers, strings, lists, dicts)"
        ) from err
    path.write_text(text + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames) to disk; not possible on Windows, so skipped there."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def verify(directory: str | os.PathLike) -> dict:
    """Check that a checkpoint folder is complete and undamaged; return its manifest.

    Raises FileNotFoundError for a missing folder or file and CheckpointError for a file
    whose size or SHA-256 differs from the manifest (truncated, edited or corrupted).
    """
    directory = Path(directory)
    if not directory.is_dir():
        hint = ""
        backups = (
            sorted(directory.parent.glob(f".{directory.name}.old-*"))
            if directory.parent.is_dir()
            else []
        )
        if backups:
            hint = f" A save was interrupted: the previous checkpoint is complete in {backups[-1]}; rename it to {directory.name} to use it."
        raise FileNotFoundError(
            f"no checkpoint folder at {directory}. Fix: check the path, or train and save a model there first.{hint}"
        )
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} is missing, so {directory} is not a complete tinylm checkpoint. "
            "Fix: save it again with tinylm.checkpoint.save (or delete the folder to retrain)."
        )
    manifest = _read_json(manifest_path)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(
            f"{manifest_path} is not a {FORMAT} manifest. Fix: point at a folder written by tinylm.checkpoint.save."
        )
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is listed in the manifest but missing. Fix: copy the whole checkpoint folder again, or delete it to retrain."
            )
        size = path.stat().st_size
        if size != entry["bytes"]:
            what = (
                "truncated (an interrupted copy or download?)"
                if size < entry["bytes"]
                else "longer than saved"
            )
            raise CheckpointError(
                f"{path} is {size} bytes but the manifest records {entry['bytes']}: the file is {what}. "
                "Fix: copy the checkpoint folder again, or delete it to retrain."
            )
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path} has the right size but its SHA-256 differs from the manifest: the file was "
                "corrupted or edited after saving. Fix: copy the checkpoint folder again, or delete it to retrain."
            )
    return manifest


def load(
    directory: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, Any, dict]:
    """Load (model, tokenizer, meta) from a checkpoint folder, verifying it first.

    The model is rebuilt from config.json, its weights must match that config exactly
    (names and shapes), and it is returned in eval mode on `device` (None: the best device
    found by tinylm.device.pick_device, which honours $TINYLM_DEVICE).
    tokenizer is None when the checkpoint has no tokenizer.json.
    """
    directory = Path(directory)
    manifest = verify(directory)
    config = _read_config(directory)
    model = GPT(config)
    load_weights(directory, model, _verified=manifest)
    model.to(pick_device(device) if device is None or isinstance(device, str) else device)
    model.eval()
    tokenizer = None
    if TOKENIZER in manifest["files"]:
        tokenizer = BPETokenizer.load(directory / TOKENIZER)
    meta = _read_json(directory / META) if META in manifest["files"] else {}
    return model, tokenizer, meta


def load_config(directory: str | os.PathLike) -> Any:
    """Return the GPTConfig stored in a checkpoint (validated), without loading weights."""
    directory = Path(directory)
    verify(directory)
    return _read_config(directory)


def _read_config(directory: Path) -> Any:
    path = directory / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing. Fix: save the checkpoint again, or delete the folder to retrain."
        )
    try:
        return GPTConfig.from_dict(_read_json(path))
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path} does not describe a valid model: {err}. Fix: save the checkpoint again with this "
            "version of tinylm, or delete the folder to retrain."
        ) from err


def load_weights(
    directory: str | os.PathLike, model: torch.nn.Module, _verified: dict | None = None
) -> None:
    """Copy the weights of a checkpoint into an existing `model`, in place (ties preserved).

    The tensors' names and shapes must match `model.state_dict()` exactly; anything missing,
    unexpected or mis-shaped raises a CheckpointError that lists it.
    """
    directory = Path(directory)
    if _verified is None:
        verify(directory)
    path = directory / WEIGHTS
    tensors, metadata = _read_safetensors(path)
    tied = json.loads(metadata.get(_TIED_KEY, "{}"))
    for alias, source in tied.items():
        if source in tensors:
            tensors[alias] = tensors[source]

    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing tensors {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors {_short(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped tensors {_short(misshaped)}")
        raise CheckpointError(
            f"{path} does not match the model described by {directory / CONFIG}: {'; '.join(problems)}. "
            "The weights were saved from a different model (or config.json was changed). "
            "Fix: load with the config the weights were saved with, or delete the folder to retrain."
        )
    # strict=True is now guaranteed to succeed; copy_ keeps tied parameters tied.
    model.load_state_dict(tensors, strict=True)


def load_train_state(
    directory: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None
) -> dict:
    """Return the train_state saved with a checkpoint; if given, restore `optimizer` in place.

    Raises FileNotFoundError when the checkpoint was saved without train state (or without
    optimizer state while an optimizer was passed).
    """
    directory = Path(directory)
    manifest = verify(directory)
    files = manifest["files"]
    if TRAIN_STATE_JSON not in files:
        raise FileNotFoundError(
            f"{directory} holds no training state ({TRAIN_STATE_JSON}), so training cannot resume from it. "
            "Fix: save with train_state=... (tinylm.train does this when given checkpoint_dir), or train from scratch."
        )
    state = _read_json(directory / TRAIN_STATE_JSON)
    if TRAIN_STATE_TENSORS in files:
        state.update(_read_safetensors(directory / TRAIN_STATE_TENSORS)[0])
    if optimizer is not None:
        if OPTIMIZER_JSON not in files:
            raise FileNotFoundError(
                f"{directory} holds no optimizer state ({OPTIMIZER_JSON}). Fix: save with optimizer=..., or train from scratch."
            )
        scalars = _read_json(directory / OPTIMIZER_JSON)
        tensors = (
            _read_safetensors(directory / OPTIMIZER_TENSORS)[0]
            if OPTIMIZER_TENSORS in files
            else {}
        )
        opt_state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value
        for index, entries in scalars["state_scalars"].items():
            opt_state.setdefault(int(index), {}).update(entries)
        groups = scalars["param_groups"]
        if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(h["params"])
            for g, h in zip(groups, optimizer.param_groups, strict=True)
        ):
            raise CheckpointError(
                f"{directory / OPTIMIZER_JSON} was saved for different parameter groups than this optimizer has. "
                "Fix: build the optimizer the same way as when saving (tinylm.train.make_optimizer), or train from scratch."
            )
        for g in groups:  # JSON turned tuples into lists; AdamW wants betas as a pair
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return state


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and header metadata; turn parse errors into a message naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}). "
            "Fix: copy the checkpoint folder again, or delete it to retrain."
        ) from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}). Fix: save the checkpoint again, or delete the folder to retrain."
        ) from err


def _short(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', ... ({len(items) - n} more)' if len(items) > n else ''}]"
