"""The single file's layout: the launcher, an archive of the frozen program, the GGUF, a trailer.

packaging/build.py writes it, packaging/launcher/launcher.c unpacks the program from it, and the
frozen program reads the trailer again to find the GGUF. The trailer sits at the very end so that
both find it with one read whatever the size of the weights (PyInstaller's own one-file format is
found by scanning backwards, which grows with what follows it). Integers are little-endian.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gemmachat.errors import UserError

# The launcher sets this to its own path before running the unpacked program.
BUNDLE_VARIABLE = "GEMMA_CHAT_BUNDLE"
MAGIC = b"GEMMAPK1"
# app offset, app size, model offset, model size, flags, app id, model SHA-256, model name, magic
TRAILER = struct.Struct("<QQQQQ32s64s256s8s")
# kind ('d', 'f' or 'l'), mode, name length, data length; then the name, then the data
ENTRY = struct.Struct("<BIIQ")
EXTERNAL_MODEL = 1


@dataclass(frozen=True)
class Trailer:
    app_offset: int
    app_size: int
    model_offset: int  # 0 when the GGUF is a separate file beside the executable
    model_size: int
    external_model: bool
    app_id: str  # names the program's folder in the cache: a new build never reuses an old one
    model_sha256: str
    model_name: str

    def pack(self) -> bytes:
        return TRAILER.pack(self.app_offset, self.app_size, self.model_offset, self.model_size,
                            EXTERNAL_MODEL if self.external_model else 0, self.app_id.encode("ascii"),
                            self.model_sha256.encode("ascii"), self.model_name.encode("utf-8"), MAGIC)


def read_trailer(path: Path) -> Trailer:
    try:
        with path.open("rb") as handle:
            handle.seek(-TRAILER.size, os.SEEK_END)
            data = handle.read(TRAILER.size)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) != TRAILER.size or not data.endswith(MAGIC):
        raise UserError(f"{path} carries no model: it is truncated or was not made by packaging/build.py")
    app_offset, app_size, model_offset, model_size, flags, app_id, sha, name, _ = TRAILER.unpack(data)
    return Trailer(app_offset, app_size, model_offset, model_size, bool(flags & EXTERNAL_MODEL),
                   app_id.rstrip(b"\0").decode("ascii"), sha.rstrip(b"\0").decode("ascii"),
                   # only a bare file name: the trailer must not point anywhere else
                   Path(name.rstrip(b"\0").decode("utf-8")).name)


def write_archive(folder: Path, out: BinaryIO) -> str:
    """Append every entry under `folder` to `out`; returns the app id (a hash of all the bytes)."""
    digest = hashlib.sha256()

    def emit(kind: bytes, mode: int, name: str, data_length: int) -> None:
        encoded = name.encode("utf-8")
        header = ENTRY.pack(kind[0], mode, len(encoded), data_length) + encoded
        digest.update(header)
        out.write(header)

    # Sorted, and each folder before what it holds, so the launcher can create them in order.
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).parts):
        name = path.relative_to(folder).as_posix()
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(path).encode("utf-8")
            emit(b"l", 0o777, name, len(target))
            digest.update(target)
            out.write(target)
        elif stat.S_ISDIR(info.st_mode):
            emit(b"d", 0o755, name, 0)
        else:
            emit(b"f", stat.S_IMODE(info.st_mode), name, info.st_size)
            with path.open("rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()[:32]
