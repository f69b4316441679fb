"""Training through failures: data-parallel training under torchrun, restarted from checkpoints.

    job = ElasticJob(model=config.to_dict(), steps=40, checkpoint_every=10, kill_at_step=25)
    with ElasticRun(job, tokens, workdir) as run:
        run.wait()
    run.lost_steps, run.restarts, run.final_weights()

What happens (the case a big training job meets every few hours):

- `ElasticRun` launches `torchrun --standalone --nproc-per-node N --max-restarts R` (the
  `torch.distributed.elastic` agent) with `python -m tinylm.elastic` as every worker. The
  workers join a gloo group, and each step every rank computes gradients on its own slice of
  the batch, all-reduces them (the average over ranks) and takes the same AdamW step, so all
  ranks hold the same weights. Rank 0 saves an atomic checkpoint (tinylm.checkpoint: weights,
  optimizer moments, step) every `checkpoint_every` steps.
- `kill_at_step` plants the failure: on the first attempt, rank `kill_rank` SIGKILLs itself
  just before that step (no goodbye, no clean-up: a crashed host). The agent sees a worker
  exit, stops the others, and restarts the whole group (a collective with a missing member
  cannot continue). The new workers load the last checkpoint and carry on; the steps since
  that checkpoint are computed twice: the *lost work*.
- Batches depend only on (seed, step, rank), so a resumed run draws exactly the batches the
  uninterrupted run would: the final weights are bit-identical to a run that never failed.
- The launcher keeps the whole process tree in view and kills what is left in `close()`
  (also `__exit__` and on a timeout), so no worker outlives a failed notebook cell.

How often to checkpoint: writing one costs time (delta), and a failure throws away on average
half an interval of work. Young (1974) and Daly (2006) give the interval that minimises the sum;
with N chips that each fail at rate lambda, the job fails N times as often, so a bigger job
must checkpoint more often: `optimal_checkpoint_interval(delta, cluster_mtbf(...))`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tinylm import checkpoint as ckpt
from tinylm.config import GPTConfig
from tinylm.model import GPT

LOG_NAME = "events.jsonl"
JOB_NAME = "job.json"
TOKENS_NAME = "tokens.safetensors"
CHECKPOINT_NAME = "checkpoint"


# ----------------------------------------------------------------------------- Young/Daly


def cluster_mtbf_hours(chip_mtbf_hours: float, n_chips: int) -> float:
    """Mean time between failures of a job on `n_chips` chips that fail independently: a job
    stops when any chip fails, so failures arrive n_chips times as often."""
    if chip_mtbf_hours <= 0 or n_chips < 1:
        raise ValueError(
            f"need chip_mtbf_hours > 0 and n_chips >= 1, got {chip_mtbf_hours}, {n_chips}."
        )
    return chip_mtbf_hours / n_chips


def young_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum time between checkpoints: sqrt(2 delta M)."""
    _check_positive(checkpoint_s=checkpoint_s, mtbf_s=mtbf_s)
    return math.sqrt(2 * checkpoint_s * mtbf_s)


def optimal_checkpoint_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints (seconds).

    With x = delta / (2 M): sqrt(2 delta M) (1 + sqrt(x)/3 + x/9) - delta while delta < 2 M;
    once a checkpoint takes longer than two mean times between failures, checkpoint every M.
    For delta << M it approaches Young's sqrt(2 delta M).
    """
    _check_positive(checkpoint_s=checkpoint_s, mtbf_s=mtbf_s)
    if checkpoint_s >= 2 * mtbf_s:
        return mtbf_s
    x = checkpoint_s / (2 * mtbf_s)
    return math.sqrt(2 * checkpoint_s * mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - checkpoint_s


def wasted_fraction(
    interval_s: float, checkpoint_s: float, mtbf_s: float, restart_s: float = 0.0
) -> float:
    """First-order share of machine time not spent on new work, checkpointing every
    `interval_s` of compute: writing checkpoints (delta / interval) plus, per failure, the
    restart and half an interval of recomputed work ((restart + (interval + delta) / 2) / M)."""
    _check_positive(interval_s=interval_s, checkpoint_s=checkpoint_s, mtbf_s=mtbf_s)
    return checkpoint_s / interval_s + (restart_s + (interval_s + checkpoint_s) / 2) / mtbf_s


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


# ----------------------------------------------------------------------------- the job


@dataclass
class ElasticJob:
    """Settings of a data-parallel training job (all ranks read the same JSON)."""

    model: dict  # GPTConfig fields
    steps: int = 40
    checkpoint_every: int = 10
    batch_per_rank: int = 4
    block_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    kill_at_step: int | None = None  # plant a failure just before this step (first attempt)
    kill_rank: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.checkpoint_every < 1:
            raise ValueError(
                f"steps and checkpoint_every must be >= 1, got {self.steps}, "
                f"{self.checkpoint_every}."
            )
        if self.kill_at_step is not None and not 0 < self.kill_at_step < self.steps:
            raise ValueError(
                f"kill_at_step={self.kill_at_step} must be between 1 and steps - 1 = "
                f"{self.steps - 1} so the failure happens mid-run; or None for no failure."
            )


def batch_for(tokens: torch.Tensor, job: ElasticJob, step: int, rank: int):
    """(inputs, targets) of rank `rank` at `step`: a function of (seed, step, rank) only, so a
    restarted job draws exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(job.seed * 1_000_003 + step * 1_009 + rank)
    starts = torch.randint(0, len(tokens) - job.block_size - 1, (job.batch_per_rank,), generator=g)
    x = torch.stack([tokens[s : s + job.block_size] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1 : s + 1 + job.block_size] for s in starts.tolist()])
    return x, y


def _log(workdir: Path, **event) -> None:
    """Append one JSON line (small appends from a few processes do not interleave)."""
    event["time"] = time.time()
    with open(workdir / LOG_NAME, "a") as f:
        f.write(json.dumps(event) + "\n")


def worker(workdir: Path) -> None:
    """One rank of the job (run by torchrun, which sets RANK, WORLD_SIZE and the store)."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # The store outlives a failed attempt, and with it the dead workers' addresses: a new
    # attempt that read them would try to connect to a process that is gone. Keys under a
    # prefix of their own per attempt keep each attempt's group apart.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        timeout=timedelta(seconds=60),
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"tinylm-attempt-{attempt}", store),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    job = ElasticJob(**json.loads((workdir / JOB_NAME).read_text()))
    tokens = load_file(workdir / TOKENS_NAME)["tokens"]
    torch.manual_seed(job.seed)  # the same initial weights on every rank
    model = GPT(GPTConfig.from_dict(job.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr)
    path, start = workdir / CHECKPOINT_NAME, 0
    if (path / ckpt.TRAIN_STATE_JSON).is_file():
        ckpt.load_weights(path, model)
        start = int(ckpt.load_train_state(path, optimizer)["step"])
    if rank == 0:
        _log(workdir, event="start", attempt=attempt, step=start, world=world)
    try:
        for step in range(start, job.steps):
            if attempt == 0 and step == job.kill_at_step and rank == job.kill_rank:
                _log(workdir, event="killed", attempt=attempt, step=step, rank=rank)
                os.kill(os.getpid(), signal.SIGKILL)
            x, y = batch_for(tokens, job, step, rank)
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in model.parameters():  # data parallel: average the gradients
                dist.all_reduce(p.grad)
                p.grad /= world
            optimizer.step()
            done = step + 1
            if rank == 0:
                _log(workdir, event="step", attempt=attempt, step=done, loss=loss.item())
            if done % job.checkpoint_every == 0 or done == job.steps:
                if rank == 0:
                    t0 = time.perf_counter()
                    ckpt.save(path, model, optimizer=optimizer, train_state={"step": done})
                    _log(workdir, event="checkpoint", attempt=attempt, step=done,
                         seconds=time.perf_counter() - t0)  # fmt: skip
                dist.barrier()  # nobody runs ahead of a checkpoint that is not written yet
        dist.barrier()  # everyone is done with the collectives
    finally:
        dist.destroy_process_group()
    if rank == 0:
        _log(workdir, event="done", attempt=attempt, step=job.steps)
    _exit_together(store, f"tinylm-exited-{attempt}", rank, world)


def _exit_together(store: dist.TCPStore, key: str, rank: int, world: int) -> None:
    """Leave without tripping over the shutdown of torch's C++ threads.

    Rank 0 may host the store: if it exits first, a peer still talking to it aborts, and a
    worker that exits with an error makes torchrun restart a job that had finished. So every
    rank checks in, rank 0 waits for all of them, and each leaves with os._exit(0) (its work
    and its log lines are already on disk), which skips the C++ destructors that can abort
    ("terminate called without an active exception") at interpreter exit.
    """
    store.add(key, 1)
    if rank == 0:
        deadline = time.monotonic() + 30
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    os._exit(0)


# ----------------------------------------------------------------------------- the launcher


class ElasticRun:
    """Launch `job` under torchrun on this machine (see the module docstring).

    workdir receives the job, the tokens, the event log, torchrun's output and the checkpoint;
    it must not hold an earlier run's checkpoint (the job would resume from it).
    """

    def __init__(
        self,
        job: ElasticJob,
        tokens: torch.Tensor,
        workdir: str | os.PathLike,
        nproc: int = 2,
        max_restarts: int = 1,
    ) -> None:
        self.job, self.workdir, self.nproc = job, Path(workdir), nproc
        if (self.workdir / CHECKPOINT_NAME).exists() or (self.workdir / LOG_NAME).exists():
            raise ValueError(
                f"{self.workdir} holds an earlier run (checkpoint or event log); use an empty "
                "folder, e.g. a fresh tempfile.TemporaryDirectory()."
            )
        if tokens.dim() != 1 or len(tokens) < job.block_size + 2:
            raise ValueError(
                f"tokens must be a 1-D tensor longer than block_size + 1 = {job.block_size + 1}."
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / JOB_NAME).write_text(json.dumps(asdict(job)))
        save_file({"tokens": tokens.to(torch.int64).contiguous()}, self.workdir / TOKENS_NAME)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "--monitor-interval=0.1", "-m", "tinylm.elastic", str(self.workdir),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.output = open(self.workdir / "torchrun.log", "w")
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.output, stderr=subprocess.STDOUT, env=env)
        self._seen: dict[int, psutil.Process] = {}
        self.returncode: int | None = None

    def _track(self) -> None:
        """Remember every descendant (torchrun starts its workers in sessions of their own, so
        only their process ids, not a process group, reach them all)."""
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def wait(self, timeout_s: float = 300.0) -> int:
        """Wait for torchrun to finish; kill everything and raise TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            self._track()
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(
                    f"the elastic job did not finish within {timeout_s:.0f} s; see "
                    f"{self.workdir / 'torchrun.log'}."
                )
            time.sleep(0.05)
        self.returncode = self.proc.returncode
        self.close()
        if self.returncode != 0:
            raise RuntimeError(
                f"torchrun exited with code {self.returncode}; see {self.workdir / 'torchrun.log'}."
            )
        return self.returncode

    def close(self) -> None:
        """Kill torchrun and every worker it started, by process id (idempotent)."""
        self._track()
        procs = [psutil.Process(self.proc.pid)] if self.proc.poll() is None else []
        procs += list(self._seen.values())
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)
        self.proc.wait()
        self.output.close()

    def __enter__(self) -> ElasticRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        """Every worker process id seen during the run."""
        return sorted(self._seen)

    # -- what happened

    def events(self) -> list[dict]:
        """The event log: start, step, checkpoint, killed and done records with times."""
        path = self.workdir / LOG_NAME
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def restarts(self) -> int:
        """How many times the group was started again."""
        return sum(e["event"] == "start" for e in self.events()) - 1

    @property
    def steps_computed(self) -> int:
        """Optimizer steps rank 0 took over all attempts (redone ones counted twice)."""
        return sum(e["event"] == "step" for e in self.events())

    @property
    def lost_steps(self) -> int:
        """Steps computed twice because they came after the last checkpoint before the kill."""
        return self.steps_computed - self.job.steps

    def lost_seconds(self) -> float:
        """Delay the failure caused: wall time from the kill until the restarted job is back at
        the step it had reached (restart_seconds + the redone steps)."""
        ev = self.events()
        killed = next((e for e in ev if e["event"] == "killed"), None)
        if killed is None:
            return 0.0
        caught_up = next(
            e for e in ev
            if e["event"] == "step" and e["attempt"] > 0 and e["step"] >= killed["step"]
        )  # fmt: skip
        return caught_up["time"] - killed["time"]

    def restart_seconds(self) -> float:
        """From the kill to the restarted group's first finished step, less one step's time:
        detection, new processes, rendezvous and loading the checkpoint."""
        ev = self.events()
        killed = next((e for e in ev if e["event"] == "killed"), None)
        if killed is None:
            return 0.0
        first = next(e for e in ev if e["event"] == "step" and e["attempt"] > 0)
        return first["time"] - killed["time"] - self.median_step_seconds()

    def median_step_seconds(self) -> float:
        """Median wall time of one training step (from consecutive step records)."""
        ev = [e for e in self.events() if e["event"] in ("step", "checkpoint")]
        gaps = [
            b["time"] - a["time"]
            for a, b in zip(ev, ev[1:], strict=False)
            if a["event"] == "step" and b["event"] == "step" and a["attempt"] == b["attempt"]
        ]
        return sorted(gaps)[len(gaps) // 2] if gaps else 0.0

    def checkpoint_seconds(self) -> float:
        """Median time rank 0 took to write one checkpoint."""
        s = sorted(e["seconds"] for e in self.events() if e["event"] == "checkpoint")
        return s[len(s) // 2] if s else 0.0

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The weights in the last checkpoint (written at the final step)."""
        return load_file(self.workdir / CHECKPOINT_NAME / ckpt.WEIGHTS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of a tinylm.elastic job")
    parser.add_argument("workdir", type=Path)
    worker(parser.parse_args().workdir)
