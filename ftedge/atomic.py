"""Atomic file and folder writes: write to a temp sibling, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftedge.errors import USER_CAUSED_ERRNOS, FtedgeError, from_os_error, os_error_in


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync'd temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (file or folder); rename it into place on success.

    On any exception the temp path is removed and ``path`` is left untouched. An existing
    ``path`` is replaced only once the new one is complete. What lands at ``path`` has the
    usual permissions (0644 files, 0755 folders under the usual umask), whatever mode the
    library that wrote it chose. A write that fails for a reason the user can fix (no space,
    read-only, no permission; an OSError or a library's error naming one) becomes one line
    naming ``path`` (``ftedge.errors.from_os_error``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise from_os_error(err, path) from None
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        try:
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written to {tmp}")
            usual_modes(tmp)
            if path.is_dir() and not path.is_symlink():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except FtedgeError:
            raise
        except Exception as err:
            cause = write_cause(err, tmp, path)
            if cause is None:
                raise
            raise from_os_error(cause, path) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_cause(err: BaseException, tmp: Path, path: Path) -> OSError | None:
    """The user-fixable OS cause of a failed write of ``path`` (via ``tmp``), or None when it is something else.

    An OSError counts when it is about the written files (or names none); a library's error when its
    text names a cause, or when the disk is full now (checked before the partial output is removed).
    """
    if isinstance(err, OSError):
        named = str(err.filename or "")
        ours = not named or named.startswith((str(tmp), str(path))) or Path(named).parent == path.parent
        return err if ours and err.errno in USER_CAUSED_ERRNOS else None
    return os_error_in(str(err), path.parent)


def usual_modes(root: Path) -> None:
    """Give ``root`` (and everything under it) the mode a plain file or folder gets under the umask."""
    mask = _umask()
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        want = (0o777 if p.is_dir() or mode & 0o111 else 0o666) & ~mask
        if mode & 0o777 != want:
            os.chmod(p, want)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_path(path: Path) -> tuple[int, str]:
    """Size in bytes and sha256 of a file, or of a folder (hash over sorted relative paths + file hashes)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    h = hashlib.sha256()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        total += f.stat().st_size
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
    return total, h.hexdigest()
