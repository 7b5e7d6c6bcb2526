"""The one training harness used by every training stage (CrOC, HSG, Mask R-CNN, DeepLab).

It holds what all loops share and nothing model-specific:
- device selection (``auto|cpu|cuda``) and mixed precision (bf16 autocast on CUDA only);
- ``torchrun`` DDP (NCCL on GPU, gloo on CPU), read from the usual environment variables;
- determinism that survives interruption: the batch of step ``s`` and every random draw inside it
  depend on ``(seed, s)`` only, so a resumed run repeats exactly what an uninterrupted one does;
- checkpoints every N steps into a folder guarded by a params digest (a changed param starts fresh);
- a tqdm progress bar and a CSV loss log that DVC renders as a plot.

A training stage writes its own short ``step_fn(step) -> dict`` (the DINO style: one explicit step)
and calls :func:`train_loop`.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint
from unseg.progress import progress


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the local CUDA device when present, else CPU. ``cuda`` without a GPU is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device: 'cuda' was asked for but no CUDA device is visible (use 'auto' or 'cpu')")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op on CPU (CPU runs stay exact and deterministic)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, step, salt)."""
    x = (seed * 1_000_003 + step * 7919 + salt * 104_729) & 0x7FFF_FFFF_FFFF_FFFF
    return x


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    """One draw from U(low, high) on ``gen`` (float64, so draws do not depend on the default dtype)."""
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistInfo()


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives stage data on the current device: this rank's own GPU
    if not dist.is_initialized():
        # a long timeout: a rank whose share is done waits at a barrier for the slowest one (sharded extraction)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=12))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def in_process_group() -> bool:
    """Whether this process is one of several in an initialised process group (collectives needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process of the group (no-op without one)."""
    if in_process_group():
        dist.barrier()


def average_gradients(modules: Sequence[torch.nn.Module]) -> None:
    """Mean over processes of the gradients of modules not wrapped in DDP (e.g. called several times per
    step); a parameter without a gradient counts as zeros. No-op without a process group."""
    if not in_process_group():
        return
    for module in modules:
        for p in module.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over processes (identity without a process group)."""
    if in_process_group():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each logged value averaged over processes (unchanged without a process group): under DDP the log, the
    progress bar and the non-finite check see the global batch's loss, not rank 0's share of it, and every
    rank stops together when it is not finite."""
    if not in_process_group() or not values:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    mean = all_reduce_mean(torch.tensor(list(values.values()), dtype=torch.float64, device=device))
    return dict(zip(values, mean.tolist(), strict=True))


def min_max_over_processes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``t`` over every process's tensor (of ``t`` alone without a process group); no gradient."""
    low, high = t.detach().min(), t.detach().max()
    if in_process_group():
        both = torch.stack([-low, high])  # one all-reduce: max of -min is -min
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        low, high = -both[0], both[1]
    return low, high


def differentiable_mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over processes with gradients flowing back to every process (identity without a process
    group): the backward all-reduces the gradients, so a loss that uses a batch statistic gets, after DDP's
    gradient averaging, the gradients of one process holding the whole batch."""
    if in_process_group():
        return _AllReduceSum.apply(t) / dist.get_world_size()
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of each process's input is the sum of every process's gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device, **kwargs) -> torch.nn.Module:
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


# ---------------------------------------------------------------- data by step


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Dataset indices of global batch ``step``: consecutive slices of per-epoch permutations.

    Epoch ``e``'s order is ``randperm(n)`` seeded by ``(seed, e)``; batches run through the
    concatenation of those orders, so any step's batch is known without replaying earlier ones.
    """
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=generator(step_seed(seed, epoch, salt=1)))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return out


class StepBatches(Dataset):
    """Item ``s`` is this rank's share of global batch ``s``, built by ``make_batch(indices, step)``.

    ``make_batch`` must draw its randomness from ``step_seed(seed, step, index)`` so that the batch
    is a pure function of the step. Use with :func:`step_loader`.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        make_batch: Callable[[list[int], int], Any],
        info: DistInfo = SINGLE_PROCESS,
    ):
        if batch_size % info.world_size:
            raise UserError(f"batch_size {batch_size} is not divisible by the {info.world_size} processes")
        self.n, self.batch_size, self.seed, self.make_batch, self.info = n, batch_size, seed, make_batch, info

    def __len__(self) -> int:  # effectively unbounded; the sampler decides which steps are drawn
        return 1 << 40

    def __getitem__(self, step: int):
        idx = batch_indices(step, self.n, self.batch_size, self.seed)
        return self.make_batch(idx[self.info.rank :: self.info.world_size], step)


def step_loader(batches: StepBatches, start: int, stop: int, workers: int = 0) -> Iterator:
    """Iterate batches ``start..stop-1`` (workers prefetch; order and content do not depend on them)."""
    return iter(
        DataLoader(
            batches,
            batch_size=None,
            sampler=range(start, stop),
            num_workers=workers,
            persistent_workers=False,
            prefetch_factor=2 if workers else None,
        )
    )


# ---------------------------------------------------------------- checkpoints and logs


class CheckpointDir:
    """A folder of resumable checkpoints guarded by a digest of the params that shaped the run.

    When the digest on disk differs from ``digest`` the folder is stale (a param changed) and is
    emptied, so the run starts fresh; otherwise :meth:`load` returns the latest checkpoint.
    Saving is atomic (temp file + rename) and keeps the last two checkpoints.
    """

    def __init__(self, path: str | Path, digest: str, is_main: bool = True):
        self.path, self.digest, self.is_main = Path(path), digest, is_main
        stamp = self.path / "DIGEST"
        if is_main:
            if self.path.exists() and (not stamp.exists() or stamp.read_text().strip() != digest):
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            stamp.write_text(digest + "\n")
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _files(self) -> list[Path]:
        return sorted(self.path.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))

    def load(self) -> dict | None:
        files = self._files()
        return read_checkpoint(files[-1], "resumable checkpoint") if files else None

    def save(self, step: int, state: dict) -> None:
        if not self.is_main:
            return
        final = self.path / f"step_{step:08d}.pt"
        tmp = final.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, final)
        for old in self._files()[:-2]:
            old.unlink()


class CsvLog:
    """Append-only CSV of per-step scalars; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: str | Path, resume_step: int = 0, is_main: bool = True):
        self.path, self.is_main, self.fields = Path(path), is_main, None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step > 0 and self.path.exists():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        if rows:
            self.fields = list(rows[0].keys())
        with open(self.path, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(rows)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: f"{v:.6g}" for k, v in values.items()}}
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


# ---------------------------------------------------------------- the loop


def state_dict_of(parts: dict[str, Any]) -> dict:
    return {
        name: unwrap(p).state_dict() if isinstance(p, torch.nn.Module) else p.state_dict() for name, p in parts.items()
    }


def load_state_into(parts: dict[str, Any], state: dict) -> None:
    for name, p in parts.items():
        (unwrap(p) if isinstance(p, torch.nn.Module) else p).load_state_dict(state[name])


class StopRequests:
    """SIGINT / SIGTERM while training, noted and acted on between two steps (never inside one, where the
    weights or the optimizer may be half-updated): :meth:`pending` says one came, on any process. A second
    signal acts at once (the handlers in place before are back after the first)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, info: DistInfo):
        self.info, self.received, self._previous = info, None, {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def _note(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def pending(self) -> bool:
        if not in_process_group():
            return self.received is not None
        return mean_over_processes({"stop": float(self.received is not None)})["stop"] > 0  # every rank stops


def train_loop(
    step_fn: Callable[[int, Any], dict[str, float]],
    make_batches: Callable[[int], Iterator],
    parts: dict[str, Any],
    total_steps: int,
    ckpt: CheckpointDir,
    log_path: str | Path,
    ckpt_every: int,
    seed: int,
    info: DistInfo = SINGLE_PROCESS,
    desc: str = "train",
) -> int:
    """Run ``step_fn(step, batch)`` for the remaining steps, resuming from ``ckpt``; returns the steps run.

    ``parts`` maps names to everything with a state (models, optimizers, loss modules with centres);
    their state is restored from the latest checkpoint before the first step, and ``make_batches(start)``
    gives the batches from that step on. Before each step the global torch RNG is seeded from
    ``(seed, step)`` so dropout and drop-path repeat on resume. A non-finite loss stops the run with a
    one-line error. SIGINT or SIGTERM finishes the step under way, writes a checkpoint and raises
    KeyboardInterrupt, so a rerun resumes there and ends as an uninterrupted run would.
    """
    state = ckpt.load()
    start = 0
    if state is not None:
        load_state_into(parts, state["parts"])
        start = int(state["step"])
    batches = make_batches(start)
    log = CsvLog(log_path, resume_step=start, is_main=info.is_main)
    bar = progress(
        range(start, total_steps),
        desc=desc,
        initial=start,
        total=total_steps,
        disable=not info.is_main,
        dynamic_ncols=True,
    )
    with StopRequests(info) as stops:
        for step in bar:
            torch.manual_seed(step_seed(seed, step, salt=2) + info.rank)
            values = mean_over_processes(step_fn(step, next(batches)))
            loss = values.get("loss")
            if loss is not None and not math.isfinite(loss):
                raise UserError(
                    f"{desc}: the loss became {loss} at step {step}; lower the learning rate or clip gradients"
                )
            log.write(step, values)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(values.items())[:3]}, refresh=False)
            stop = stops.pending()
            if stop or (step + 1) % ckpt_every == 0 or step + 1 == total_steps:
                ckpt.save(step + 1, {"step": step + 1, "parts": state_dict_of(parts)})
            if stop:
                bar.close()
                raise KeyboardInterrupt(f"{desc}: stopped after step {step + 1} of {total_steps}, checkpoint written")
    return total_steps - start


def params_digest(*sections: Any) -> str:
    """Stable short digest of params sections (dataclasses or dicts)."""
    import dataclasses
    import hashlib
    import json

    def plain(x):
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    text = json.dumps([plain(s) for s in sections], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def init_digest(weights: str | Path | None) -> list[str]:
    """The digest of a training run's initial weights, for its params digest ([] from scratch, so the digests
    of runs from before initial weights existed stay valid)."""
    return [file_digest(weights)] if weights else []


def file_digest(path: str | Path) -> str:
    """Short sha256 of a file's bytes, or of every file (names and bytes) under a folder.

    Guards resumable scratch that depends on an input (a changed input starts the run fresh).
    """
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to ``final`` at ``total`` (DINO)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(1.0, t)))


def step_decay(base: float, at: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """``base`` times ``gamma`` for every milestone reached by ``at`` (a step or an epoch number)."""
    return base * gamma ** sum(at >= m for m in milestones)
