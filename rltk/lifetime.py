"""Processes that must not outlive their parent: reward workers, ranks under a launcher.

Standard library only, so a freshly forked or spawned process can call it before anything else loads.
"""

from __future__ import annotations

import ctypes
import os
import sys

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int, sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent's starting thread exits (Linux).

    The kernel ties the signal to the *thread* that started this process, not to the parent process. Returns
    False when ``parent`` is already gone (it died before the request took effect, so no signal will come):
    the caller then exits by itself. Elsewhere than Linux, a no-op that returns True.
    """
    if not sys.platform.startswith("linux"):
        return True
    # c_ulong because prctl is variadic; it cannot fail with these arguments
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0)
    return os.getppid() == parent
