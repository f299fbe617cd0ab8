"""The single file (packaging/build.py): built once for real, run from an empty folder, bare environment."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from gemmachat.bundle import read_trailer

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "packaging" / "build.py"
PROMPT = ("--cli", "-p", "The capital of France is", "-n", "24", "--temp", "0")
MB = 1_000_000


@dataclass(frozen=True)
class Built:
    file: Path
    work: Path  # PyInstaller's one-folder build and the launcher, for making variants
    report: str  # what build.py printed


def build_module():
    spec = importlib.util.spec_from_file_location("gemma_chat_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cli_env_base: dict[str, str]) -> Iterator[Built]:
    # The default model, as a user's build gets it: from the package, via the session's cache.
    root = tmp_path_factory.mktemp("pkg")
    output = root / "dist" / "gemma-chat"
    result = subprocess.run([sys.executable, str(BUILD), "-o", str(output), "--work-dir", str(root / "work")],
                            capture_output=True, text=True, env=cli_env_base, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    yield Built(output, root / "work", result.stdout)
    shutil.rmtree(root, ignore_errors=True)  # about 1 GB that pytest would otherwise keep


@pytest.fixture(scope="module")
def cli_env_base(cache_dir: Path, model_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GEMMA_CHAT_")}
    env["GEMMA_CHAT_CACHE_DIR"] = str(cache_dir)
    return env


@pytest.fixture(scope="module")
def expected(cli_env_base: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """What the source install prints for PROMPT (python -m gemmachat from this checkout)."""
    env = {**cli_env_base, "HOME": str(tmp_path_factory.mktemp("source-home"))}
    result = subprocess.run([sys.executable, "-m", "gemmachat", *PROMPT], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One fresh HOME for the module, so the program and the model are unpacked once, not per test."""
    home = tmp_path_factory.mktemp("home")
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def tidy(tmp_path: Path) -> Iterator[None]:
    """Each test unpacks a program or copies a model (hundreds of MB): leave none behind."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def run_bare(file: Path, *args: str, home: Path, cwd: Path, extra: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the file as a user would after downloading it: no venv, a bare PATH, only HOME set."""
    return subprocess.run([str(file), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home), **(extra or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-chat: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_one_file_of_at_most_the_model_plus_160_mb(built: Built, model_path: Path) -> None:
    size = built.file.stat().st_size
    assert size - model_path.stat().st_size <= 160 * MB
    assert f"{size / MB:.1f} MB" in built.report
    trailer = read_trailer(built.file)
    assert trailer.model_size == model_path.stat().st_size and not trailer.external_model
    with built.file.open("rb") as handle:
        handle.seek(trailer.model_offset)
        assert handle.read(4) == b"GGUF"


def test_answers_exactly_as_the_source_install(built: Built, home: Path, tmp_path: Path, expected: str) -> None:
    first = run_bare(built.file, *PROMPT, home=home, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected
    cache = home / ".cache" / "gemma-chat"
    (app,) = (cache / "app").iterdir()
    (model,) = (cache / "models").iterdir()
    assert (app / "gemma-chat").is_file() and model.stat().st_size == read_trailer(built.file).model_size
    stamp = model.stat()
    # A later start reuses both as they are: no second copy of the program or the model.
    second = run_bare(built.file, *PROMPT, home=home, cwd=tmp_path)
    assert second.stdout == expected and second.stderr == ""
    assert [p.name for p in (cache / "app").iterdir()] == [app.name]
    assert model.stat().st_mtime_ns == stamp.st_mtime_ns and model.stat().st_ino == stamp.st_ino


def test_help_from_an_empty_folder(built: Built, home: Path, tmp_path: Path) -> None:
    result = run_bare(built.file, "--help", home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--cli" in result.stdout and "--server" in result.stdout and "--model" in result.stdout
    assert list(tmp_path.iterdir()) == [], "nothing written into the working folder"


def test_a_missing_model_file_is_one_line(built: Built, home: Path, tmp_path: Path) -> None:
    result = run_bare(built.file, "--cli", "-m", "missing.gguf", "-p", "hi", home=home, cwd=tmp_path)
    assert_one_line_error(result, "missing.gguf")


def test_killed_extractions_are_never_used_and_are_redone(built: Built, tmp_path: Path, expected: str) -> None:
    cache = tmp_path / "cache"
    extra = {"GEMMA_CHAT_CACHE_DIR": str(cache)}
    assert run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra=extra).returncode == 0
    (app,) = (cache / "app").iterdir()
    # What a kill during the first start leaves: a half-unpacked program folder under its temporary
    # name (the complete one never got renamed into place) and a truncated model file.
    app.rename(app.with_name(app.name + ".partial-1-1"))
    (app.with_name(app.name + ".partial-1-1") / "gemma-chat").write_bytes(b"")
    trailer = read_trailer(built.file)
    models = cache / "models"
    models.mkdir()
    name = f"{trailer.model_name.removesuffix('.gguf')}-{trailer.model_sha256[:16]}.gguf"
    with built.file.open("rb") as source, (models / name).open("wb") as out:
        source.seek(trailer.model_offset)
        out.write(source.read(trailer.model_size // 3))
    result = run_bare(built.file, *PROMPT, home=tmp_path, cwd=tmp_path, extra=extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert (app / "gemma-chat").stat().st_size > 0
    assert (models / name).stat().st_size == trailer.model_size
    assert [p.name for p in models.iterdir()] == [name], "no temporary files left behind"
    # A program folder damaged by hand (its program deleted) is set aside and unpacked again.
    (app / "gemma-chat").unlink()
    assert run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra=extra).returncode == 0
    assert (app / "gemma-chat").is_file() and list(app.parent.glob(app.name + ".damaged-*"))


def test_an_unwritable_cache_names_the_variable(built: Built, home: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # The launcher cannot unpack the program there ...
    result = run_bare(built.file, "--help", home=home, cwd=tmp_path,
                      extra={"GEMMA_CHAT_CACHE_DIR": str(blocker / "cache")})
    assert_one_line_error(result, "GEMMA_CHAT_CACHE_DIR", str(blocker))
    # ... and the program cannot copy the model there (the program unpacked, the models folder blocked).
    cache = tmp_path / "cache"
    assert run_bare(built.file, "--help", home=home, cwd=tmp_path,
                    extra={"GEMMA_CHAT_CACHE_DIR": str(cache)}).returncode == 0
    (cache / "models").write_text("not a folder")
    result = run_bare(built.file, *PROMPT, home=home, cwd=tmp_path, extra={"GEMMA_CHAT_CACHE_DIR": str(cache)})
    assert_one_line_error(result, "GEMMA_CHAT_CACHE_DIR")


def test_external_model_runs_beside_its_gguf(built: Built, tmp_path: Path, model_path: Path,
                                             expected: str) -> None:
    build = build_module()
    dist = tmp_path / "dist"
    # The same frozen program and launcher, packed the --external-model way (no second PyInstaller run).
    small = build.pack(build.compile_launcher(built.work), built.work / "dist" / "gemma-chat", model_path,
                       "gemma.gguf", dist / "gemma-chat", external_model=True)
    assert small.stat().st_size < built.file.stat().st_size - model_path.stat().st_size + MB
    assert (dist / "gemma.gguf").stat().st_size == model_path.stat().st_size
    home = tmp_path / "home"
    result = run_bare(small, *PROMPT, home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert not (home / ".cache" / "gemma-chat" / "models").exists(), "loaded in place, not copied"
    (dist / "gemma.gguf").unlink()
    assert_one_line_error(run_bare(small, *PROMPT, home=home, cwd=tmp_path), "gemma.gguf", "-m")


def test_a_truncated_download_is_one_line(built: Built, home: Path, tmp_path: Path) -> None:
    partial = tmp_path / "gemma-chat"
    with built.file.open("rb") as source:
        partial.write_bytes(source.read(2 * MB))
    partial.chmod(0o755)
    assert_one_line_error(run_bare(partial, "--help", home=home, cwd=tmp_path), "truncated")
