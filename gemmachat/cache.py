"""The user cache folder: what it holds (`--cache-info`), and cleaning up after older builds.

The single file's launcher unpacks each build's program into CACHE/app/<app id> and, on Linux and
macOS, holds a shared lock on CACHE/app/<app id>.lock for as long as that program runs (the lock's
descriptor survives its exec). A program folder whose lock nobody holds belongs to no running
process, so a newer build may remove it: it takes the lock exclusively, renames the folder aside
(a launcher arriving later finds no program and unpacks it afresh), drops the lock file and only
then deletes. On Windows a folder whose program runs cannot be renamed, which is the same test.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from gemmachat.bundle import BUNDLE_VARIABLE, read_trailer
from gemmachat.errors import UserError
from gemmachat.model_path import cache_dir

_APP_ID = re.compile(r"[0-9a-f]{32}")
# What the launcher leaves when killed while unpacking, what it sets aside, what a cleaner removes.
_LEFTOVER = re.compile(r"(?P<id>[0-9a-f]{32})\.(?P<kind>partial|damaged|removing)-(?P<pid>\d+)(-\d+)?")
# A model copy still being written is touched every few milliseconds; one this old was abandoned.
_STALE_PARTIAL_SECONDS = 600
MB = 1_000_000


@dataclass(frozen=True)
class Entry:
    path: Path
    size: int
    what: str


def _folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we count
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process (EPERM), or we cannot tell: keep its folder
    return True


if os.name == "nt":
    def _claim(folder: Path, aside: Path) -> bool:
        """Rename `folder` to `aside` unless a process runs from it (Windows refuses that)."""
        try:
            folder.rename(aside)
        except OSError:
            return False
        return True

    def _in_use(folder: Path) -> bool:
        return False  # unknown without trying to move it; --cache-info does not
else:
    import fcntl

    def _lock_path(folder: Path) -> Path:
        return folder.with_name(folder.name + ".lock")

    def _claim(folder: Path, aside: Path) -> bool:
        """Rename `folder` to `aside` if no launcher or program holds its lock."""
        lock = _lock_path(folder)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Another cleaner may have removed the lock file between our open and our lock.
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                return False
            folder.rename(aside)
            lock.unlink()
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _in_use(folder: Path) -> bool:
        try:
            fd = os.open(_lock_path(folder), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # no lock file: no launcher has run it since locks exist
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)


def clean(cache: Path, keep: str) -> list[Path]:
    """Remove the program folders of other builds that no process uses, and what killed starts
    left behind; never `keep` (the running build), never anything we did not make. Returns what
    was removed."""
    removed: list[Path] = []
    apps = cache / "app"
    for path in sorted(apps.iterdir()) if apps.is_dir() else []:
        if _APP_ID.fullmatch(path.name) and path.name != keep and path.is_dir():
            aside = apps / f"{path.name}.removing-{os.getpid()}"
            if _claim(path, aside):
                shutil.rmtree(aside, ignore_errors=True)
                removed.append(path)
        elif (leftover := _LEFTOVER.fullmatch(path.name)) and path.is_dir():
            if leftover["kind"] == "damaged" or not _pid_alive(int(leftover["pid"])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    models = cache / "models"
    for path in sorted(models.glob("*.partial")) if models.is_dir() else []:
        try:
            if time.time() - path.stat().st_mtime > _STALE_PARTIAL_SECONDS:
                path.unlink()
                removed.append(path)
        except OSError:
            pass  # finished or removed meanwhile
    return removed


def _clean_quietly(cache: Path, keep: str) -> None:
    try:
        clean(cache, keep)
    except OSError:
        pass  # a cache we cannot tidy is no reason to trouble the start; --cache-info shows it


_cleaning: threading.Thread | None = None  # this start's, for --cache-info to wait for


def clean_in_background(environ: Mapping[str, str]) -> None:
    """From the single file: tidy the cache behind the start (any start, --help included),
    without delaying it. Not a daemon: the program's exit waits for a deletion to end rather than
    leave half a folder."""
    global _cleaning
    bundle = environ.get(BUNDLE_VARIABLE)
    if not bundle:
        return
    try:
        keep = read_trailer(Path(bundle)).app_id
    except UserError:
        return  # the model's resolution says what is wrong with the file
    _cleaning = threading.Thread(target=_clean_quietly, args=(cache_dir(environ), keep),
                                 name="gemma-chat cache cleaning")
    _cleaning.start()


def entries(cache: Path, current: str | None) -> list[Entry]:
    found: list[Entry] = []
    for path in sorted((cache / "app").iterdir()) if (cache / "app").is_dir() else []:
        if _APP_ID.fullmatch(path.name) and path.is_dir():
            if path.name == current:
                what = "program of this build"
            elif _in_use(path):
                what = "program of another build, running now"
            else:
                what = "program of another build (removed at the next start of a newer build)"
            found.append(Entry(path, _folder_size(path), what))
        elif _LEFTOVER.fullmatch(path.name) and path.is_dir():
            found.append(Entry(path, _folder_size(path), "left by an interrupted start (removed at the next start)"))
    for path in sorted((cache / "models").iterdir()) if (cache / "models").is_dir() else []:
        what = "unfinished model copy" if path.name.endswith(".partial") else "model"
        found.append(Entry(path, path.stat().st_size, what))
    for path in sorted((cache / "hub").glob("*/*/*/*")) if (cache / "hub").is_dir() else []:
        what = "unfinished download (-hf resumes it)" if path.name.endswith(".partial") else "model from -hf"
        found.append(Entry(path, path.stat().st_size, what))
    return found


def print_cache_info(environ: Mapping[str, str]) -> int:
    if _cleaning:
        _cleaning.join()
    cache = cache_dir(environ)
    bundle = environ.get(BUNDLE_VARIABLE)
    current = read_trailer(Path(bundle)).app_id if bundle else None
    try:
        listed = entries(cache, current)
    except OSError as error:
        raise UserError(f"cannot read the cache folder {cache}: {error.strerror or error}") from None
    print(f"cache folder: {cache} (GEMMA_CHAT_CACHE_DIR moves it; deleting it is safe)")
    for entry in listed:
        print(f"  {entry.size / MB:9.1f} MB  {entry.path.relative_to(cache)}  {entry.what}")
    if not listed:
        print("  (empty)")
    print(f"  {sum(entry.size for entry in listed) / MB:9.1f} MB  in all")
    return 0
