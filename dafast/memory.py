"""dafast's caching allocator for large CPU tensors (csrc/cpu/caching_allocator.cpp).

    with dafast.memory.caching_cpu_allocator():
        trainer.train()

While it is on, every CPU tensor of 1 MiB or more gets its own memory mapping, which goes back
to a cache when the tensor is freed and is handed to the next tensor of its size class. The
shapes of a training step repeat layer after layer and step after step, so nearly every request
is served from the cache; a request that misses first gives back as many bytes of the oldest
cached blocks as it needs. Peak RSS therefore follows the bytes the tensors really hold, where
glibc's heap keeps the holes between long- and short-lived activations resident, and no page is zero-filled again, as it would be with
MALLOC_MMAP_THRESHOLD_.

Smaller tensors go to c10::alloc_cpu as before. Off, torch's own allocator is back and the cached
blocks are returned to the system; tensors allocated meanwhile stay valid and give their memory
back when freed. The stages turn it on around training (recipe field `cpu_allocator`). The
allocator is process-wide: turn it on from the main thread, not while other threads allocate.
Without the native extension the functions do nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from dafast._native import _C

__all__ = ["caching_cpu_allocator", "enable", "disable", "enabled", "empty_cache", "stats",
           "reset_peak"]


def enable() -> None:
    """Make the caching allocator torch's CPU allocator (idempotent)."""
    if _C is not None:
        _C.cpu_allocator_enable()


def disable() -> None:
    """Give torch its own CPU allocator back and return the cached blocks (idempotent)."""
    if _C is not None:
        _C.cpu_allocator_disable()


def enabled() -> bool:
    return _C is not None and _C.cpu_allocator_enabled()


def empty_cache() -> None:
    """Return the cached (freed) blocks to the system now."""
    if _C is not None:
        _C.cpu_allocator_empty_cache()


def stats() -> dict[str, int]:
    """live_bytes, cached_bytes, peak_bytes (live + cached), hits, misses, evictions (counted
    since it was last turned on; the peak also since reset_peak), and min_bytes (the smallest
    request it caches). Empty without the extension."""
    if _C is None:
        return {}
    return {**_C.cpu_allocator_stats(), "min_bytes": _C.cpu_allocator_min_bytes()}


def reset_peak() -> None:
    if _C is not None:
        _C.cpu_allocator_reset_peak()


@contextlib.contextmanager
def caching_cpu_allocator(on: bool = True) -> Iterator[None]:
    """The caching allocator for the enclosed block (``on=False``: leave the allocator as it is).
    It stays on if it already was."""
    if not on or enabled():
        yield
        return
    enable()
    try:
        yield
    finally:
        disable()
