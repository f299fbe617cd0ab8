"""-hf: models from Hugging Face, through the real huggingface_hub, against a local Hub.

There is no internet here, so a small HTTP server on 127.0.0.1 plays the Hub (HF_ENDPOINT): the
repository metadata endpoint and the resolve endpoint with ranges, serving the real test GGUF.
It counts what it sends, so the tests can tell a resumed download from a fresh one and a start
that makes no request at all.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("--cli", "-p", "The capital of France is", "-n", "24", "--temp", "0")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token"


@dataclass
class Hub:
    url: str
    files: dict[str, dict[str, bytes | str]]  # repo -> file name -> bytes, or a path to serve
    requests: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    slow_after: int | None = None  # the next download slows to a crawl past this many bytes

    def sha256(self, repo: str, name: str) -> str:
        return hashlib.sha256(self.content(repo, name)).hexdigest()

    def content(self, repo: str, name: str) -> bytes:
        data = self.files[repo][name]
        return Path(data).read_bytes() if isinstance(data, str) else data


def serve(hub: Hub, bad_sums: set[str]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def refuse(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def allowed(self, repo: str) -> bool:
            if repo not in hub.files:
                self.refuse(404, "RepoNotFound", "Repository not found")
                return False
            if repo.startswith("test/private") and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.refuse(401, "RepoNotFound", "Invalid username or password.")
                return False
            if repo.startswith("test/gated") and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.refuse(403, "GatedRepo", "Access to model is restricted.")
                return False
            return True

        def do_GET(self) -> None:
            self.handle_request(send_body=True)

        def do_HEAD(self) -> None:
            self.handle_request(send_body=False)

        def handle_request(self, send_body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            info = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)(/revision/[\w.-]+)?(\?.*)?", self.path)
            resolve = re.fullmatch(r"/([\w.-]+/[\w.-]+)/resolve/([\w.-]+)/(.+)", self.path)
            if info:
                repo = info[1]
                if repo == "test/not-the-hub":  # an HF_ENDPOINT that is some other web server
                    body = b"<html><body>Welcome to nginx!</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if not self.allowed(repo):
                    return
                siblings = []
                for name in hub.files[repo]:
                    size = len(hub.content(repo, name))
                    digest = "0" * 64 if repo in bad_sums else hub.sha256(repo, name)
                    siblings.append({"rfilename": name, "size": size, "blobId": digest[:40],
                                     "lfs": {"size": size, "sha256": digest, "pointerSize": 134}})
                body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif resolve:
                repo, name = resolve[1], resolve[3]
                if not self.allowed(repo):
                    return
                if name not in hub.files[repo]:
                    self.refuse(404, "EntryNotFound", f"{name} does not exist")
                    return
                data = hub.content(repo, name)
                start = 0
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if ranged and send_body:
                    start = int(ranged[1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub.sha256(repo, name)}"')
                self.send_header("X-Linked-Etag", f'"{hub.sha256(repo, name)}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not send_body:
                    return
                slow_after, hub.slow_after = hub.slow_after, None
                for offset in range(start, len(data), 1 << 16):
                    if slow_after is not None and offset - start > slow_after:
                        time.sleep(0.2)
                    block = data[offset:offset + (1 << 16)]
                    try:
                        self.wfile.write(block)
                    except OSError:
                        return  # the client was killed
                    hub.bytes_sent += len(block)
            else:
                self.refuse(404, "NotFound", "no such endpoint")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def hub(model_path: Path) -> Iterator[Hub]:
    files = {
        "test/gemma-3-270m": {"gemma-3-270m-Q4_K_M.gguf": str(model_path), "README.md": b"# test\n"},
        "test/bad-sum": {"model-Q4_K_M.gguf": str(model_path)},
        "test/no-gguf": {"README.md": b"# nothing to run\n"},
        "test/private-model": {"model-Q4_K_M.gguf": b"GGUF"},
        "test/gated-model": {"model-Q4_K_M.gguf": b"GGUF"},
        "test/not-a-model": {"model-Q4_K_M.gguf": b"this is not a GGUF at all" * 10},
        # What a hostile mirror may list: a download into the user's folders, out of the cache.
        "test/escape": {"../../../../../escaped-Q4_K_M.gguf": b"GGUF"},
    }
    hub = Hub("", files)
    server = serve(hub, bad_sums={"test/bad-sum"})
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub
    server.shutdown()


def hub_env(hub: Hub, home: Path, **extra: str) -> dict[str, str]:
    """This environment without our or the Hub's settings, pointed at the local Hub."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("GEMMA_CHAT_", "HF_"))},
            "HF_ENDPOINT": hub.url, "GEMMA_CHAT_CACHE_DIR": str(home / "cache"), "HOME": str(home), **extra}


def run(hub: Hub, home: Path, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmachat", *args], capture_output=True, text=True,
                          env=hub_env(hub, home, **extra), cwd=REPO, timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    # Off a terminal a download announces itself in a line of its own; then the one error line.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("gemma-chat: downloading ")]
    assert len(lines) == 1 and lines[0].startswith("gemma-chat: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def expected(hub: Hub, tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> str:
    """What -m on the same file prints for PROMPT."""
    result = run(hub, tmp_path_factory.mktemp("local"), *PROMPT, "-m", str(model_path))
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return result.stdout


def test_downloads_verifies_and_then_runs_offline(hub: Hub, tmp_path: Path, model_path: Path, expected: str) -> None:
    before = hub.bytes_sent
    first = run(hub, tmp_path, "-hf", "test/gemma-3-270m:Q4_K_M", *PROMPT)
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected
    assert "downloading gemma-3-270m-Q4_K_M.gguf" in first.stderr
    assert hub.bytes_sent - before == model_path.stat().st_size
    # The second start finds the file through its record: not one request.
    requests = len(hub.requests)
    second = run(hub, tmp_path, "-hf", "test/gemma-3-270m:q4_k_m", *PROMPT)
    assert second.returncode == 0 and second.stdout == expected, second.stderr
    assert len(hub.requests) == requests
    listed = run(hub, tmp_path, "--list-models")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "test/gemma-3-270m:Q4_K_M" in line)
    assert "253.1 MB" in row and "32768" in row and " no " in row
    assert row.split()[3] == "Q4_K_M", row  # the quant column, read from the file's name
    info = run(hub, tmp_path, "--cache-info")
    assert "hub/test/gemma-3-270m/" in info.stdout and "model from -hf" in info.stdout, info.stdout


def test_a_killed_download_resumes_where_it_stopped(hub: Hub, tmp_path: Path, model_path: Path) -> None:
    size = model_path.stat().st_size
    # huggingface_hub writes what it receives in 10 MB pieces: the server slows down well past the
    # point where the test kills the download, so the kill lands in the middle of a fast transfer.
    hub.slow_after = size // 2
    child = subprocess.Popen([sys.executable, "-m", "gemmachat", "-hf", "test/gemma-3-270m", *PROMPT],
                             env=hub_env(hub, tmp_path),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    partial: list[Path] = []
    while time.monotonic() < deadline:
        partial = [p for p in (tmp_path / "cache").rglob("*.partial") if p.stat().st_size > size // 4]
        if partial:
            break
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert partial, "the download never got a quarter of the way"
    kept = partial[0].stat().st_size
    before = hub.bytes_sent
    resumed = run(hub, tmp_path, "-hf", "test/gemma-3-270m", *PROMPT)
    assert resumed.returncode == 0, resumed.stderr
    # Only what was missing crossed the wire the second time.
    assert hub.bytes_sent - before <= size - kept + (1 << 16)
    assert len(resumed.stdout) > 20


def test_a_full_disk_keeps_the_partial_download_and_says_how_much_is_needed(
        hub: Hub, tmp_path: Path, model_path: Path, expected: str) -> None:
    # The cache lies on a 64 MB tmpfs in a mount namespace of its own: the download fills it, then
    # the same namespace grows it and the second start resumes from the kept part.
    size = model_path.stat().st_size
    cache = tmp_path / "cache"
    cache.mkdir()
    gemma = " ".join([sys.executable, "-m", "gemmachat", "-hf", "test/gemma-3-270m", *(f"'{a}'" for a in PROMPT)])
    script = f"""
        mount -t tmpfs -o size=64m tmpfs {cache} || exit 99
        {gemma} > {tmp_path}/full.out 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc
        find {cache} -name '*.partial' -printf '%s' > {tmp_path}/kept
        mount -o remount,size=400m {cache}
        {gemma} > {tmp_path}/resumed.out 2> {tmp_path}/resumed.err; echo $? > {tmp_path}/resumed.rc
    """
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    before = hub.bytes_sent
    result = subprocess.run([*namespace, "sh", "-c", script], env=hub_env(hub, tmp_path), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    full = subprocess.CompletedProcess([], int((tmp_path / "full.rc").read_text()), "",
                                       (tmp_path / "full.err").read_text())
    assert_one_line(full, "the disk is full", "MB more", "resumes")
    kept = int((tmp_path / "kept").read_text())
    assert 32 << 20 < kept <= 64 << 20
    needed = re.search(r"needs (\d+) MB more", full.stderr)
    assert needed and abs(int(needed[1]) - (size - kept) / 1e6) <= 1, full.stderr
    assert (tmp_path / "resumed.rc").read_text().strip() == "0", (tmp_path / "resumed.err").read_text()
    assert (tmp_path / "resumed.out").read_text() == expected
    # Both starts together sent the file once, plus what was in flight when the disk filled: a
    # second start from zero would have sent the kept part (over 32 MB) again.
    assert hub.bytes_sent - before <= size + (16 << 20)


def test_a_wrong_checksum_is_refused_and_removed(hub: Hub, tmp_path: Path) -> None:
    result = run(hub, tmp_path, "-hf", "test/bad-sum", *PROMPT)
    assert_one_line(result, "SHA-256", "removed")
    assert not [p for p in (tmp_path / "cache").rglob("*.gguf") if p.exists()]


@pytest.mark.parametrize(("spec", "extra", "words"), [
    ("test/missing", {}, ("no repository test/missing",)),
    ("test/private-model", {}, ("private", "HF_TOKEN")),
    ("test/gated-model", {}, ("gated", "HF_TOKEN", "https://huggingface.co/test/gated-model")),
    ("test/no-gguf", {}, ("no GGUF",)),
    ("test/gemma-3-270m:Q8_0", {}, ("no Q8_0 GGUF", "Q4_K_M")),
    ("nonsense", {}, ("USER/REPO",)),
    ("test/gemma-3-270m:Q4_K_M", {"HF_HUB_OFFLINE": "1"}, ("HF_HUB_OFFLINE",)),
    ("test/not-a-model", {}, ("not a GGUF",)),
    # These three were tracebacks, and the escape wrote its file out of the cache.
    ("test/not-the-hub", {}, ("answered test/not-the-hub:Q4_K_M with what is not the Hub's API",)),
    ("test/gemma-3-270m", {"HF_TOKEN": "s\u00e9cret"}, ("HF_TOKEN holds characters that are not ASCII",)),
    ("test/escape", {}, ("refused test/escape's file '../../../../../escaped-Q4_K_M.gguf'", "out of the cache")),
])
def test_errors_are_one_line(hub: Hub, tmp_path: Path, spec: str, extra: dict[str, str], words: tuple[str, ...]) -> None:
    assert_one_line(run(hub, tmp_path, "-hf", spec, *PROMPT, **extra), *words)
    assert not list(tmp_path.rglob("escaped-*")), "nothing was written out of the cache"


def test_unreachable_hub_is_one_line(hub: Hub, tmp_path: Path) -> None:
    result = run(hub, tmp_path, "-hf", "test/gemma-3-270m", *PROMPT, HF_ENDPOINT="http://127.0.0.1:9")
    assert_one_line(result, "cannot reach the Hub", "-m PATH.gguf")


def test_a_token_opens_a_private_repository(hub: Hub, tmp_path: Path) -> None:
    # The file is four bytes: past authentication, our GGUF validation refuses it, in one line.
    result = run(hub, tmp_path, "-hf", "test/private-model", *PROMPT, HF_TOKEN=TOKEN)
    assert_one_line(result, "file is truncated")


def test_model_and_hf_on_one_command_line_is_one_line(hub: Hub, tmp_path: Path, model_path: Path) -> None:
    assert_one_line(run(hub, tmp_path, "-hf", "gemma3:1b", "-m", str(model_path), *PROMPT), "both a model (-m)")


def test_build_py_carries_a_model_from_the_hub(hub: Hub, tmp_path: Path, model_path: Path) -> None:
    # What packaging/build.py --model hf:... resolves (the freezing itself is tests/test_packaging.py's).
    code = ("import sys; sys.path.insert(0, 'packaging'); import build; "
            "path, name = build.model_to_carry('hf:test/gemma-3-270m'); print(path); print(name)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=hub_env(hub, tmp_path),
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    path, name = result.stdout.split()
    assert name == "gemma-3-270m-Q4_K_M.gguf" and Path(path).read_bytes() == model_path.read_bytes()
