"""Tensor-parallel inference over worker processes, and serving through a worker's death.

    with TPServer(model, world_size=2) as server:
        outputs = server.generate([prompt_a, prompt_b], max_new_tokens=20)  # greedy
        print(server.stats(), server.failures)

Design (Megatron-style tensor parallelism, CPU processes talking over loopback with gloo):

- `shard_state_dict(model, rank, world)` cuts the weights. Attention is split by heads: rank r
  keeps rows r of q/k/v (its n_head/world query heads and n_kv_head/world K/V heads:
  *column-parallel*) and the matching columns of o_proj (*row-parallel*). The MLP is split by
  hidden units: rows of gate/up, columns of down. Embedding, norms and the head are copied.
- `ShardedGPT` runs one rank's share. Each half-layer (attention, MLP) ends with a partial
  sum of the residual update; one all-reduce per half-layer adds the world partial sums, so
  every rank holds the same hidden state again: 2 all-reduces of [B, T, n_embd] per layer,
  the communication `tinylm.costs.estimate` charges to tp > 1. Each rank keeps the KV cache of
  its own heads only (1/world of the cache).
- `TPServer` (the coordinator, the calling process) spawns `world` workers (spawn start
  method), which join a gloo process group through a TCP store on 127.0.0.1 and wait for
  commands on a pipe. The coordinator sends every worker the same forward (prefill a request,
  or one decode token), waits for all replies, and picks the greedy token from rank 0's
  logits. The workers time every all-reduce, so `stats()` tells communication from compute.
- Failure: while it waits, the coordinator watches the workers' pipes AND their process
  sentinels (`multiprocessing.connection.wait`), so a dead worker is noticed at once, and a
  hung one after `step_timeout_s`; gloo's own timeout (`init_process_group(timeout=...)`)
  unblocks survivors stuck in a collective. On a failure the coordinator tears the whole
  group down (a gloo group with a missing member cannot be reused), re-shards the weights
  onto world - 1 fresh workers (rounded down to a degree that divides the heads; at 1 it
  serves from its own copy of the model), re-prefills the request's tokens so far and
  carries on. Greedy decoding is a function of the tokens, so every request ends with the
  tokens it would have produced without the failure; `failures` records what each cost.
- Clean-up is in `close()` (also `__exit__` and a finaliser): ask, then terminate, then kill,
  and join every worker, so no process outlives the server even when a test fails.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from tinylm.attention import KVCache, attention_mask
from tinylm.layers import apply_rope, rope_tables
from tinylm.model import GPT, GPTConfig
from tinylm.util import check_int

#: Default time a worker may take for one forward before the coordinator calls it hung.
DEFAULT_STEP_TIMEOUT_S = 20.0
#: Default gloo collective timeout: a survivor blocked in an all-reduce gives up after this.
DEFAULT_COLLECTIVE_TIMEOUT_S = 20.0
#: Start-up of a worker (importing torch in a fresh process + joining the group).
DEFAULT_START_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- sharding


def check_tp(config: GPTConfig, world: int) -> None:
    """Raise ValueError unless `config` can be split over `world` ranks by this module."""
    check_int("world size", world, 1, fix="the number of ranks to split the model over")
    if config.attention not in ("mha", "gqa") or config.mlp != "dense":
        raise ValueError(
            f"tensor parallelism here supports dense MHA/GQA models, got attention="
            f"{config.attention!r}, mlp={config.mlp!r}; use a model with attention='mha' or "
            "'gqa' and mlp='dense'."
        )
    if config.position != "rope" or config.norm_placement != "pre":
        raise ValueError(
            f"tensor parallelism here runs the Llama layout (RoPE, pre-norm), got position="
            f"{config.position!r}, norm_placement={config.norm_placement!r}; use the defaults."
        )
    for name, size in (
        ("n_head", config.n_head),
        ("n_kv_head", config.n_kv_head),
        ("mlp_hidden", config.mlp_hidden),
    ):
        if size % world:
            sizes = (config.n_head, config.n_kv_head, config.mlp_hidden)
            ok = [w for w in range(1, config.n_head + 1) if not any(n % w for n in sizes)]
            raise ValueError(
                f"world size {world} does not divide {name}={size}: every rank needs an equal "
                f"share; use one of {ok}."
            )


def valid_tp(config: GPTConfig, world: int) -> bool:
    """True when `world` ranks can each take an equal share of heads and hidden units."""
    try:
        check_tp(config, world)
    except ValueError:
        return False
    return True


def shard_state_dict(model: GPT, rank: int, world: int) -> dict[str, Tensor]:
    """The weights rank `rank` of `world` holds: its heads and hidden units, copies of the rest."""
    c = model.config
    check_tp(c, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}.")
    D = c.head_dim

    def rows(w: Tensor, n: int) -> Tensor:  # column-parallel: this rank's output features
        return w.chunk(world, dim=0)[rank] if n else w

    out = {}
    for name, w in model.state_dict().items():
        w = w.detach()
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            heads = c.n_head if "q_proj" in name else c.n_kv_head
            w = w.view(heads, D, -1).chunk(world, dim=0)[rank].reshape(-1, w.shape[1])
        elif name.endswith(("mlp.gate.weight", "mlp.up.weight")):
            w = rows(w, 1)
        elif name.endswith(("o_proj.weight", "mlp.down.weight")):
            w = w.chunk(world, dim=1)[rank]  # row-parallel: this rank's input features
        out[name] = w.contiguous().clone()
    return out


def _identity(x: Tensor) -> Tensor:
    return x


class ShardedGPT:
    """One rank's share of a GPT: the same forward as `GPT.forward`, plus two all-reduces per
    layer. `all_reduce` sums a tensor over the ranks (identity for world == 1)."""

    def __init__(
        self,
        config: GPTConfig,
        state: dict[str, Tensor],
        world: int,
        all_reduce: Callable[[Tensor], Tensor] = _identity,
    ) -> None:
        check_tp(config, world)
        self.config, self.world, self.all_reduce = config, world, all_reduce
        self.w = state
        self.n_head, self.n_kv_head = config.n_head // world, config.n_kv_head // world
        self.rope_cos, self.rope_sin = rope_tables(
            config.head_dim, config.context_length, config.rope_theta, config.rope_scaling
        )

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache for this rank's K/V heads only."""
        c = self.config
        shapes = [[(self.n_kv_head, c.head_dim)] * 2 for _ in range(c.n_layer)]
        return KVCache(batch_size, max_len or c.context_length, shapes, torch.float32)

    def _attention(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, mask, cache) -> Tensor:
        B, T, _ = x.shape
        D, p = self.config.head_dim, f"blocks.{i}.attn."
        q = F.linear(x, self.w[p + "q_proj.weight"]).view(B, T, self.n_head, D).transpose(1, 2)
        k = F.linear(x, self.w[p + "k_proj.weight"]).view(B, T, self.n_kv_head, D).transpose(1, 2)
        v = F.linear(x, self.w[p + "v_proj.weight"]).view(B, T, self.n_kv_head, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # fmt: skip
        # o_proj sees only this rank's heads: a partial sum of the full projection.
        partial = F.linear(y.transpose(1, 2).reshape(B, T, -1), self.w[p + "o_proj.weight"])
        return self.all_reduce(partial)

    def _mlp(self, i: int, x: Tensor) -> Tensor:
        p = f"blocks.{i}.mlp."
        h = F.silu(F.linear(x, self.w[p + "gate.weight"])) * F.linear(x, self.w[p + "up.weight"])
        return self.all_reduce(F.linear(h, self.w[p + "down.weight"]))  # partial over hidden

    def _norm(self, x: Tensor, name: str) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.w[name], self.config.norm_eps)

    @torch.inference_mode()
    def __call__(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits [B, T, vocab] for token ids [B, T] (no padding), as GPT.forward."""
        T = idx.shape[1]
        pos = 0 if cache is None else cache.pos
        mask = None if pos == 0 or T == 1 else attention_mask(None, pos, T, idx.device)
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = F.embedding(idx, self.w["tok_emb.weight"])
        for i in range(self.config.n_layer):
            x = x + self._attention(i, self._norm(x, f"blocks.{i}.attn_norm.weight"), cos, sin,
                                    mask, cache)  # fmt: skip
            x = x + self._mlp(i, self._norm(x, f"blocks.{i}.mlp_norm.weight"))
        if cache is not None:
            cache.advance(T)
        return F.linear(self._norm(x, "norm.weight"), self.w["lm_head.weight"])


def simulate_tp(model: GPT, idx: Tensor, world: int) -> Tensor:
    """Run the `world` shards in threads of this process, all-reducing through shared memory.

    The same arithmetic as the worker processes (and the same summation order on every rank),
    without processes or sockets: a quick way to check the sharding. Returns rank 0's logits.
    """
    barrier, parts = threading.Barrier(world), [None] * world
    results: list = [None] * world

    def run(rank: int) -> None:
        def all_reduce(x: Tensor) -> Tensor:
            parts[rank] = x
            barrier.wait()
            total = torch.stack(parts).sum(0)  # every rank adds in rank order: same bits
            barrier.wait()  # nobody overwrites parts[] before all have read them
            return total

        shard = ShardedGPT(model.config, shard_state_dict(model, rank, world), world, all_reduce)
        results[rank] = shard(idx)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results[0]


# ----------------------------------------------------------------------------- the worker


@dataclass
class _CommTimer:
    """all_reduce wrapped in a timer: seconds, calls and bytes reduced on this rank."""

    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0

    def __call__(self, x: Tensor) -> Tensor:
        t0 = time.perf_counter()
        dist.all_reduce(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.bytes += x.numel() * x.element_size()
        return x


def _bench_allreduce(sizes: list[int], repeats: int, warmup: int) -> list[list[float]]:
    """Seconds of every timed all-reduce, per size: warm-up first, then `repeats` rounds that
    each visit every size in a shuffled order (the same on every rank), so a slow spell of the
    machine lands on all sizes rather than on whichever size was running then."""
    messages = [torch.ones(max(1, size // 4)) for size in sizes]
    for x in messages:
        for _ in range(warmup):  # connections, buffers, caches
            dist.all_reduce(x)
    samples: list[list[float]] = [[] for _ in sizes]
    for r in range(repeats):
        order = list(range(len(sizes)))
        random.Random(r).shuffle(order)  # seeded by the round: every rank agrees
        for i in order:
            dist.barrier()  # start together, so a rank's lateness is not timed as the link
            t0 = time.perf_counter()
            dist.all_reduce(messages[i])
            samples[i].append(time.perf_counter() - t0)
    return samples


def _worker_main(
    rank: int,
    world: int,
    port: int,
    config: dict,
    shard: bytes,
    conn,
    collective_timeout_s: float,
) -> None:
    """A worker: join the gloo group, then serve commands from the coordinator until "stop".

    The shard arrives as safetensors bytes: plain bytes through the spawn pipe, rather than
    tensors that torch would pass as shared-memory file descriptors.
    """
    state = safetensors.torch.load(shard)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)  # world workers share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=collective_timeout_s),
    )
    timer = _CommTimer()
    model = ShardedGPT(GPTConfig.from_dict(config), state, world, all_reduce=timer)
    cache, forward_seconds = None, 0.0
    conn.send(("ready", rank))
    try:
        while True:
            op, *args = conn.recv()
            if op == "stop":
                return
            if op == "forward":  # (token ids, new request?)
                ids, new_request = args
                t0 = time.perf_counter()
                if new_request:
                    cache = model.new_cache(1)
                logits = model(torch.tensor([ids]), cache)[0, -1]
                forward_seconds += time.perf_counter() - t0
                conn.send(("logits", logits if rank == 0 else None))
            elif op == "stats":
                conn.send(("stats", dict(comm_seconds=timer.seconds, allreduces=timer.calls,
                                         allreduce_bytes=timer.bytes,
                                         forward_seconds=forward_seconds)))  # fmt: skip
            elif op == "reset_stats":
                timer.seconds, timer.calls, timer.bytes, forward_seconds = 0.0, 0, 0, 0.0
                conn.send(("ok", None))
            elif op == "bench":  # (sizes in bytes, repeats, warm-up): time bare all-reduces
                conn.send(("bench", _bench_allreduce(*args)))
    except (EOFError, KeyboardInterrupt):
        pass  # the coordinator went away: just exit
    except Exception as err:  # a collective failed (a peer died, a timeout): report it
        try:
            conn.send(("error", f"{type(err).__name__}: {err}"))
        except OSError:
            pass
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


# ----------------------------------------------------------------------------- the coordinator


class WorkerFailure(RuntimeError):
    """A worker died, reported an error or did not answer in time."""

    def __init__(self, rank: int | None, reason: str) -> None:
        super().__init__(f"worker {rank}: {reason}")
        self.rank, self.reason = rank, reason


@dataclass
class FailureEvent:
    """What one failure cost: when it was seen and how long serving stalled."""

    request: int  # index of the request being generated
    tokens_done: int  # new tokens of that request already produced
    rank: int | None
    reason: str
    old_world: int
    new_world: int
    detect_seconds: float  # from the start of the failed step to detection
    recover_seconds: float  # tearing down + starting the new group
    reprefill_seconds: float  # re-reading the request's tokens so far

    @property
    def delay_seconds(self) -> float:
        """Extra time the request waited: detection + recovery + re-prefill."""
        return self.detect_seconds + self.recover_seconds + self.reprefill_seconds


def ring_factor(world: int) -> float:
    """Share of a message each rank sends (and receives) in a ring all-reduce: 2 (world-1)/world."""
    return 2 * (world - 1) / world


@dataclass
class LinkFit:
    """time = latency_s + sent / (gbps * 1e9), fitted by least squares to all-reduce timings.

    `sent` is the bytes each rank sends (ring_factor(world) x message size). `residuals` are
    relative: measured / fitted - 1, per size, so the small (latency-bound) and the large
    (bandwidth-bound) messages count alike.
    """

    latency_s: float
    gbps: float
    world: int
    sizes: list[int]
    residuals: list[float]

    def seconds(self, size: float) -> float:
        """Fitted time of one all-reduce of `size` bytes over `world` ranks."""
        return self.latency_s + ring_factor(self.world) * size / (self.gbps * 1e9)


def fit_allreduce(sizes: Sequence[float], seconds: Sequence[float], world: int) -> LinkFit:
    """Fit time = latency + sent / bandwidth to all-reduce timings by weighted least squares.

    Each point is weighted by 1/time, i.e. the fit minimises *relative* errors: message sizes
    span several decades, and plain least squares would let the largest messages decide the
    latency too. Raises ValueError for fewer than two distinct sizes, or a fit that comes out
    unphysical (negative latency or bandwidth: the timings do not follow a line; measure more
    repeats or a wider range of sizes).
    """
    if len(sizes) != len(seconds) or len(set(sizes)) < 2:
        raise ValueError(
            f"need timings of at least two different message sizes (got sizes={list(sizes)!r}, "
            f"{len(seconds)} timings); pass one time per size."
        )
    if world < 2:
        raise ValueError(f"an all-reduce needs world >= 2, got {world}.")
    sent = torch.tensor([ring_factor(world) * s for s in sizes], dtype=torch.float64)
    t = torch.tensor(list(seconds), dtype=torch.float64)
    if bool((t <= 0).any()):
        raise ValueError("all-reduce times must be > 0 seconds.")
    design = torch.stack([torch.ones_like(sent), sent], dim=1) / t[:, None]
    coef = torch.linalg.lstsq(design, torch.ones_like(t)[:, None]).solution[:, 0]
    latency, seconds_per_byte = float(coef[0]), float(coef[1])
    if latency < 0 or seconds_per_byte <= 0:
        raise ValueError(
            f"the fit gives latency {latency:.3g} s and {seconds_per_byte:.3g} s/byte, which is "
            "unphysical: the timings do not follow latency + bytes/bandwidth; use more repeats "
            "or message sizes spanning the latency- and the bandwidth-bound regime."
        )
    fitted = latency + seconds_per_byte * sent
    residuals = (t / fitted - 1).tolist()
    return LinkFit(latency, 1 / seconds_per_byte / 1e9, world, list(sizes), residuals)


@dataclass
class AllReduceBench:
    """Timings of all-reduces of each message size (bytes) over `world` ranks: `samples[i]`
    holds every timed repeat of sizes[i] (the slowest rank's time), `seconds` their medians."""

    world: int
    sizes: list[int]
    seconds: list[float]
    samples: list[list[float]] | None = None

    def bus_gbps(self) -> list[float]:
        """Per-rank bandwidth in GB/s: a ring all-reduce sends 2 (world-1)/world x the message."""
        f = ring_factor(self.world)
        return [f * s / t / 1e9 for s, t in zip(self.sizes, self.seconds, strict=True)]

    def fit(self) -> LinkFit:
        """Least-squares fit of latency + sent / bandwidth through the medians (fit_allreduce)."""
        return fit_allreduce(self.sizes, self.seconds, self.world)

    def link(self) -> tuple[float, float]:
        """(link GB/s, latency s) for the cost model, from fit()."""
        fit = self.fit()
        return fit.gbps, fit.latency_s


def modelled_comm_seconds(
    config: GPTConfig,
    tokens: int,
    world: int,
    link_gbps: float,
    latency_s: float,
    bytes_per_value: int = 4,
) -> float:
    """Communication time of one forward of `tokens` tokens, as `tinylm.costs` models it:
    2 all-reduces of tokens x n_embd values per layer, each sending 2 (world-1)/world of the
    message at link_gbps, plus a fixed latency each. bytes_per_value 4: these workers are fp32
    (the cost model assumes bf16 activations, 2)."""
    if world == 1:
        return 0.0
    L = config.n_layer
    sent = 2 * L * ring_factor(world) * tokens * config.n_embd * bytes_per_value
    return sent / (link_gbps * 1e9) + 2 * L * latency_s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_processes(procs: list, conns: list, grace_s: float = 2.0) -> None:
    """Ask, then terminate, then kill and join every process: none outlives this call."""
    for conn in conns:
        try:
            conn.send(("stop",))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()


class TPServer:
    """Greedy generation with the model split over `world_size` worker processes (see the
    module docstring). Use as a context manager, or call close()."""

    def __init__(
        self,
        model: GPT,
        world_size: int = 2,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        check_tp(model.config, world_size)
        self.model = model.eval()
        self.step_timeout_s, self.collective_timeout_s = step_timeout_s, collective_timeout_s
        self.start_timeout_s = start_timeout_s
        self.failures: list[FailureEvent] = []
        self.procs: list = []
        self.conns: list = []
        self.world = 0
        self._local_cache: KVCache | None = None
        # Clean up even if the caller forgets close() (the list objects are shared).
        self._finalizer = weakref.finalize(self, _stop_processes, self.procs, self.conns)
        try:
            self._start(world_size)
        except BaseException:
            self.close()  # a worker that failed to start must not leave the others running
            raise

    # -- process management

    def _start(self, world: int) -> None:
        """Spawn `world` workers with their shards and wait until all joined the group."""
        self.world = world
        if world == 1:  # fail-over target: serve from the coordinator's own copy
            return
        ctx = mp.get_context("spawn")
        port, config = free_port(), self.model.config.to_dict()
        for rank in range(world):
            parent, child = ctx.Pipe()
            shard = safetensors.torch.save(shard_state_dict(self.model, rank, world))
            p = ctx.Process(
                target=_worker_main,
                args=(rank, world, port, config, shard, child, self.collective_timeout_s),
                daemon=True,
                name=f"tinylm-tp{rank}",
            )
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._gather(self.start_timeout_s, expect="ready")

    def _stop(self) -> None:
        _stop_processes(self.procs, self.conns)
        self.procs.clear()
        self.conns.clear()

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        self._stop()
        self.world = 0

    def __enter__(self) -> TPServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [p.pid for p in self.procs]

    def kill_worker(self, rank: int) -> None:
        """SIGKILL worker `rank` (a crash, for demos and tests)."""
        self.procs[rank].kill()

    # -- talking to the workers

    def _gather(self, timeout_s: float, expect: str) -> list:
        """One reply from every worker; WorkerFailure if one dies, errs or is late."""
        replies: dict[int, object] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(self.procs):
            for rank, (p, conn) in enumerate(zip(self.procs, self.conns, strict=True)):
                if rank in replies:
                    continue
                if conn.poll():
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        raise self._blame(rank, "pipe closed") from None
                    if kind == "error":
                        raise self._blame(rank, payload)
                    if kind != expect:
                        raise WorkerFailure(rank, f"expected {expect!r}, got {kind!r}")
                    replies[rank] = payload
                elif not p.is_alive():
                    raise self._blame(rank, f"process exited (exit code {p.exitcode})")
            left = deadline - time.monotonic()
            if len(replies) < len(self.procs):
                if left <= 0:
                    late = [r for r in range(len(self.procs)) if r not in replies]
                    raise WorkerFailure(late[0], f"no reply within {timeout_s:.3g} s (hung?)")
                # Wake on a reply OR a process exit (its sentinel): detection is immediate.
                wait(self.conns + [p.sentinel for p in self.procs], timeout=min(left, 1.0))
        return [replies[r] for r in range(len(self.procs))]

    def _blame(self, rank: int | None, reason: str) -> WorkerFailure:
        """The failure to report: a dead process rather than the survivor that noticed it.

        When a worker dies, its peer's collective fails too and may report first; wait a
        moment for exit codes, then name the process that exited.
        """
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
            if dead:
                r = dead[0]
                return WorkerFailure(r, f"process exited (exit code {self.procs[r].exitcode})")
            time.sleep(0.02)
        return WorkerFailure(rank, reason)

    def _broadcast(self, message: tuple, expect: str) -> list:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(message)
            except (OSError, ValueError) as err:
                raise WorkerFailure(rank, f"cannot send ({err})") from err
        return self._gather(self.step_timeout_s, expect)

    def forward_last(self, ids: Sequence[int], new_request: bool) -> Tensor:
        """Logits [vocab] of the last of `ids`; new_request starts a fresh KV cache."""
        if self.world == 0:
            raise RuntimeError("this TPServer is closed; make a new one.")
        if self.world == 1:
            if new_request:
                self._local_cache = self.model.new_cache(1)
            with torch.inference_mode():
                return self.model(torch.tensor([list(ids)]), cache=self._local_cache)[0, -1]
        return self._broadcast(("forward", list(ids), new_request), "logits")[0]

    # -- serving

    def _recover(self, failure: WorkerFailure) -> int:
        """Tear the broken group down and start one on fewer workers; return its size."""
        old = self.world
        self._stop()
        new = max(w for w in range(1, old) if valid_tp(self.model.config, w))
        self._start(new)
        return new

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        on_token: Callable[[TPServer, int, int], None] | None = None,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt (one request at a time); survives failures.

        on_token(server, request_index, tokens_done) runs after every new token (a hook for
        demos: e.g. kill a worker mid-stream).
        """
        ctx = self.model.config.context_length
        outputs = []
        for r, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt]
            if not prompt or len(prompt) + max_new_tokens > ctx:
                raise ValueError(
                    f"request {r}: prompt of {len(prompt)} tokens + {max_new_tokens} new tokens "
                    f"must be between 1 and context_length={ctx}; shorten it."
                )
            tokens, new, fresh = list(prompt), [], True
            while len(new) < max_new_tokens:
                t0 = time.perf_counter()
                try:
                    logits = self.forward_last(tokens if fresh else tokens[-1:], fresh)
                except WorkerFailure as failure:
                    t1 = time.perf_counter()
                    old = self.world
                    new_world = self._recover(failure)
                    t2 = time.perf_counter()
                    logits = self.forward_last(tokens, True)  # re-prefill what we have
                    t3 = time.perf_counter()
                    self.failures.append(
                        FailureEvent(r, len(new), failure.rank, failure.reason, old, new_world,
                                     t1 - t0, t2 - t1, t3 - t2)
                    )  # fmt: skip
                fresh = False
                token = int(logits.argmax())
                tokens.append(token)
                new.append(token)
                if on_token is not None:
                    on_token(self, r, len(new))
            outputs.append(new)
        return outputs

    # -- measurements

    def stats(self) -> list[dict]:
        """Per worker: comm_seconds, allreduces, allreduce_bytes, forward_seconds."""
        return self._broadcast(("stats",), "stats") if self.world > 1 else []

    def reset_stats(self) -> None:
        """Zero the workers' counters."""
        if self.world > 1:
            self._broadcast(("reset_stats",), "ok")

    def bench_allreduce(
        self, sizes: Sequence[int], repeats: int = 20, warmup: int = 3
    ) -> AllReduceBench:
        """Time bare all-reduces of each size (bytes) over the current workers: `warmup`
        untimed rounds, then `repeats` rounds visiting the sizes in shuffled order."""
        if self.world < 2:
            raise ValueError("benchmarking all-reduce needs at least 2 workers.")
        if repeats < 1 or warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}.")
        for conn in self.conns:
            conn.send(("bench", list(sizes), repeats, warmup))
        replies = self._gather(self.step_timeout_s * 5, "bench")
        # A collective ends when its slowest rank is done: keep each repeat's slowest time.
        samples = [
            [max(r[i][k] for r in replies) for k in range(repeats)] for i in range(len(sizes))
        ]
        medians = [statistics.median(s) for s in samples]
        return AllReduceBench(self.world, list(sizes), medians, samples)
