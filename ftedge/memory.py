"""Peak resident memory of this process.

`getrusage(RUSAGE_SELF).ru_maxrss` is wrong for child processes on Linux: the kernel
carries the parent's high-water mark across fork + exec, so every bench worker spawned
from a big `ftedge run` process would report the parent's peak. `VmHWM` in
/proc/self/status belongs to the process's own address space and starts fresh at exec.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in _STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)  # KiB on Linux, bytes on macOS
