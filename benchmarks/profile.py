"""Where the time goes in the benchmarks that miss their target (issue 12), under py-spy (not a dependency:
``pip install py-spy``):

    py-spy record -r 200 -n -f raw -o /tmp/extraction.txt -- python -m benchmarks.profile extraction
    python -m benchmarks.profile summary /tmp/extraction.txt

Workloads, each the timed part of its benchmark repeated for ~20 s: ``extraction`` (``write_features`` on
256 tiny images, ``extraction_vs_bare``), ``mining`` (``mine_masks`` on 32 images at 640 px,
``mining_vs_released``), ``zarr`` (the 2000-image store write of ``zarr_io``). ``summary`` prints the share
of the samples (every running thread, native frames included) per innermost frame and per frame anywhere
on the stack.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SECONDS = 20.0


def _repeat(fn) -> None:
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        fn()


def extraction() -> None:
    from benchmarks.pipeline_io import extract_to_store, tiny_images
    from unseg import features as F
    from unseg.models.vit import create_vit

    tmp = Path(tempfile.mkdtemp())
    entries = tiny_images(tmp / "t", 256)
    model = create_vit("vit_tiny_patch16_224", 8, 4).eval()
    geoms = F.geometries(entries, 96, 8, "pad")
    try:
        _repeat(lambda: extract_to_store(tmp / "f.zarr", model, entries, geoms, 32))
    finally:
        shutil.rmtree(tmp)


def mining() -> None:
    from benchmarks.run import blob_features
    from unseg.mining import MiningConfig, mine_masks

    logits, keys, _ = blob_features(32, (40, 53))
    cfg = MiningConfig(heads=5, cls_mass=0.5, topk_fraction=0.4, keep_component=True)
    _repeat(lambda: mine_masks(logits, keys, (40, 53), cfg))


def zarr() -> None:
    from benchmarks.pipeline_io import features_like_keys, write_keys_store

    lengths, keys = features_like_keys()
    tmp = Path(tempfile.mkdtemp())
    try:
        _repeat(lambda: write_keys_store(tmp / "s.zarr", lengths, keys))
    finally:
        shutil.rmtree(tmp)


def _frame(frame: str) -> str:
    """'fn (path/to/module.py:123)' -> 'fn (module.py)'; native frames keep their library name."""
    return re.sub(r"\((?:.*/)?([^/():]+?)(?::\d+)?\)$", r"(\1)", frame.strip())


IDLE = (
    "PyThread_acquire_lock_timed",
    "epoll_wait",
    "select_epoll_poll",
    "sem_timedwait",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
)


def summary(path: str, top: int = 15) -> str:
    """Shares of the busy samples of a ``py-spy record -n -f raw`` file (which samples waiting threads too):
    samples of the workload (its ``_repeat`` loop, or any thread it started) that are not waiting on a lock,
    a queue or a selector; per innermost frame and per frame anywhere on the stack."""
    leaf: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    busy = idle = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_frame(f) for f in stack.split(";") if f]
        if not any(f.startswith(("_repeat (profile.py)", "Thread._bootstrap ")) for f in frames):
            continue  # imports and set-up
        n = int(count)
        if any(f.startswith(IDLE) for f in frames):
            idle += n
            continue
        busy += n
        leaf[frames[-1]] += n
        for f in set(frames):
            anywhere[f] += n
    lines = [f"{busy} busy samples ({idle} more waiting)", "innermost frame (self time):"]
    lines += [f"  {n / busy:6.1%}  {f}" for f, n in leaf.most_common(top)]
    lines.append("anywhere on the stack (inclusive):")
    lines += [f"  {n / busy:6.1%}  {f}" for f, n in anywhere.most_common(2 * top)]
    return "\n".join(lines)


if __name__ == "__main__":
    workloads = {"extraction": extraction, "mining": mining, "zarr": zarr}
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        print(summary(sys.argv[2]))
    elif len(sys.argv) == 2 and sys.argv[1] in workloads:
        workloads[sys.argv[1]]()
    else:
        sys.exit(f"usage: python -m benchmarks.profile {{{'|'.join(workloads)}}} | summary RAW_FILE")
