"""The one file writer: temp file beside the target, fsync, rename over it, then fsync of the folder (POSIX
durability)."""
import os
import stat

import pytest
import torch

from util import atomic
from util.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text


@pytest.fixture
def syscalls(monkeypatch) -> list[tuple]:
    """Every os.open, os.fsync, os.replace and os.close the writer makes, in order: ("open", path, fd),
    ("fsync", fd), ("replace", source, target), ("close", fd). The real calls still happen."""
    log: list[tuple] = []
    real_open, real_fsync, real_replace, real_close = os.open, os.fsync, os.replace, os.close

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        log.append(("open", os.fspath(path), fd))
        return fd

    def recording_fsync(fd):
        log.append(("fsync", fd if isinstance(fd, int) else fd.fileno()))
        return real_fsync(fd)

    def recording_replace(source, target):
        log.append(("replace", os.fspath(source), os.fspath(target)))
        return real_replace(source, target)

    def recording_close(fd):
        log.append(("close", fd))
        return real_close(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(os, "close", recording_close)
    return log


@pytest.mark.parametrize("write", [
    lambda path: atomic_write_bytes(path, b"\x00\x01 bytes"),
    lambda path: atomic_write_text(path, "text ✓"),
    lambda path: atomic_torch_save({"w": torch.ones(2)}, path),
])
def test_the_file_is_fsynced_before_the_rename_and_its_folder_after(tmp_path, syscalls, write):
    target = tmp_path / "sub" / "file.bin"
    write(target)

    (replace,) = [call for call in syscalls if call[0] == "replace"]
    position = syscalls.index(replace)
    temporary = replace[1]
    assert replace[2] == str(target) and os.path.dirname(temporary) == str(target.parent)
    # Before the rename: an fsync of the temporary file's own descriptor, so its bytes are on disk first.
    fsynced_before = [call[1] for call in syscalls[:position] if call[0] == "fsync"]
    assert fsynced_before, "the file's data was not fsynced before the rename"
    # After it: the folder is opened, fsynced (that makes the rename itself durable) and closed.
    after = syscalls[position + 1 :]
    folder_fds = [call[2] for call in after if call[0] == "open" and call[1] == str(target.parent)]
    assert len(folder_fds) == 1, f"the folder was not opened after the rename: {after}"
    fd = folder_fds[0]
    assert ("fsync", fd) in after and after.index(("fsync", fd)) < after.index(("close", fd))
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temporary file left


def test_a_new_file_gets_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp makes owner-only files; the writer gives the file what open() would (0o666 less the umask)."""
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")

    def failing(file):
        file.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic.atomic_write(target, failing)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
