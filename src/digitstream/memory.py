"""How the C allocator hands memory to a process that classifies batches.

A batch makes NumPy temporaries of a few hundred KiB to a few MiB each. glibc
serves allocations from 128 KiB up (a threshold it raises, within limits, as it
sees them freed) with ``mmap`` and gives the pages back on ``free``, and it
trims the top of its heap once 128 KiB there is free. Either way the next
batch's temporaries fault their pages in again: tens of thousands of page
faults a second, each one a kernel entry and a page zeroed, at a few hundred
thousand json frames a second. :func:`keep_batch_memory` fixes both thresholds
well above a batch's needs, so that the memory a batch frees serves the next.
"""

from __future__ import annotations

import ctypes

#: ``mallopt`` parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: allocations up to this size come from the heap, and stay there once freed
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap beyond this goes back to the system
TRIM_THRESHOLD = 128 << 20


def keep_batch_memory() -> bool:
    """Fix the C allocator's thresholds (see the module doc); False where the C library
    has no ``mallopt`` or refuses (it then keeps its own)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
