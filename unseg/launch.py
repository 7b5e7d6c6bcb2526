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
    """Run ``module`` with this process's arguments under torchrun when ``UNSEG_TORCHRUN`` asks for it, then
    exit with the workers' status; return at once otherwise. torchrun parses only its own options here (its
    command line would read a stage's ``--log`` as an abbreviation of its own ``--log-dir``)."""
    options = os.environ.get(LAUNCH_ENV, "").strip()
    if not options or "LOCAL_RANK" in os.environ:  # not asked for, or already one of torchrun's workers
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*shlex.split(options), "-m", module])
    args.training_script_args = sys.argv[1:]
    print(
        f"[launch] torch.distributed.run {options} -m {module} {shlex.join(sys.argv[1:])}", file=sys.stderr, flush=True
    )
    try:
        run(args)
    except ChildFailedError as err:  # the failing worker printed its own error
        sys.exit(next(iter(err.failures.values())).exitcode or 1)
    sys.exit(0)
