"""GGUF models from Hugging Face: `-hf USER/REPO[:QUANT]` or a short name such as `gemma3:1b`.

huggingface_hub does the talking (endpoints, HF_TOKEN, retries, its errors); this module picks
the file, downloads it into a `.partial` file that a later start resumes (see _download), shows a
progress bar, checks the size and SHA-256 the Hub reports, and remembers what a name resolved to,
so that a later start finds the file again without a single request. Files live under
CACHE/hub/OWNER/NAME/<sha256[:16]>/.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from gemmachat.safe_io import write_file
from gemmachat.errors import UserError

# Short names: the repository and its default quantisation (ggml-org publishes llama.cpp's own
# conversions of the Gemma model cards' instruct models). Checked against the Hub when written,
# not from this machine, which has no internet.
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "gemma3:270m": ("ggml-org/gemma-3-270m-it-GGUF", "Q8_0"),
    "gemma3:1b": ("ggml-org/gemma-3-1b-it-GGUF", "Q4_K_M"),
    "gemma3:4b": ("ggml-org/gemma-3-4b-it-GGUF", "Q4_K_M"),
    "gemma3:12b": ("ggml-org/gemma-3-12b-it-GGUF", "Q4_K_M"),
    "gemma3:27b": ("ggml-org/gemma-3-27b-it-GGUF", "Q4_K_M"),
    "gemma2:2b": ("bartowski/gemma-2-2b-it-GGUF", "Q4_K_M"),
    "gemma2:9b": ("bartowski/gemma-2-9b-it-GGUF", "Q4_K_M"),
}
DEFAULT_QUANT = "Q4_K_M"
_REPO = re.compile(r"[\w.-]+/[\w.-]+")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# A quantisation in a file name: Q4_K_M, IQ3_XXS, Q8_0, F16, BF16 (underscores belong to it).
_QUANT = re.compile(r"(?:^|[-_.])((?:I?Q\d|BF16|F16|F32)\w*)", re.IGNORECASE)
_RECORD = "gemma-chat-models.json"
HUB_TIMEOUT_SECONDS = 30
MB = 1_000_000


@dataclass(frozen=True)
class HubModel:
    repo: str
    quant: str | None  # None when a file is named
    file: str | None

    @property
    def key(self) -> str:
        return f"{self.repo}:{self.file or self.quant}"


def parse_spec(spec: str, file: str | None = None) -> HubModel:
    """`USER/REPO[:QUANT]` or a short name from SHORT_NAMES; `file` (--hf-file) picks a file."""
    if spec in SHORT_NAMES:
        repo, quant = SHORT_NAMES[spec]
    else:
        repo, _, quant = spec.partition(":")
        if not _REPO.fullmatch(repo):
            names = ", ".join(SHORT_NAMES)
            raise UserError(f"-hf {spec!r}: give USER/REPO[:QUANT] (a Hugging Face repository) or one of {names}")
    return HubModel(repo, None if file else (quant or DEFAULT_QUANT).upper(), file)


def hub_dir(cache: Path) -> Path:
    return cache / "hub"


def _record(cache: Path) -> dict[str, dict]:
    try:
        loaded = json.loads((hub_dir(cache) / _RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: the next download writes it again
    return loaded if isinstance(loaded, dict) else {}


def _remember(cache: Path, key: str, entry: dict) -> None:
    record = _record(cache)
    record[key] = entry
    write_file(hub_dir(cache) / _RECORD, json.dumps(record, indent=2).encode())


def _downloaded(entry: object) -> bool:
    """A record entry whose files are all still there."""
    paths = entry.get("paths") if isinstance(entry, dict) else None
    return bool(paths) and isinstance(paths, list) and all(isinstance(p, str) and Path(p).is_file() for p in paths)


def cached_models(cache: Path) -> list[tuple[str, dict]]:
    """What -hf has downloaded and verified, by the name it was asked for."""
    return [(key, entry) for key, entry in sorted(_record(cache).items()) if _downloaded(entry)]


def resolve(model: HubModel, cache: Path, environ: Mapping[str, str]) -> Path:
    """The local path of the model's GGUF (the first part of a split one): from the record of an
    earlier download without a request, or downloaded, resumed and verified now."""
    entry = _record(cache).get(model.key)
    if _downloaded(entry):
        _remember(cache, model.key, {**entry, "last_used": time.time()})
        return Path(entry["paths"][0])
    if environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{model.key} is not in the cache {hub_dir(cache)} and HF_HUB_OFFLINE is set: "
                        "unset it to download the model")
    if not environ.get("HF_TOKEN", "").isascii():  # an HTTP header: it failed deep in the client
        raise UserError("HF_TOKEN holds characters that are not ASCII: a Hugging Face token has none")
    if "HF_ENDPOINT" in os.environ and not os.environ["HF_ENDPOINT"].strip():
        # Set but empty (`HF_ENDPOINT= gemma-chat ...`) means the Hub itself, as the error line says;
        # huggingface_hub, which reads it when imported, took "" as the address.
        del os.environ["HF_ENDPOINT"]
    with _hub_errors(model):
        from huggingface_hub import HfApi

        # A server that takes the connection and never answers must not hold the start for ever.
        info = HfApi().model_info(model.repo, files_metadata=True, timeout=HUB_TIMEOUT_SECONDS)
        files = _pick(model, {s.rfilename: s for s in info.siblings or []})
        paths = [_download(model.repo, info.sha, sibling, cache) for sibling in files]
    _remember(cache, model.key, {"repo": model.repo, "revision": info.sha, "files": [s.rfilename for s in files],
                                 "paths": [str(p) for p in paths], "last_used": time.time()})
    return paths[0]


def _pick(model: HubModel, siblings: dict) -> list:
    """The file named, or the GGUF of the quantisation asked for (all parts of a split one)."""
    ggufs = sorted(name for name in siblings if name.lower().endswith(".gguf"))
    if model.file:
        if model.file not in siblings:
            raise UserError(f"{model.repo} has no file {model.file!r}" + (f" (its GGUFs: {', '.join(ggufs)})" if ggufs else ""))
        if not model.file.lower().endswith(".gguf"):
            raise UserError(f"{model.repo}/{model.file} is not a GGUF file")
        chosen = [model.file]
    else:
        if not ggufs:
            raise UserError(f"{model.repo} holds no GGUF file: gemma-chat runs llama.cpp's GGUF models")
        wanted = re.compile(rf"(^|[-_.]){re.escape(model.quant or '')}([-_.]|$)", re.IGNORECASE)
        chosen = [name for name in ggufs if wanted.search(Path(name).name) and "mmproj" not in name.lower()]
        if not chosen:
            quants = sorted({_quant_of(name) for name in ggufs} - {"?"})
            raise UserError(f"{model.repo} has no {model.quant} GGUF" + (f" (it has: {', '.join(quants)})" if quants else ""))
    first = chosen[0]
    split = _SPLIT.search(first)
    if split:  # every part, in order: llama.cpp opens the others from the first
        stem = first[: split.start()]
        chosen = sorted(name for name in ggufs if name.startswith(stem) and _SPLIT.search(name))
    elif len(chosen) > 1:
        raise UserError(f"{model.repo} has several {model.quant} GGUFs ({', '.join(chosen)}): pick one with --hf-file")
    return [siblings[name] for name in chosen]


def _download(repo: str, revision: str, sibling, cache: Path) -> Path:
    """One file, into CACHE/hub/OWNER/NAME/<sha256[:16]>/FILE. huggingface_hub 2.4's own
    hf_hub_download starts over in each process (a unique temporary name per download), so the
    transfer goes through its http_get with our stable `.partial` file, which a later start
    resumes with a range request; URLs, HF_TOKEN, retries and errors stay huggingface_hub's."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    size = sibling.size or (sibling.lfs.size if sibling.lfs else None)
    digest = sibling.lfs.sha256 if sibling.lfs and sibling.lfs.sha256 else revision
    target = hub_dir(cache) / repo / digest[:16] / sibling.rfilename
    # The names come from the Hub, or from whatever HF_ENDPOINT names: "../" must not leave the cache.
    root = os.path.normpath(hub_dir(cache))
    if os.path.commonpath([os.path.normpath(target), root]) != root:
        raise UserError(f"refused {repo}'s file {sibling.rfilename!r}: its path leads out of the cache")
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    partial = target.with_name(target.name + ".partial")
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("ab") as out, _progress(partial, sibling.rfilename, size):
            http_get(hf_hub_url(repo, sibling.rfilename, revision=revision), out, resume_size=out.tell(),
                     headers=build_hf_headers(), expected_size=size)
    except OSError as error:
        if error.errno == errno.ENOSPC and size:
            have = partial.stat().st_size if partial.exists() else 0
            raise UserError(f"the disk is full: {sibling.rfilename} needs {(size - have) / MB:.0f} MB more in "
                            f"{partial.parent}; free space and run again, the download resumes where it stopped") from None
        raise
    _verify(partial, sibling, size)
    os.replace(partial, target)
    return target


def _verify(path: Path, sibling, size: int | None) -> None:
    """The size and SHA-256 that the Hub reported; a file that differs is removed, not used."""
    problem = None
    if size is not None and path.stat().st_size != size:
        problem = f"is {path.stat().st_size} bytes, the Hub says {size}"
    elif sibling.lfs and sibling.lfs.sha256:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sibling.lfs.sha256:
            problem = "does not match the SHA-256 the Hub reports"
    if problem:
        path.unlink()
        raise UserError(f"the download of {sibling.rfilename} {problem}: removed; run again to download it anew")


@contextlib.contextmanager
def _progress(partial: Path, name: str, total: int | None) -> Iterator[None]:
    """A rich progress bar on stderr that follows the partial file (huggingface_hub's tqdm bar is
    off: one bar, in our style, that starts where a resumed download stands)."""
    from huggingface_hub.utils import disable_progress_bars
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    disable_progress_bars()
    console = Console(stderr=True)
    if not console.is_terminal:
        console.print(f"gemma-chat: downloading {name}" + (f" ({total / MB:.0f} MB)" if total else ""), highlight=False)
        yield
        return
    done = threading.Event()
    columns = (TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(name, total=total, completed=partial.stat().st_size)

        def follow() -> None:
            while not done.wait(0.2):
                bar.update(task, completed=partial.stat().st_size)

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()


@contextlib.contextmanager
def _hub_errors(model: HubModel) -> Iterator[None]:
    """huggingface_hub's exceptions as one line each, saying what to do."""
    from httpx2 import TransportError  # huggingface_hub's HTTP client: a refused or timed-out connection
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except UserError:
        raise
    except GatedRepoError:
        raise UserError(f"{model.repo} is gated: accept its licence at https://huggingface.co/{model.repo} "
                        "and set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise UserError(f"no repository {model.repo} on the Hub (or it is private: set HF_TOKEN)") from None
    except (EntryNotFoundError, RevisionNotFoundError) as error:
        raise UserError(f"{model.repo}: {_first_line(error)}") from None
    except TransportError as error:
        raise UserError(f"cannot reach the Hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) to download "
                        f"{model.key}: {_first_line(error)}; with no network, use -m PATH.gguf") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise UserError(f"cannot reach the Hub to download {model.key}, and it is not in the cache: "
                        "check the network (HF_ENDPOINT, proxies) or use -m PATH.gguf") from None
    except HfHubHTTPError as error:
        raise UserError(f"the Hub refused {model.key}: {_first_line(error)}") from None
    except OSError as error:
        raise UserError(f"cannot download {model.key}: {error.strerror or _first_line(error)}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # an HF_ENDPOINT that is no Hub
        raise UserError(f"{os.environ.get('HF_ENDPOINT') or 'the Hub'} answered {model.key} with what is not "
                        f"the Hub's API ({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _quant_of(file_name: str) -> str:
    found = _QUANT.findall(_SPLIT.sub(".gguf", Path(file_name).name).removesuffix(".gguf"))
    return found[-1].upper() if found else "?"


def print_model_list(cache: Path) -> int:
    """--list-models: the short names -hf knows, and the models it has downloaded."""
    from gemmachat.gguf import GGUFError, read_gguf

    downloaded = cached_models(cache)
    have = {key for key, _ in downloaded}
    print("short names for -hf (downloaded once, then run offline):")
    for name, (repo, quant) in SHORT_NAMES.items():
        mark = "  (downloaded)" if f"{repo}:{quant}" in have else ""
        print(f"  {name:<12} {repo}:{quant}{mark}")
    print(f"downloaded with -hf, in {hub_dir(cache)}:")
    if not downloaded:
        print("  (none yet)")
    rows = []
    for key, entry in downloaded:
        paths = [Path(p) for p in entry["paths"]]
        try:
            info = read_gguf(paths[0])
            context, template = str(info.arch_value("context_length") or "?"), "yes" if info.chat_template else "no"
        except GGUFError:
            context, template = "?", "unreadable"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("last_used", 0)))
        size = sum(path.stat().st_size for path in paths) / MB
        rows.append((key, f"{size:.1f} MB", _quant_of(entry["files"][0]), context, template, used))
    if rows:
        header = ("name", "size", "quant", "context", "chat template", "last used")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
