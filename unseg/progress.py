"""Progress of every long loop: a bar in a terminal, one plain line at most every 30 s in a log.

Every long loop of the pipeline goes through :func:`progress`. In a terminal it is a tqdm bar redrawn once
a second; when stderr is not a terminal (a piped ``dvc repro``, CI, Slurm) it writes a line such as
``train: 450/1000 [01:23<01:40, 5.4it/s, loss=0.31]`` (done/total, elapsed<ETA) when the loop starts, at most
every :data:`LOG_INTERVAL_S` seconds, and when it ends. Quiet mode (a stage's ``--quiet``, or
``UNSEG_QUIET=1``) turns both off; each stage still logs one line when it ends, with its counts and wall time.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

QUIET_ENV = "UNSEG_QUIET"
LOG_INTERVAL_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LogLines:
    """A file for tqdm off a terminal: each redraw becomes one plain line on stderr (no ``\\r``, no bar)."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        pass


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def progress(iterable=None, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``: a bar in a terminal, log lines elsewhere (module docstring); off when
    ``disable`` or quiet."""
    if sys.stderr.isatty():
        kwargs.setdefault("mininterval", 1.0)
    else:
        kwargs.update(file=_LogLines(), mininterval=LOG_INTERVAL_S, bar_format=LOG_FORMAT, dynamic_ncols=False)
        kwargs["desc"] = kwargs.get("desc") or "progress"
    return tqdm(iterable, disable=disable or quiet(), **kwargs)
