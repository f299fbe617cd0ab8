"""The single file (packaging/build.py): built once for real, run from an empty folder, bare environment."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from conftest import clean_env
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
def built(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, model_path: Path,
          portable_llama: None) -> Iterator[Built]:
    # The default model, as a user's build gets it: from the package, via the session's cache.
    root = tmp_path_factory.mktemp("pkg")
    output = root / "dist" / "gemma-chat"
    result = subprocess.run([sys.executable, str(BUILD), "-o", str(output), "--work-dir", str(root / "work")],
                            capture_output=True, text=True, env=clean_env(cache_dir), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    yield Built(output, root / "work", result.stdout)
    shutil.rmtree(root, ignore_errors=True)  # about 1 GB that pytest would otherwise keep


@pytest.fixture(scope="module")
def expected(cache_dir: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory,
             portable_llama: None) -> str:
    """What the source install prints for PROMPT (python -m gemmachat from this checkout) with the
    single file's llama.cpp build ahead of pip's: the two compile llama.cpp with different flags,
    which can round differently (they do on an Intel Xeon with AMX: docs/packaging.md)."""
    from test_llama_build import cached_wheel, unpacked

    portable = unpacked(cached_wheel(cuda=False), tmp_path_factory.mktemp("portable-llama"))
    env = clean_env(cache_dir, HOME=str(tmp_path_factory.mktemp("source-home")), PYTHONPATH=f"{portable}:{REPO}")
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
    (app,) = program_folders(cache)
    assert (app / "gemma-chat").is_file()
    # The weights are read where they lie: the cache holds the program only, no copy of the GGUF.
    assert not (cache / "models").exists()
    assert folder_size(cache) <= read_trailer(built.file).app_size
    # A later start reuses the program as it is.
    stamp = (app / "gemma-chat").stat()
    second = run_bare(built.file, *PROMPT, home=home, cwd=tmp_path)
    assert second.stdout == expected and second.stderr == ""
    assert sorted(p.name for p in (cache / "app").iterdir()) == [app.name, app.name + ".lock"]
    assert (app / "gemma-chat").stat().st_ino == stamp.st_ino


def program_folders(cache: Path) -> list[Path]:
    """The unpacked programs (each beside its .lock file, which the launcher holds while it runs)."""
    return sorted(p for p in (cache / "app").iterdir() if not p.name.endswith(".lock"))


def folder_size(folder: Path) -> int:
    """The bytes of the files and links under `folder` (what the archive carries)."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def spawn_chat(file: Path, home: Path, cwd: Path, extra: dict[str, str] | None = None) -> pexpect.spawn:
    chat = pexpect.spawn(str(file), ["--chat", "--nologo"], cwd=str(cwd), timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(home), "PROMPT_TOOLKIT_NO_CPR": "1",
                              **(extra or {})})
    chat.expect(">>>")
    return chat


def end_chat(chat: pexpect.spawn) -> None:
    chat.sendcontrol("d")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_a_running_chat_maps_the_weights_from_the_file_itself(built: Built, home: Path, tmp_path: Path) -> None:
    chat = spawn_chat(built.file, home, tmp_path)
    try:
        maps = Path(f"/proc/{chat.pid}/maps").read_text()  # the launcher execs: the same process
    finally:
        end_chat(chat)
    trailer = read_trailer(built.file)
    model = range(trailer.model_offset, trailer.model_offset + trailer.model_size)
    covered = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[5] == str(built.file):
            low, high = (int(address, 16) for address in fields[0].split("-"))
            offset = int(fields[2], 16)
            covered.append(range(offset, offset + high - low))
    # Mappings of the executable itself cover the GGUF's bytes: the weights, not a copy of them.
    assert sum(len(range(max(r.start, model.start), min(r.stop, model.stop))) for r in covered) > 0.9 * len(model), maps
    assert ".gguf" not in maps


def test_picks_the_kernels_for_this_cpu(built: Built, home: Path, tmp_path: Path) -> None:
    result = run_bare(built.file, *PROMPT[:3], "-n", "2", "--verbose", home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # One CPU backend per microarchitecture travels in the file; llama.cpp loads the best this CPU runs.
    variant = re.search(r"loaded CPU backend from \S+/libggml-cpu-(\w+)\.so", result.stderr)
    assert variant and variant[1] not in ("x64", "sse42"), result.stderr[-2000:]
    program = next(p for p in program_folders(home / ".cache" / "gemma-chat"))
    assert len(list(program.rglob("libggml-cpu-*.so"))) > 5


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (apt-get install qemu-user)")
def test_runs_on_a_cpu_without_avx(built: Built, home: Path, tmp_path: Path) -> None:
    args = (*PROMPT, "-n", "4", "-c", "512")
    here = run_bare(built.file, *args, home=home, cwd=tmp_path)
    assert here.returncode == 0 and len(here.stdout) > 10, here.stderr
    # qemu-user emulates only the process it starts, and PyInstaller's bootloader re-executes itself
    # once its environment is set: start that second stage under qemu directly, with the variables
    # the first would have set (PyInstaller 6's). The launcher has unpacked the program already.
    (program,) = program_folders(home / ".cache" / "gemma-chat")
    stage_two = {"_PYI_ARCHIVE_FILE": str(program / "gemma-chat"), "_PYI_PARENT_PROCESS_LEVEL": "-1",
                 "_PYI_LINUX_PROCESS_NAME": "gemma-chat", "LD_LIBRARY_PATH": str(program / "_internal"),
                 "GEMMA_CHAT_BUNDLE": str(built.file)}
    emulated = subprocess.run(["qemu-x86_64", "-cpu", "Nehalem", str(program / "gemma-chat"), *args, "--verbose"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(home), **stage_two})
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    # qemu traps AVX and later instructions as a 2008 Nehalem would: llama.cpp must pick the sse42
    # kernels, and they must answer as this machine's do.
    assert "libggml-cpu-sse42.so" in emulated.stderr
    assert emulated.stdout == here.stdout


def test_rpc_worker_and_client_from_the_file(built: Built, home: Path, tmp_path: Path) -> None:
    # llama.cpp's RPC backend travels in the file: a worker and a client, both the single file, on
    # 127.0.0.1. RPC keeps plain weight buffers, so the local run to match is --no-repack's.
    from test_rpc import start_worker, stop

    worker, port = start_worker({"PATH": "/usr/bin:/bin", "HOME": str(home)}, tmp_path / "worker.log",
                                program=(str(built.file),))
    try:
        remote = run_bare(built.file, *PROMPT, "--rpc", f"127.0.0.1:{port}", "-ngl", "999", "--verbose",
                          home=home, cwd=tmp_path)
    finally:
        stop(worker)
    local = run_bare(built.file, *PROMPT, "--no-repack", home=home, cwd=tmp_path)
    assert local.returncode == 0 and len(local.stdout.split()) > 5, local.stderr
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert f"RPC0[127.0.0.1:{port}] model buffer size" in remote.stderr and "offloaded 19/19 layers" in remote.stderr
    assert remote.stdout == local.stdout


def test_help_from_an_empty_folder(built: Built, home: Path, tmp_path: Path) -> None:
    result = run_bare(built.file, "--help", home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--cli" in result.stdout and "--server" in result.stdout and "--model" in result.stdout
    assert list(tmp_path.iterdir()) == [], "nothing written into the working folder"


def test_a_missing_model_file_is_one_line(built: Built, home: Path, tmp_path: Path) -> None:
    result = run_bare(built.file, "--cli", "-m", "missing.gguf", "-p", "hi", home=home, cwd=tmp_path)
    assert_one_line_error(result, "missing.gguf")


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_a_file_damaged_in_the_middle_is_refused_and_leaves_the_cache_clean(built: Built, tmp_path: Path) -> None:
    # A download damaged inside the program's archive still ends in a good trailer. Unpacked
    # unchecked under the good build's id, it crashed at every start, and a good copy's too.
    damaged = tmp_path / "gemma-chat"
    shutil.copyfile(built.file, damaged)
    damaged.chmod(0o755)
    trailer = read_trailer(built.file)
    with damaged.open("r+b") as handle:
        handle.seek(trailer.app_offset + trailer.app_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    cache = tmp_path / "cache"
    extra = {"GEMMA_CHAT_CACHE_DIR": str(cache)}
    result = run_bare(damaged, "--help", home=tmp_path, cwd=tmp_path, extra=extra)
    assert_one_line_error(result, str(damaged), "corrupt", "download it again")
    assert program_folders(cache) == [], "nothing unpacked is left, under the good id or a temporary one"
    good = run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra=extra)
    assert good.returncode == 0 and "--cli" in good.stdout, good.stderr


def test_killed_extractions_are_never_used_and_are_cleaned(built: Built, tmp_path: Path, expected: str) -> None:
    cache = tmp_path / "cache"
    extra = {"GEMMA_CHAT_CACHE_DIR": str(cache)}
    assert run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra=extra).returncode == 0
    (app,) = program_folders(cache)
    # What a kill during the first start leaves: a half-unpacked program folder under its temporary
    # name, naming a process that is gone (the complete one never got renamed into place).
    leftover = app.with_name(f"{app.name}.partial-{dead_pid()}-1")
    app.rename(leftover)
    (leftover / "gemma-chat").write_bytes(b"")
    result = run_bare(built.file, *PROMPT, home=tmp_path, cwd=tmp_path, extra=extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert (app / "gemma-chat").stat().st_size > 0
    assert not leftover.exists(), "the next start removes what a killed one left"
    # A program folder damaged by hand (its program deleted) is set aside, unpacked again, and what
    # was set aside is removed.
    (app / "gemma-chat").unlink()
    assert run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra=extra).returncode == 0
    assert (app / "gemma-chat").is_file()
    assert sorted(p.name for p in app.parent.iterdir()) == [app.name, app.name + ".lock"]


def test_a_new_build_removes_older_ones_unless_they_run(built: Built, tmp_path: Path, model_path: Path,
                                                       expected: str) -> None:
    build = build_module()
    # A second build: the same program with one more file, so another app id (no second PyInstaller run).
    program = tmp_path / "program"
    shutil.copytree(built.work / "dist" / "gemma-chat", program, symlinks=True)
    (program / "another-build").write_text("2")
    newer = build.pack(build.compile_launcher(built.work), program, model_path, "gemma.gguf",
                       tmp_path / "newer" / "gemma-chat", external_model=False)
    cache = tmp_path / "cache"
    env = {"GEMMA_CHAT_CACHE_DIR": str(cache)}
    old_id, new_id = read_trailer(built.file).app_id, read_trailer(newer).app_id

    def folders() -> set[str]:
        return {p.name for p in program_folders(cache)}

    assert run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra=env).returncode == 0
    assert folders() == {old_id}
    # While the older build runs, the newer one leaves its folder alone ...
    chat = spawn_chat(built.file, tmp_path, tmp_path, env)
    try:
        result = run_bare(newer, *PROMPT, home=tmp_path, cwd=tmp_path, extra=env)
        assert result.returncode == 0 and result.stdout == expected, result.stderr
        assert folders() == {old_id, new_id}
        info = run_bare(newer, "--cache-info", home=tmp_path, cwd=tmp_path, extra=env)
        assert info.returncode == 0, info.stderr
        assert f"app/{new_id}  program of this build" in info.stdout
        assert f"app/{old_id}  program of another build, running now" in info.stdout
    finally:
        end_chat(chat)
    # ... and removes it at its first start after the older one has ended; the reverse holds too.
    assert run_bare(newer, "--help", home=tmp_path, cwd=tmp_path, extra=env).returncode == 0
    assert folders() == {new_id}
    assert run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra=env).returncode == 0
    assert folders() == {old_id}
    assert folder_size(cache) < folder_size(program) + MB


def test_an_unwritable_cache_names_the_variable(built: Built, home: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # The launcher cannot unpack the program there.
    result = run_bare(built.file, "--help", home=home, cwd=tmp_path,
                      extra={"GEMMA_CHAT_CACHE_DIR": str(blocker / "cache")})
    assert_one_line_error(result, "GEMMA_CHAT_CACHE_DIR", str(blocker))


def test_a_full_cache_disk_is_left_as_it_was_and_two_first_starts_leave_one_program(
        built: Built, tmp_path: Path, expected: str) -> None:
    """The launcher's own unpacking folder goes when it fails (a full disk stayed full, every retry
    adding one) and when another start finished first (it stayed, 100 MB, while its start ran)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root, as here and in CI")
    try:
        for _ in range(2):
            full = run_bare(built.file, "--help", home=tmp_path, cwd=tmp_path, extra={"GEMMA_CHAT_CACHE_DIR": str(small)})
            assert_one_line_error(full, "No space left on device", "GEMMA_CHAT_CACHE_DIR")
            assert not [p.name for p in (small / "app").iterdir() if ".partial" in p.name], "none left"
    finally:
        subprocess.run(["umount", str(small)], check=True)
    cache = tmp_path / "cache"
    starts = [subprocess.Popen([str(built.file), *PROMPT], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                               env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GEMMA_CHAT_CACHE_DIR": str(cache)})
              for _ in range(2)]
    for start in starts:
        out, _ = start.communicate(timeout=300)
        assert start.returncode == 0 and out == expected
    assert len(program_folders(cache)) == 1, sorted(p.name for p in (cache / "app").iterdir())


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
