"""This machine's speeds, measured once: memory bandwidth, GEMV and matmul rates, op overhead.

    m = measure_machine()          # a few seconds the first time, then read from data/cache
    m.read_gbps, m.copy_gbps       # sustained memory bandwidth, GB/s
    m.gemv_gbps["bfloat16"]        # weight bytes/s of a matrix-vector product (decode's kernel)
    m.matmul_flops["float32"]      # FLOP/s of a large square matmul (prefill's kernel)
    m.op_overhead_s                # seconds one tiny PyTorch op costs, whatever its size

Every chapter that turns bytes or FLOPs into seconds uses this one measurement, so the same
machine shows the same bandwidth everywhere. Decoding one token reads every weight once, so
its time has three floors: op_overhead_s x ops per step (launching the ops), weight bytes /
bandwidth (reading them) and FLOPs / matmul_flops (multiplying). Whichever is largest is the
regime the step is in.

Method (stated because bandwidth figures differ by 2x depending on it):
- read: `buf.amax()` over a float32 buffer of READ_BYTES (8x this CPU's usual last-level
  cache, so it streams from DRAM); bytes counted = buffer size. A max, not a sum: on the
  2-core build machine `buf.sum()` read 8-13% slower (21 vs 23 GB/s on one thread), its
  additions holding a core back, and a compiled matrix-vector product out-read it.
- copy: `dst.copy_(src)` between two such buffers; bytes counted = read + written (2x the
  buffer). A CPU also reads each destination line before writing it ("write-allocate"), so
  the DRAM traffic is nearer 3x and copy GB/s reads lower than read GB/s on most machines.
- GEMV: `F.linear(x[1, k], W[n, k])` with W of GEMV_BYTES in each dtype; GB/s = W's bytes /
  time: the BLAS matrix-vector product eager decode calls. (On a CPU it runs one row on
  one thread; tinylm.engine's compiled step writes its own product and can beat it.)
- matmul: `a @ b`, square, MATMUL_SIZE; FLOP/s = 2 n^3 / time.
- op overhead: median time of `x.add_(1)` on an 8-element tensor: the fixed cost of one op.
Each figure is the median of several timed calls after a warm-up. A busy machine measures
lower; measure again (`refresh=True`) on a quiet one. The cache file is keyed by device,
thread count and torch version, and records the date.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinylm.device import describe_device, pick_device, synchronize
from tinylm.paths import cache_dir
from tinylm.util import atomic_write

READ_BYTES = 256 * 2**20  # CPU; an accelerator gets ACCEL_BYTES
ACCEL_BYTES = 1024 * 2**20
GEMV_BYTES = 64 * 2**20
MATMUL_SIZE = 1024  # CPU; an accelerator gets 8192
GEMV_DTYPES = ("float32", "bfloat16")
MATMUL_DTYPES = ("float32", "bfloat16")
CACHE_VERSION = 2  # 2: read with amax (was sum)


@dataclass(frozen=True)
class Machine:
    """Measured speeds of one device with one thread count (see the module docstring)."""

    device: str
    device_type: str
    threads: int
    torch_version: str
    date: str  # ISO 8601, UTC, when it was measured
    read_gbps: float
    copy_gbps: float
    gemv_gbps: dict[str, float]
    matmul_flops: dict[str, float]
    op_overhead_s: float
    seconds_to_measure: float

    @property
    def bandwidth(self) -> float:
        """Bytes/s to use for "bytes / bandwidth" floors: the read bandwidth (decode reads)."""
        return self.read_gbps * 1e9

    def summary(self) -> str:
        """A few readable lines of the figures."""
        lines = [
            f"{self.device}; measured {self.date[:16].replace('T', ' ')} UTC",
            f"  memory read {self.read_gbps:6.1f} GB/s   copy {self.copy_gbps:6.1f} GB/s "
            "(read + write)",
        ]
        for dtype, gbps in self.gemv_gbps.items():
            lines.append(f"  GEMV {dtype:9s} {gbps:6.1f} GB/s of weights")
        for dtype, flops in self.matmul_flops.items():
            lines.append(f"  matmul {dtype:9s} {flops / 1e9:6.1f} GFLOP/s")
        lines.append(f"  one tiny op      {self.op_overhead_s * 1e6:6.1f} us")
        return "\n".join(lines)


def _median_s(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _measure(device: torch.device) -> Machine:
    started = time.perf_counter()
    on_cpu = device.type == "cpu"
    n_bytes = READ_BYTES if on_cpu else ACCEL_BYTES
    # Filled, not torch.empty: the pages must exist before the clock starts.
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.zeros_like(src)
    read_s = _median_s(src.amax, 7, device)
    copy_s = _median_s(lambda dst=dst, src=src: dst.copy_(src), 7, device)
    del src, dst  # free the buffers before the next allocations

    g = torch.Generator().manual_seed(0)
    gemv: dict[str, float] = {}
    for name in GEMV_DTYPES:
        dtype = getattr(torch, name)
        k = 4096
        n = GEMV_BYTES // (k * dtype.itemsize)
        w = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        seconds = _median_s(lambda x=x, w=w: F.linear(x, w), 9, device)
        gemv[name] = w.numel() * dtype.itemsize / seconds / 1e9

    size = MATMUL_SIZE if on_cpu else 8192
    flops: dict[str, float] = {}
    for name in MATMUL_DTYPES:
        dtype = getattr(torch, name)
        a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        flops[name] = 2 * size**3 / _median_s(lambda a=a, b=b: a @ b, 3, device)

    tiny = torch.zeros(8, device=device)

    def hundred_ops() -> None:
        for _ in range(100):
            tiny.add_(1)

    overhead = _median_s(hundred_ops, 9, device) / 100
    return Machine(
        device=describe_device(device),
        device_type=device.type,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        read_gbps=n_bytes / read_s / 1e9,
        copy_gbps=2 * n_bytes / copy_s / 1e9,
        gemv_gbps=gemv,
        matmul_flops=flops,
        op_overhead_s=overhead,
        seconds_to_measure=time.perf_counter() - started,
    )


def cache_path(device: torch.device | str | None = None, directory: Path | None = None) -> Path:
    """The cache file for this device, host, thread count and torch version."""
    dev = pick_device(device)
    host = "".join(c if c.isalnum() else "-" for c in platform.node() or "host")
    name = f"machine-{host}-{dev.type}-t{torch.get_num_threads()}-torch{torch.__version__}.json"
    return (cache_dir() if directory is None else Path(directory)) / name


def _read_cache(path: Path) -> Machine | None:
    try:
        data = json.loads(path.read_text())
        if data.pop("cache_version", None) != CACHE_VERSION:
            return None
        return Machine(**data)
    except (OSError, ValueError, TypeError):
        return None  # missing, unreadable or from another version: measure again


def measure_machine(
    device: torch.device | str | None = None,
    refresh: bool = False,
    cache: bool = True,
    cache_directory: str | os.PathLike | None = None,
) -> Machine:
    """This machine's bandwidth, GEMV and matmul rates and op overhead (cached; see module doc).

    refresh=True measures again and overwrites the cache (do it on a quiet machine);
    cache=False neither reads nor writes the file. The first measurement takes a few seconds.
    """
    dev = pick_device(device)
    path = cache_path(dev, None if cache_directory is None else Path(cache_directory))
    if cache and not refresh:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    machine = _measure(dev)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a notebook measuring at the same moment sees the old file or the new one
        atomic_write(
            path, json.dumps({"cache_version": CACHE_VERSION, **asdict(machine)}, indent=1)
        )
    return machine
