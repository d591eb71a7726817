"""CPU threads: the cores this process may use, and a block run on a fixed number of threads (torch's and
the BLAS and OpenMP pools'), as the local executor gives each run (`executor.threads`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


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
