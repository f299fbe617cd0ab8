"""Hostile model files through the real program: corrupted copies of the default GGUF, each run by
`gemma-chat --cli` in its own process, and a GGUF whose chat template attacks the host.

Variants share the real file's first bytes (header, metadata, tensor table); the tensor data behind
them is a sparse hole of the right size, so a variant that passes validation is loaded by llama.cpp
for real (with zero weights) without copying 250 MB per case.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import pytest

from gemmachat.gguf import GGUFInfo, read_gguf

REPO = Path(__file__).resolve().parent.parent
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
# linux/capability.h and linux/prctl.h
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24
CLI = ["--cli", "-p", "Hi", "-n", "1", "-c", "64", "-t", "1", "--temp", "0"]

# Metadata values llama.cpp reads as numbers, set to values no real model has. The fuzz found
# llama.cpp aborting (GGML_ASSERT) on the layer count and the norm epsilon; the others it refuses
# by itself or loads (a wrong token id, say). Fewer than all of them, to keep the test short.
BAD_VALUES = [
    ("gemma3.block_count", "<I", 0), ("gemma3.block_count", "<I", 2**32 - 1),
    ("gemma3.attention.layer_norm_rms_epsilon", "<f", -1.0),
    ("gemma3.attention.layer_norm_rms_epsilon", "<f", float("nan")),
    ("gemma3.context_length", "<I", 0), ("gemma3.attention.head_count", "<I", 0),
]
# Refused by our own check (naming the key) or by the abort hook, not by luck.
EXPECTED = {
    "gemma3.block_count = 0": "block_count is 0", "gemma3.block_count = 4294967295": "block_count is",
    "gemma3.attention.layer_norm_rms_epsilon = -1.0": "layer_norm_rms_epsilon is -1.0",
    "gemma3.attention.layer_norm_rms_epsilon = nan": "layer_norm_rms_epsilon is nan",
    "nextn_predict_layers > block_count": "GGML_ASSERT(hparams.n_layer_nextn <= hparams.n_layer_all)",
}
ODD_VALUES = [("tokenizer.ggml.eos_token_id", "<I", 2**32 - 1), ("gemma3.rope.freq_base", "<f", float("nan"))]


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def key_at(head: bytes, key: str) -> int:
    """Offset of the key-value record for `key` (its u64 name length)."""
    encoded = key.encode()
    at = head.find(U64.pack(len(encoded)) + encoded)
    assert at > 0, key
    return at


def value_at(head: bytes, key: str) -> int:
    return key_at(head, key) + 8 + len(key) + 4


def variants(head: bytes, info: GGUFInfo, full_size: int) -> tuple[dict[str, tuple[bytes, int]], dict[str, tuple[bytes, int]]]:
    """(must be refused, may load): name -> (first bytes, file size)."""
    rng = random.Random(8)
    refused: dict[str, tuple[bytes, int]] = {}
    for cut in [1, 4, 8, 16, 24, 40]:
        refused[f"truncated at {cut}"] = (head, cut)
    for cut in sorted(rng.sample(range(41, info.data_offset), 6)) + [info.data_offset]:
        refused[f"truncated at {cut}"] = (head, cut)
    for cut in sorted(rng.sample(range(info.data_offset + 1, full_size), 2)):
        refused[f"truncated in tensor data at {cut}"] = (head, cut)
    tensor = tensor_fields(head, "token_embd.weight")
    changes = {
        "magic GGML": (0, b"GGML"), "version 0": (4, U32.pack(0)), "version 4": (4, U32.pack(4)),
        "tensor count 2**64-1": (8, U64.pack(2**64 - 1)), "tensor count +1": (8, U64.pack(info.tensor_count + 1)),
        "tensor count 0": (8, U64.pack(0)), "kv count 2**63": (16, U64.pack(2**63)),
        "kv count +1": (16, U64.pack(len(info.metadata) + 1)),
        "first key length 2**64-1": (24, U64.pack(2**64 - 1)),
        "architecture string length 2**62": (value_at(head, "general.architecture"), U64.pack(2**62)),
        "vocab count 2**40": (value_at(head, "tokenizer.ggml.tokens") + 4, U64.pack(2**40)),
        "first token length 300": (value_at(head, "tokenizer.ggml.tokens") + 12, U64.pack(300)),
        "value type 99": (value_at(head, "gemma3.block_count") - 4, U32.pack(99)),
        "tensor dim 2**40": (tensor["dims"], U64.pack(2**40)), "tensor dim 0": (tensor["dims"], U64.pack(0)),
        "tensor type 200": (tensor["type"], U32.pack(200)), "tensor offset 2**62": (tensor["offset"], U64.pack(2**62)),
        # key_length (256) renamed: a next-token-prediction layer count above the layer count trips
        # a GGML_ASSERT that no check of ours knows about: the abort hook must turn it into one line.
        "nextn_predict_layers > block_count": (key_at(head, "gemma3.attention.key_length") + 8,
                                               b"gemma3.nextn_predict_layers"),
    }
    for key, form, value in BAD_VALUES:
        changes[f"{key} = {value}"] = (value_at(head, key), struct.pack(form, value))
    for name, (offset, new) in changes.items():
        refused[name] = (patch(head, offset, new), full_size)

    loadable: dict[str, tuple[bytes, int]] = {}
    for key, form, value in ODD_VALUES:
        loadable[f"{key} = {value}"] = (patch(head, value_at(head, key), struct.pack(form, value)), full_size)
    for _ in range(6):
        at = rng.randrange(24, 64 * 1024)
        loadable[f"bit flip at {at}"] = (patch(head, at, bytes([head[at] ^ (1 << rng.randrange(8))])), full_size)
    for _ in range(3):
        at = rng.randrange(24, 64 * 1024 - 8)
        loadable[f"8 random bytes at {at}"] = (patch(head, at, rng.randbytes(8)), full_size)
    return refused, loadable


def tensor_fields(head: bytes, name: str) -> dict[str, int]:
    encoded = name.encode()
    name_at = head.rfind(U64.pack(len(encoded)) + encoded) + 8
    (n_dims,) = U32.unpack_from(head, name_at + len(encoded))
    dims = name_at + len(encoded) + 4
    return {"n_dims": dims - 4, "dims": dims, "type": dims + 8 * n_dims, "offset": dims + 8 * n_dims + 4}


def write_variant(path: Path, prefix: bytes, size: int) -> Path:
    with open(path, "wb") as out:
        out.write(prefix[:size])
        out.truncate(size)
    return path


def run_cli(env: dict[str, str], model: Path, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmachat", *CLI, "-m", str(model)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, name: str) -> None:
    assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
    assert result.stdout == "", name
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-chat: "), (name, result.stderr[-2000:])


@pytest.fixture(scope="module")
def head(model_path: Path) -> bytes:
    with open(model_path, "rb") as model:
        return model.read(read_gguf(model_path).data_offset)


# Runs the CLI's main() on each model named after the first two arguments (the log, the CLI
# arguments as JSON), in one process, with fds 1 and 2 sent to MODEL.out and MODEL.err, and a log
# line before and after each: starting Python and importing llama.cpp is most of a refusal's cost.
BATCH = """
import json, os, sys
from gemmachat.cli import main
log = open(sys.argv[1], "a", buffering=1)
for model in sys.argv[3:]:
    log.write("start " + model + "\\n")
    for fd, suffix in ((1, ".out"), (2, ".err")):
        sys.stdout.flush(); sys.stderr.flush()
        target = os.open(model + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd); os.close(target)
    code = main(json.loads(sys.argv[2]) + ["-m", model])
    sys.stdout.flush(); sys.stderr.flush()
    log.write(f"end {code} {model}\\n")
"""


def run_in_batches(env: dict[str, str], models: list[Path], log: Path) -> dict[Path, subprocess.CompletedProcess]:
    """Each model's (exit status, stdout, stderr). A process that dies (a signal, or the abort
    hook ending it) is blamed on the model it was running, and the rest go on in a new one."""
    codes: dict[Path, int] = {}
    while pending := [model for model in models if model not in codes]:
        log.write_text("")
        process = subprocess.run([sys.executable, "-c", BATCH, str(log), json.dumps(CLI), *map(str, pending)],
                                 env=env, cwd=REPO, capture_output=True, timeout=300)
        started = None
        for line in log.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "start":
                started = Path(rest)
            else:
                code, _, model = rest.partition(" ")
                codes[Path(model)] = int(code)
        if started is not None and started not in codes:
            codes[started] = process.returncode
        assert started is not None, process.stderr
    return {model: subprocess.CompletedProcess([], codes[model], Path(f"{model}.out").read_text(),
                                               Path(f"{model}.err").read_text()) for model in models}


def test_corrupted_copies_of_the_real_model_never_crash_or_hang(model_path: Path, head: bytes,
                                                                cli_env: dict[str, str], tmp_path: Path) -> None:
    info = read_gguf(model_path)
    refused, loadable = variants(head, info, model_path.stat().st_size)
    cases = {**{name: True for name in refused}, **{name: False for name in loadable}}
    data = {**refused, **loadable}
    # Sparse files: the disk holds only their first 6.5 MB each.
    paths = {name: write_variant(tmp_path / f"variant{index}.gguf", *data[name]) for index, name in enumerate(cases)}
    halves = [list(paths.values())[0::2], list(paths.values())[1::2]]
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda half: run_in_batches(cli_env, half[1], tmp_path / f"log{half[0]}"), enumerate(halves))
        by_path = {path: result for results in done for path, result in results.items()}
    results = {name: by_path[path] for name, path in paths.items()}
    problems, loaded = [], []
    for name, result in results.items():
        if result.returncode < 0:
            problems.append(f"{name}: killed by signal {-result.returncode}: {result.stderr[-500:]}")
        elif cases[name] or result.returncode != 0:
            lines = result.stderr.splitlines()
            if result.returncode != 2 or len(lines) != 1 or not lines[0].startswith("gemma-chat: "):
                problems.append(f"{name}: exit {result.returncode}, stderr {result.stderr[-500:]!r}")
            elif EXPECTED.get(name, "") not in lines[0]:
                problems.append(f"{name}: the message does not say {EXPECTED[name]!r}: {lines[0]}")
        elif result.stderr:
            problems.append(f"{name}: ran, but wrote {result.stderr[-500:]!r}")
        else:
            loaded.append(name)
    assert not problems, "\n".join(problems)
    # Random damage is mostly caught; what llama.cpp accepts (a flipped bit in a token's text, an
    # odd token id) loads and runs. Either way: one line and exit 2, or a normal run.
    assert len(loaded) < len(loadable), loaded


def test_an_empty_file_and_a_directory(cli_env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    result = run_cli(cli_env, empty)
    assert_one_line_error(result, "empty")
    assert "empty" in result.stderr
    result = run_cli(cli_env, tmp_path)
    assert_one_line_error(result, "directory")
    assert "directory" in result.stderr


def _drop_root_file_access() -> None:
    # root reads mode-000 files through two capabilities; dropping them from the bounding set
    # (prctl PR_CAPBSET_DROP) makes the program, run after exec, see "permission denied" as a user.
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_file_without_read_permission(model_path: Path, head: bytes, cli_env: dict[str, str],
                                        tmp_path: Path) -> None:
    model = write_variant(tmp_path / "locked.gguf", head, model_path.stat().st_size)
    model.chmod(0)
    as_user = {"preexec_fn": _drop_root_file_access} if os.geteuid() == 0 else {}
    result = run_cli(cli_env, model, **as_user)
    assert_one_line_error(result, "unreadable")
    assert "permission denied" in result.stderr


# -- a chat template that attacks the host -------------------------------------------------------

ATTACK = "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}"
OFFICIAL_TEMPLATE = (REPO / "tests" / "fixtures" / "gemma3-chat-template.jinja")


@pytest.fixture(scope="session")
def hostile_model(model_path: Path) -> Path:
    """The default model with ATTACK in front of the official chat template, written by the `gguf`
    package's own gguf-new-metadata. Building it takes about 40 s (the tool parses the 262k-token
    vocabulary in Python), so the result is kept, named by what went into it."""
    import platformdirs

    template = ATTACK + OFFICIAL_TEMPLATE.read_text()
    key = hashlib.sha256(f"{model_path.name}\0{version('gguf')}\0{template}".encode()).hexdigest()[:16]
    folder = Path(platformdirs.user_cache_dir("gemma-chat-tests"))
    target = folder / f"hostile-template-{key}.gguf"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        tool = Path(sys.executable).parent / "gguf-new-metadata"
        subprocess.run([str(tool), "--force", "--chat-template", template, str(model_path), str(partial)],
                       check=True, capture_output=True, timeout=600)
        partial.replace(target)
    assert read_gguf(target).chat_template == template
    return target


def test_a_template_that_reaches_python_objects_is_refused_and_ours_used(
        hostile_model: Path, model_path: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    args = ["--cli", "--chat-turn", "-p", "Say hi", "-n", "6", "--temp", "0", "-c", "256", "-t", "1"]

    def run(model: Path, *extra: str) -> subprocess.CompletedProcess:
        # In an empty folder: the attack would create PWNED in the working directory.
        return subprocess.run([sys.executable, "-m", "gemmachat", *args, "-m", str(model), *extra],
                              env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    attacked = run(hostile_model, "--jinja")
    assert attacked.returncode == 0, attacked.stderr
    assert attacked.stderr.count("\n") == 1
    assert "chat template was refused" in attacked.stderr and "gemma template" in attacked.stderr
    assert not (tmp_path / "PWNED").exists()
    assert not list(tmp_path.iterdir())
    # The built-in template was used: the same reply as the same weights without --jinja.
    assert attacked.stdout == run(model_path).stdout
