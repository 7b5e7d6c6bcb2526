"""Run a stage under ``torchrun`` without changing its ``dvc.yaml`` command.

``UNSEG_TORCHRUN`` holds torchrun's options; a stage that supports DDP / sharding re-executes itself as
``python -m torch.distributed.run <options> -m stages.<name> <its arguments>`` when the variable is set
and it is not already a torchrun worker. One machine with 4 processes::

    UNSEG_TORCHRUN="--standalone --nproc_per_node 4" dvc repro

Several machines: the same ``dvc repro`` (or the stage's command from ``dvc.yaml``) on each node, with
``UNSEG_TORCHRUN="--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id JOB"``.
"""

from __future__ import annotations

import os
import shlex
import sys

LAUNCH_ENV = "UNSEG_TORCHRUN"


def relaunch_under_torchrun(module: str) -> None:
    """Replace this process by torchrun running ``module`` when ``UNSEG_TORCHRUN`` asks for it."""
    options = os.environ.get(LAUNCH_ENV, "").strip()
    if not options or "LOCAL_RANK" in os.environ:  # not asked for, or already one of torchrun's workers
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", *shlex.split(options), "-m", module, *sys.argv[1:]]
    print(f"[launch] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)
