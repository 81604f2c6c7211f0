"""``collie-compile train --nproc-per-node N``: the workers launched from this process as
torchrun launches them (one node, a local rendezvous, no restarts), with a failure shown
once. Under torchrun a refused run prints its one line, then torchrun's report of the
child that failed (about 35 lines); here the job ends with the workers' own line and
their exit status.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid


def launch_workers(nproc: int, argv: list[str]) -> int:
    """Run ``python -m collie_compile *argv`` on ``nproc`` local ranks; their exit status
    (the first failed worker's), after every worker has ended."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    # the agent's own lines (which child failed, the SIGTERMs to the others): the workers
    # have said what matters
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "collie_compile", *argv)
    except ChildFailedError as e:  # each worker has said why (rank 0 alone, when agreed)
        # rank 0's status speaks for the job: a peer may fail after it (its collective
        # broken by rank 0's exit) with another code
        failed = sorted(e.failures.items())
        codes = [f.exitcode for rank, f in failed if rank == 0] + [f.exitcode for _, f in failed]
        return next((c for c in codes if c > 0), 1)
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc-per-node N`` (the workers must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out
