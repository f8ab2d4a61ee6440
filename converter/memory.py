"""Give freed heap memory back to the system between the converter's phases.

Each phase (dequantize, fit, encode, hot rows, head) makes and frees many temporaries of a
few to a few tens of MB. glibc keeps such freed blocks in its heap, so without a trim the
peak RSS is the sum of the phases' peaks rather than the largest one (Gemma-3, --target-bpw
1.6: 2.2 GB against 1.9 GB with trims). Lowering malloc's mmap threshold does the same for
every block, at a third more conversion time; a trim between phases costs milliseconds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim() -> None:
    # reference cycles first: the source model that wrote the prior's documents (its llama.cpp
    # context, about 0.6 GB on Gemma-3) waited in one for the collector until the Fisher pass
    gc.collect()
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def peak_rss() -> int | None:
    """This process's peak resident set so far, in bytes (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS counts bytes, Linux KiB
