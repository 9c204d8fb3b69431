"""Peak memory of this process: resident host memory, and GPU memory where CUDA is in use.

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


def peak_gpu_mb() -> float | None:
    """Peak GPU memory allocated by PyTorch in this process, in MiB (``torch.cuda.max_memory_allocated``,
    summed over devices); None where CUDA was never initialised (CPU runs)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
