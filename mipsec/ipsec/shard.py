"""Which of a GW's worker processes holds an ESP SA: the one its inbound SPI selects.

The kernel splits the GW's ESP between worker processes by SPI (``mipsec.io.bpf``): SPI ``s``
goes to worker ``s % workers``.  The SPIs the GW allocates for an MN (IKE's inbound SPIs) are
chosen with ``spi_for_worker`` so that all of one MN's SAs land in one worker.
"""

from __future__ import annotations

MAX_WORKERS = 1024             # what the BPF programs are built for (and far more than cores)


def check_workers(workers: int, index: int | None = None) -> None:
    if not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers {workers!r}: must be an integer in 1 .. {MAX_WORKERS}")
    if index is not None and not (isinstance(index, int) and 0 <= index < workers):
        raise ValueError(f"worker index {index!r}: must be in 0 .. {workers - 1}")


def spi_for_worker(candidate: int, workers: int, index: int) -> int:
    """The SPI nearest above ``candidate`` (or equal) that ``worker index`` receives."""
    check_workers(workers, index)
    spi = candidate + (index - candidate) % workers
    if spi > 0xFFFFFFFF:
        spi -= workers
    return spi


def worker_of(spi: int, workers: int) -> int:
    """The worker that receives (and owns the SA of) ``spi``."""
    check_workers(workers)
    return spi % workers
