"""The one way this project writes a file: to a temporary file beside it, fsync, rename over it, fsync the
folder.

A run killed at any moment (or a machine that loses power) leaves either the old file or the new
one, never a truncated one. Checkpoints, resume files, logs, results tables and pictures all go
through `atomic_write`. A write that fails (disk full, read-only, no permission) removes its
temporary file and ends the run with one line naming the file (`WriteFailed`).

Also here: checking output paths before the slow work (`check_output_folder`, `check_output_file`)
and the lock file that keeps two runs from writing the same files at once (`exclusive_lock`).
"""
import contextlib
import errno
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from util.errors import DraemInputError, WriteFailed


def _umask_permissions() -> int:
    """The mode a plain `open()` would give a new file (mkstemp's temp files are owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    """What an OSError means for the user, and the fix."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}: free some space, or choose another folder"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{reason}: choose a folder you can write in"
    return reason


class _FullWrites:
    """An unbuffered file whose `write` writes everything or raises the OSError.

    Unbuffered, so a full disk raises ENOSPC at the write itself; short writes (possible on raw files) are
    completed here. torch.save can still turn the OSError into an unrelated RuntimeError ("unexpected pos"),
    so the first OSError is kept in `error` for `atomic_write` to report.
    """

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while len(view):
                view = view[self._file.write(view):]
        except OSError as exc:
            self.error = self.error or exc
            raise
        return size

    def flush(self) -> None:
        self._file.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then fsync it and rename it over `path`, creating
    folders.

    An OSError on the way (disk full, read-only, no permission, a folder in the way) removes the temporary
    file and is a one-line WriteFailed naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb", buffering=0) as file:
            writer = _FullWrites(file)
            try:
                write(writer)
            except Exception:
                if writer.error is not None:  # the disk's error, whatever the writer made of it
                    raise writer.error from None
                raise
            os.fsync(file.fileno())
        os.chmod(tmp, _umask_permissions())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise WriteFailed(f"cannot write {path} ({_why(exc)})") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically."""
    atomic_write(path, lambda file: torch.save(obj, file))


def check_output_folder(folder: str | os.PathLike, flag: str) -> Path:
    """Make sure files can be written in `folder` (created if absent) before any slow work; a one-line error
    if not.

    Probed by creating and removing a temporary file there, which also answers for read-only file systems and
    for permissions that `os.access` would misjudge (root, ACLs).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DraemInputError(f"{flag} {folder} is a file, not a folder: give a folder (or remove the file)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DraemInputError(f"{flag} {folder}: cannot write there ({_why(exc)})") from None
    return folder


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Make sure `path` can be written as a file (not a folder; its folder writable) before any slow work."""
    path = Path(path)
    if path.is_dir():
        raise DraemInputError(f"{flag} {path} is a folder, not a file: give a file name (or move the folder "
                              f"away)")
    check_output_folder(path.parent, f"the folder of {flag}")
    return path


def check_output_files(paths: Sequence[Path], what: str) -> None:
    """None of `paths` (files a run will write) may be a folder: found now, not when the file is written."""
    for path in paths:
        if path.is_dir():
            raise DraemInputError(f"{path} is a folder, where {what} is to be written: move the folder away")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _lock_owner(lock: Path) -> tuple[str, int] | None:
    """(host, pid) written in a lock file, or None when it holds neither (a run killed while writing it)."""
    try:
        host, _, pid = lock.read_text(encoding="utf-8").strip().partition(" pid ")
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _take_lock(lock: Path, what: str) -> None:
    """Create `lock` exclusively, holding this host and pid; a stale lock (its process has ended) is taken
    over."""
    me = f"{socket.gethostname()} pid {os.getpid()}\n"
    for _ in range(2):  # the second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and (owner[0] != socket.gethostname() or _pid_alive(owner[1])):
                raise DraemInputError(
                    f"another run (pid {owner[1]} on {owner[0]}) is writing {what}: wait for it, or choose "
                    f"another folder; if no such run is going on, delete {lock}") from None
            lock.unlink(missing_ok=True)  # its process is gone (killed, or the machine restarted)
            continue
        except OSError as exc:
            raise DraemInputError(f"cannot create lock file {lock} ({_why(exc)})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(me)
        return
    raise DraemInputError(f"cannot take lock file {lock}: another run keeps creating it; wait for it to "
                          f"finish")


@contextlib.contextmanager
def exclusive_lock(locks: Sequence[tuple[Path, str]]) -> Iterator[None]:
    """Hold lock files (path, what it protects) for the duration: a second run asking for one of them is
    refused.

    Each holds `<host> pid <pid>`. A run killed with SIGKILL leaves its lock behind; the next run sees that
    the pid is no longer alive on this host and takes the lock over, so a killed run never blocks the folder.
    """
    taken: list[Path] = []
    try:
        for path, what in locks:
            lock = Path(os.path.abspath(path))
            if lock in taken:  # the checkpoint and the log folder may be one folder
                continue
            _take_lock(lock, what)
            taken.append(lock)
        yield
    finally:
        for lock in taken:
            if _lock_owner(lock) == (socket.gethostname(), os.getpid()):
                lock.unlink(missing_ok=True)
