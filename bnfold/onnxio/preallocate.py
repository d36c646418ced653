"""Reserve a file's blocks before writing it: a large model is written about 3× faster.

On ext4, writing 100 MB into an empty file allocates its blocks page by page as the writes
arrive; measured here, that took 0.05–0.25 s of a fold whose other work on ResNet-50 is 0.04 s.
One fallocate(2) of the known size beforehand brought the same write to about 0.02 s (xfs and
btrfs reserve the same way; not measured here). FALLOC_FL_KEEP_SIZE leaves the file's length
alone, so what was written is what the file holds even if the reservation were too large.

Best effort: Linux only, through the C library's own fallocate (glibc's posix_fallocate would
instead write zeros where the file system cannot reserve, doubling the write); any failure
(ENOTSUP, no space to reserve, no such symbol) writes the file as before.
"""

from __future__ import annotations

import functools
import sys

MIN_BYTES = 8 << 20  # below this the page-by-page allocation costs little
_KEEP_SIZE = 0x01  # FALLOC_FL_KEEP_SIZE


@functools.cache
def _fallocate():
    """libc's fallocate, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # fallocate64 takes a 64-bit offset on every ABI; plain fallocate does where off_t is
        # 64-bit (every 64-bit Linux)
        function = getattr(libc, "fallocate64", None)
        if function is None and ctypes.sizeof(ctypes.c_long) == 8:
            function = libc.fallocate
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        function.restype = ctypes.c_int
    return function


def reserve(handle, nbytes: int) -> bool:
    """Reserve `nbytes` of blocks for the file behind `handle` (an open binary file), from its
    start, without changing its length; returns whether it was done."""
    if nbytes < MIN_BYTES:
        return False
    function = _fallocate()
    if function is None:
        return False
    try:
        descriptor = handle.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream
        return False
    return function(descriptor, _KEEP_SIZE, 0, nbytes) == 0
