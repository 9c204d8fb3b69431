"""User-facing errors: one clear line (what, where, how to fix), exit code 2."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class FtedgeError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (fix: {' '.join(self.hint.split())})"
        return text


class StageMissingError(FtedgeError):
    """A stage's input (a predecessor's output) is not in the run."""


class DiskError(FtedgeError):
    """The file system refused (no space, read-only, no permission): nothing further can be written, so a stage stops."""


class DiskFullError(DiskError):
    """No space left where ftedge writes: nothing further can be built, so the stage stops."""


class GateFailedError(FtedgeError):
    """An artifact failed its parity gate."""

    exit_code = 3


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Causes a library or a subprocess names in its error text: "[Errno 28]" (Python), "(os error 28)" (Rust:
# safetensors, tokenizers), or the C library's words. Checked in this order.
_ERRNO_IN_TEXT = (re.compile(r"\[Errno (\d+)\]"), re.compile(r"\(os error (\d+)\)"), re.compile(r"Os \{ code: (\d+)"))
_CAUSE_WORDS = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", getattr(errno, "EDQUOT", errno.ENOSPC)),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
    ("Operation not permitted", errno.EPERM),
)
USER_CAUSED_ERRNOS = {*_NO_SPACE, errno.EROFS, errno.EACCES, errno.EPERM}
NEARLY_FULL_BYTES = 1 << 20  # a write that failed with less free space than this ran out of space


def from_os_error(
    err: OSError, path: str | os.PathLike[str] | None = None, *, action: str = "write", hint: str | None = None
) -> FtedgeError:
    """An OSError a user can cause (no space, read-only, no permission, missing folder) as one line naming the path.

    ``path`` defaults to the file the error names. ``hint`` replaces the generic fix.
    """
    where = str(path) if path is not None else str(err.filename or "a file")
    if err.errno in _NO_SPACE:
        return DiskFullError(
            f"no space left to write {where}", hint=hint or "free disk space or use a folder on a bigger disk; nothing was recorded"
        )
    if err.errno == errno.EROFS:
        return DiskError(
            f"cannot write {where}: read-only file system", hint=hint or "remount it read-write or use a folder on a writable disk"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return DiskError(
            f"cannot {action} {where}: permission denied",
            hint=hint
            or (
                "give your user access to it (chmod/chown) or use a folder you can write to"
                if action == "write"
                else "give your user access to it (chmod/chown)"
            ),
        )
    if err.errno == errno.ENOENT:
        return FtedgeError(f"cannot {action} {where}: it or a folder on the way does not exist", hint=hint or "create it or fix the path")
    if err.errno == errno.ENOTDIR:
        return FtedgeError(f"cannot {action} {where}: a part of the path is a file, not a folder", hint=hint or "fix the path")
    if err.errno == errno.EEXIST:
        return FtedgeError(f"cannot {action} {where}: it already exists", hint=hint or "remove it or pick another path")
    reason = err.strerror or str(err)
    return FtedgeError(f"cannot {action} {where} ({reason})", hint=hint or "check the path and the disk")


def os_error_in(text: str, folder: str | os.PathLike[str] | None = None) -> OSError | None:
    """The OS cause a library's or a subprocess's error text names (``[Errno 28]``, ``os error 30``, ``Permission denied``).

    When the text names none and ``folder``'s disk is (nearly) full, the cause is no space: a write that
    failed there ran out of it, whatever the library said (a converter's progress bar, "file write failed").
    Returns None when no cause a user can fix is found.
    """
    for pattern in _ERRNO_IN_TEXT:
        for found in pattern.finditer(text or ""):
            code = int(found.group(1))
            if code in USER_CAUSED_ERRNOS:
                return OSError(code, os.strerror(code))
    for words, code in _CAUSE_WORDS:
        if words in (text or ""):
            return OSError(code, os.strerror(code))
    if folder is not None and free_bytes(folder) < NEARLY_FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def free_bytes(folder: str | os.PathLike[str]) -> int:
    """Free bytes on the disk holding ``folder`` (or its nearest existing parent); a very large number when unknown."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def check_free_space(folder: str | os.PathLike[str], needed: int, what: str) -> None:
    """Refuse to start writing ``what`` (about ``needed`` bytes) into ``folder`` when its disk has less free; say both figures."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(
            f"not enough disk space for {what} in {folder}: it needs about {human_bytes(needed)}, {human_bytes(free)} free",
            hint="free disk space or use a folder on a bigger disk; nothing was recorded",
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
