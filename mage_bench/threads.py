"""CPU threads: the cores this process may use, and a block run on a fixed number of threads (torch's and
the BLAS and OpenMP pools'), as the local executor gives each run (`executor.threads`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under Slurm or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """`threads` threads for torch and for the BLAS and OpenMP pools loaded (numpy, scipy, scikit-learn,
    faiss) inside the block (None: unchanged), restored after it."""
    if threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


# Read by BLAS and OpenMP runtimes when they load: set before loading any this process has not yet.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_limits: Any = None  # this process's threadpoolctl limits, kept for its life


def use_threads_from_now(threads: int) -> None:
    """This process (a worker) on `threads` threads for the rest of its life: torch, the BLAS and OpenMP pools
    loaded, and those loaded later (their env variables), so that W workers never run W x cores threads."""
    global _limits
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    _limits = threadpool_limits(limits=threads)
