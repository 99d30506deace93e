"""Run work over a batch in chunks, halving the chunk on CUDA out-of-memory and retrying."""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def map_batches(fn: Callable[[int, int], torch.Tensor], n: int, batch_size: int, what: str = "batch") -> torch.Tensor:
    """``cat([fn(lo, hi) for consecutive chunks of range(n)])`` with chunks of at most ``batch_size``.

    On an out-of-memory error the failed chunk is retried with half the batch size (logged), down
    to 1; the smaller size is kept for the remaining chunks. Any other error propagates.
    """
    if n == 0:
        raise ValueError(f"{what}: nothing to process")
    parts, lo, size = [], 0, max(1, int(batch_size))
    while lo < n:
        hi = min(n, lo + size)
        try:
            parts.append(fn(lo, hi))
        except Exception as e:  # noqa: BLE001  (only out-of-memory is handled, the rest re-raised)
            if not _is_oom(e) or size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, size // 2)
            log.warning("%s: out of memory with batch size %d; retrying with %d", what, hi - lo, size)
            continue
        lo = hi
    return torch.cat(parts)
