"""Pick and describe the accelerator: the one place that knows device names.

Everything else in tinylm takes a ``torch.device`` (or the string this module
returns) and moves tensors with ``.to(device)``, so the same code runs on a
laptop CPU, an NVIDIA or AMD GPU (``cuda``), an Apple GPU (``mps``) or a Huawei
Ascend NPU (``npu``, through the ``torch_npu`` plug-in) with no change.
"""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from tinylm.util import check_int

#: The device kinds tinylm knows, in the order ``pick_device()`` prefers them.
KNOWN_DEVICES = ("cuda", "mps", "npu", "cpu")


def _npu_available() -> bool:
    """True when the Ascend plug-in ``torch_npu`` is installed and sees a chip."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu as a side effect)
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def is_available(kind: str) -> bool:
    """Return True when a device of this kind ("cuda", "mps", "npu", "cpu") is usable."""
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if kind == "npu":
        return _npu_available()
    raise ValueError(f"unknown device kind {kind!r}; use one of {', '.join(KNOWN_DEVICES)}")


def is_cuda(device: str | torch.device) -> bool:
    """True for an NVIDIA or AMD GPU (torch calls both ``cuda``): CUDA graphs, GPU int4 kernels."""
    return torch.device(device).type == "cuda"


def available_devices() -> list[str]:
    """Return the device kinds usable on this machine, best first."""
    return [kind for kind in KNOWN_DEVICES if is_available(kind)]


def pick_device(preference: str | torch.device | None = None) -> torch.device:
    """Return the device to run on.

    ``None`` or ``"auto"`` means: ``$TINYLM_DEVICE`` if it is set, else the
    best available of cuda > mps > npu > cpu. An explicit request for a device
    that is not there raises an error naming what is available, rather than
    silently falling back (a silent fallback would make every timing wrong).
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    if preference in (None, "", "auto"):
        preference = os.environ.get("TINYLM_DEVICE") or "auto"
    if preference == "auto":
        return torch.device(available_devices()[0])
    kind = preference.split(":")[0]
    if kind not in KNOWN_DEVICES:
        raise ValueError(
            f"unknown device {preference!r}; use 'auto' or one of {', '.join(KNOWN_DEVICES)} "
            "(optionally with an index, e.g. 'cuda:1')"
        )
    if not is_available(kind):
        hint = {
            "cuda": "install a CUDA (or ROCm) build of torch and check `nvidia-smi`",
            "mps": "MPS needs an Apple-silicon Mac and a recent torch",
            "npu": "install torch_npu matching your torch and the Ascend CANN toolkit",
        }[kind]
        raise RuntimeError(
            f"device {preference!r} was requested but is not available here "
            f"(available: {', '.join(available_devices())}); {hint}, "
            "or pass 'auto' / unset TINYLM_DEVICE to use what is there."
        )
    return torch.device(preference)


def describe_device(device: str | torch.device | None = None) -> str:
    """Return a one-line description of a device (name, memory or thread count)."""
    device = pick_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
        )
    if device.type == "npu":
        name = torch.npu.get_device_name(device)  # type: ignore[attr-defined]
        return f"npu: {name}, torch {torch.__version__}"
    if device.type == "mps":
        return f"mps: Apple GPU on {platform.machine()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return (
        f"cpu: {cpu}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )


def synchronize(device: str | torch.device) -> None:
    """Wait until queued work on the device is done (needed before reading a clock)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators (on every device)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CPU and all CUDA/MPS devices


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with torch on `n` CPU threads, then restore the previous count.

    Tiny models have too little work per operation to share between threads: on a busy
    2-core machine a second thread mostly waits for a core, so small runs use one.
    """
    check_int("cpu_threads(n)", n, 1, fix="pass a whole number of threads, e.g. 1")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
