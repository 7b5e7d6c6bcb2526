"""What every stage script shares: argument parsing, params loading and clean failure.

A user mistake (``UserError``, including bad params) prints one line ``<stage>: error: ...`` and
exits with status 2; Ctrl-C or SIGTERM exits with 130 and leaves only ``.partial`` scratch behind, which
the next run resumes or discards (a training stage first finishes its step and writes a checkpoint).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from unseg.errors import UserError
from unseg.params import Params, load_params
from unseg.progress import QUIET_ENV, quiet

PARAMS_FILE = "params.yaml"


def log(stage: str, message: str) -> None:
    """One line ``[stage] message`` on stderr; in quiet mode only warnings are printed."""
    if not quiet() or message.lower().startswith("warning"):
        print(f"[{stage}] {message}", file=sys.stderr, flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (Slurm, `kill`, a CI timeout) takes the same clean path as Ctrl-C


def run_stage(name: str, main: Callable[[argparse.Namespace, Params], None], parser: argparse.ArgumentParser) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--quiet", action="store_true", help=f"no progress bars, warnings only (or {QUIET_ENV}=1)")
    args = parser.parse_args()
    if args.quiet:
        os.environ[QUIET_ENV] = "1"
    start = time.time()
    try:
        params = load_params(Path(args.params))
        log(name, f"start ({args.params}, pid {os.getpid()})")
        main(args, params)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"{name}: interrupted{f' ({err})' if str(err) else ''}; rerun to resume", file=sys.stderr)
        sys.exit(130)
    log(name, f"done in {time.time() - start:.1f} s")


def write_text(path: Path, text: str) -> Path:
    """Write a stage's small output (a metrics json) to a temporary file beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def parser(description: str, *paths: str) -> argparse.ArgumentParser:
    """An argument parser taking the given positional paths (deps first, then outs, as in dvc.yaml)."""
    ap = argparse.ArgumentParser(description=description)
    for p in paths:
        ap.add_argument(p, type=Path)
    return ap
