"""Progress bars that show in a terminal only: a ``dvc repro`` log or a CI run gets no ``\\r`` redraws.

Every long loop of the pipeline goes through :func:`progress`. Bars are off when stderr is not a terminal
or when quiet mode is on (a stage's ``--quiet``, or ``UNSEG_QUIET=1``); each stage still logs one line
when it ends, with its counts and wall time.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

QUIET_ENV = "UNSEG_QUIET"


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def progress(iterable=None, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` redrawn at most once a second; off when ``disable``, off a terminal, or quiet."""
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, disable=disable or quiet() or not sys.stderr.isatty(), **kwargs)
