"""Reading and writing the files a user names, so that no path can make the program hang, fill its
memory or replace something that is not a plain file.

Reads check the file's type and size first, then read at most the limit plus one byte: a FIFO with
no writer, /dev/zero or a 3 GB sparse file costs nothing. Writes replace a regular file through a
temporary file and a rename (a reader sees the old file or the new one, never a mix, and a full
disk leaves the old one), on the file a symlink points to, keeping its mode and owner. Devices,
FIFOs, sockets and files with other hard links are never replaced: they are refused, or, where
writing to a stream is the point (`/dump /dev/stdout`), written directly.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from gemmachat.errors import UserError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # open a FIFO without waiting for its other end
_CHUNK = 1 << 20


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _kib(size: int) -> str:
    return f"{size // 1024} KiB"


class MissingFile(UserError):
    """The path names nothing (some callers go on without the file)."""


def read_file(path: Path, limit: int, rule: str, *, streams: bool = False, name: str = "") -> bytes:
    """The bytes of `path`, refused in one line if there are more than `limit`: "{name} PATH is N
    KiB; {rule} up to M KiB". A FIFO or a device is refused unless `streams` (reading a stream is
    the point: `-f <(command)`), and then read as it comes."""
    shown = f"{name} {path}" if name else str(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise MissingFile(f"cannot read {shown}: no such file") from None
    except OSError as error:
        raise UserError(f"cannot read {shown}: {error.strerror or error}") from None
    try:  # before fdopen, which refuses a directory with a traceback of its own
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            if info.st_size > limit:  # a sparse 3 GB file is refused without reading it
                raise UserError(f"{shown} is {_kib(info.st_size)}; {rule} up to {_kib(limit)}")
        elif streams and not stat.S_ISDIR(info.st_mode):
            os.set_blocking(fd, True)
        else:
            raise UserError(f"cannot read {shown}: it is {_kind(info.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as file:
        return read_stream(file, limit, shown, rule)


def read_stream(stream: BinaryIO, limit: int, name: str, rule: str) -> bytes:
    """At most `limit` bytes of an open stream (stdin, a file), refused in one line if it holds
    more; never more than limit + 1 bytes are read."""
    chunks: list[bytes] = []
    remaining = limit + 1
    # read1: what one read of the file gives. read() goes on to fill its size, so on a terminal
    # the ctrl-d that ends a line of text was taken as more to wait for, and it took a second one.
    read = getattr(stream, "read1", stream.read)
    try:
        while remaining > 0:
            chunk = read(min(remaining, _CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as error:
        raise UserError(f"cannot read {name}: {error.strerror or error}") from None
    if remaining <= 0:
        raise UserError(f"{name} is more than {_kib(limit)}; {rule} up to {_kib(limit)}")
    return b"".join(chunks)


def set_aside(path: Path, companions: tuple[str, ...] = ()) -> Path:
    """Rename a damaged file out of the way, keeping it for the user, and return its new name:
    NAME.corrupt, or NAME.corrupt-2, -3, ... beside an earlier one, which a second damage used to
    replace. `companions` are suffixes of files that go with it (a database's "-wal"), moved under
    the new name where they exist. Raises OSError."""
    count = 1
    while True:
        aside = path.with_name(f"{path.name}.corrupt{f'-{count}' if count > 1 else ''}")
        if not any(os.path.lexists(f"{aside}{suffix}") for suffix in ("", *companions)):
            break
        count += 1
    os.replace(path, aside)
    for suffix in companions:
        try:
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    return aside


def write_file(path: Path, data: bytes, *, streams: bool = False,
               replaces: tuple[Callable[[bytes], bool], str] | None = None) -> None:
    """Put `data` in the file `path` names, or refuse in one line. A regular file (or the one a
    symlink points to) is replaced atomically and keeps its mode; a new one is private (0600).
    With `streams`, a FIFO or a character device (/dev/stdout, a terminal) is written directly.
    With `replaces` (a test of the old file's first bytes, and what it is called), a file that is
    not empty is replaced only if it passes: an earlier save, not the user's notes."""
    path = Path(path)
    try:
        existing: os.stat_result | None = os.stat(path)  # through symlinks: what a write would reach
    except FileNotFoundError:
        existing = None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        if streams and (stat.S_ISFIFO(existing.st_mode) or stat.S_ISCHR(existing.st_mode)):
            _write_stream(path, data)
            return
        raise UserError(f"cannot write {path}: it is {_kind(existing.st_mode)}, not a regular file")
    if existing is not None and existing.st_nlink > 1:
        raise UserError(f"cannot write {path}: it has {existing.st_nlink} hard links, which replacing it "
                        "would cut (write elsewhere, or remove the other links)")
    if existing is not None and existing.st_size and replaces is not None:
        passes, kind = replaces
        try:
            with open(path, "rb") as old:
                head = old.read(_CHUNK)
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None
        if not passes(head):
            raise UserError(f"not replacing {path}: it is not {kind} (choose another name, or remove it first)")
    _replace(Path(os.path.realpath(path)), data, existing, shown=path)


def _write_stream(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | _NONBLOCK | _CLOEXEC)  # a FIFO nobody reads: ENXIO, not a hang
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except OSError as error:
        reason = "nothing is reading it" if error.errno == errno.ENXIO else error.strerror or error
        raise UserError(f"cannot write {path}: {reason}") from None


def _replace(target: Path, data: bytes, existing: os.stat_result | None, shown: Path) -> None:
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as out:
            if existing is not None:
                os.chmod(temporary, stat.S_IMODE(existing.st_mode))
                if hasattr(os, "chown") and (existing.st_uid, existing.st_gid) != (os.getuid(), os.getgid()):
                    try:  # root writing another user's file: it stays theirs
                        os.chown(temporary, existing.st_uid, existing.st_gid)
                    except PermissionError:
                        pass
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
        temporary = None
    except OSError as error:
        raise UserError(f"cannot write {shown}: {error.strerror or error}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def locked(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Holds an exclusive lock on the file `path` (made if missing), waiting for another process
    that holds it (`waiting` is called first, to say so). Without fcntl (Windows), nothing is locked."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o600)
    except OSError as error:
        raise UserError(f"cannot lock {path}: {error.strerror or error}") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is not None:
                    waiting()
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # which releases the lock
