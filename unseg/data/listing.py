"""What a dataset folder holds, as one comparable record: every file's relative path, size and mtime.

``check_inputs`` writes it on every ``dvc repro`` and ``prepare`` depends on it, so adding, removing or
replacing a file under ``data.root`` makes exactly ``prepare`` and what follows stale (DVC itself never
looks inside a folder that is not a declared dependency). Sizes and modification times are what DVC's own
cache checks use; a file rewritten with the same size within the same nanosecond is not seen.
"""

from __future__ import annotations

import os
from pathlib import Path


def list_files(root: str | Path) -> list[tuple[str, int, int]]:
    """Sorted (path relative to ``root``, size in bytes, mtime in ns) of every non-hidden file under ``root``."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            st = path.stat()
            found.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(found)


def dataset_listing(dataset: str, root: str | Path | None) -> dict:
    """The record ``prepare`` depends on: the generated dataset is a pure function of its params (no files)."""
    if dataset == "generated" or root is None:
        return {"dataset": dataset, "root": None, "files": []}
    root = Path(root)
    files = list_files(root) if root.is_dir() else []
    return {"dataset": dataset, "root": str(root.resolve()), "files": [list(f) for f in files]}
