"""Process-level performance settings for CPU training."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from mbplan import fast

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep freed tensor memory in glibc's heap instead of returning it to the OS.

    PyTorch allocates many 0.1–10 MB activations per update; with glibc's default thresholds each
    one is a fresh ``mmap`` that page-faults on first touch and is ``munmap``-ed when freed. Raising
    the mmap and trim thresholds reuses heap memory instead (about 25% faster updates measured on a
    2-core CPU). Same effect as ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``.

    Returns:
        True if applied (glibc on Linux, fast paths on), else False.
    """
    if not fast.enabled() or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        return False
    return bool(ok)
