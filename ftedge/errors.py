"""User-facing errors: one clear line (what, where, how to fix), exit code 2."""

from __future__ import annotations

import errno
import os


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


class DiskFullError(FtedgeError):
    """No space left where ftedge writes: nothing further can be built, so the stage stops."""


class GateFailedError(FtedgeError):
    """An artifact failed its parity gate."""

    exit_code = 3


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def from_os_error(err: OSError, path: str | os.PathLike[str], *, action: str = "write") -> FtedgeError:
    """An OSError a user can cause (no space, read-only, no permission, missing folder) as one line naming the path."""
    reason = err.strerror or str(err)
    if err.errno in _NO_SPACE:
        return DiskFullError(f"no space left to {action} {path}", hint="free disk space or pick another run folder; nothing was recorded")
    if err.errno == errno.EROFS:
        return FtedgeError(
            f"cannot {action} {path}: read-only file system", hint="pick a writable folder (e.g. --run-dir on a writable disk)"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return FtedgeError(f"cannot {action} {path}: permission denied", hint="fix the folder's permissions or pick another folder")
    if err.errno == errno.ENOENT:
        return FtedgeError(f"cannot {action} {path}: a folder on the way does not exist", hint="create it or fix the path")
    return FtedgeError(f"cannot {action} {path} ({reason})", hint="check the path and the disk")
