"""What a dataset folder holds, as one comparable record: every file's relative path, size and mtime.

``check_inputs`` writes it on every ``dvc repro`` and ``prepare`` depends on it, so adding, removing or
replacing a file under ``data.root`` makes exactly ``prepare`` and what follows stale (DVC itself never
looks inside a folder that is not a declared dependency). Sizes and modification times are what DVC's own
cache checks use; a file rewritten with the same size within the same nanosecond is not seen.
"""

from __future__ import annotations

import os
from pathlib import Path

from unseg.errors import UserError


def list_files(root: str | Path) -> list[tuple[str, int, int]]:
    """Sorted (path relative to ``root``, size in bytes, mtime in ns) of every non-hidden file under ``root``.

    Links are followed; a link to a folder that is already being walked (a loop) is a one-line error naming
    it, and a broken link is left out (it is no file)."""
    root = Path(root)
    found = []
    ancestors: dict[str, tuple[int, int]] = {}  # the folders on the walk's current path, by identity

    def on_error(err: OSError) -> None:
        raise UserError(f"data.root: cannot read {err.filename}: {err.strerror}")

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=on_error):
        st = os.stat(folder)
        ancestors = {f: i for f, i in ancestors.items() if folder.startswith(f + os.sep)}
        if (st.st_dev, st.st_ino) in ancestors.values():
            raise UserError(
                f"data.root: {folder} links back to a folder that contains it (a link loop); remove the link"
            )
        ancestors[folder] = (st.st_dev, st.st_ino)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(folder) / name
            if name.startswith(".") or not path.exists():  # hidden, or a broken link
                continue
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
