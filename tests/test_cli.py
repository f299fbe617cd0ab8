"""The `--cli` mode as a user runs it: a real subprocess on the real model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from gemmachat.engine import Engine
from gemmachat.settings import Sampling
from gemmachat.templates import Segment, to_tokens

GREEDY = ("--temp", "0")


def test_cli_prints_only_the_completion_and_nothing_on_stderr(run_cli, engine: Engine) -> None:
    result = run_cli("--cli", "-p", "The capital of France is", "-n", "24", *GREEDY)
    assert result.returncode == 0, result.stderr
    # No llama.cpp log line, no banner: stderr is empty without --verbose.
    assert result.stderr == ""
    tokens = to_tokens(engine, [Segment("The capital of France is", False)])
    expected = engine.generate(engine.new_sequence(), tokens, Sampling(temperature=0), max_tokens=24).text()
    assert result.stdout == expected
    assert "France" not in result.stdout[:5] and len(result.stdout) > 20


def test_cli_is_deterministic_at_temp_0_and_honours_n(run_cli, engine: Engine) -> None:
    first = run_cli("--cli", "-p", "def fibonacci(n):", "-n", "16", *GREEDY)
    second = run_cli("--cli", "-p", "def fibonacci(n):", "-n", "16", *GREEDY)
    assert first.returncode == 0 and first.stdout == second.stdout
    assert len(engine.tokenize(first.stdout)) in range(14, 19)  # 16 tokens, re-tokenized
    # -n 0 is llama.cpp's "generate nothing" (it generated until the context was full).
    nothing = run_cli("--cli", "-p", "def fibonacci(n):", "-n", "0", *GREEDY, timeout=30)
    assert nothing.returncode == 0 and nothing.stdout == "" and nothing.stderr == ""


def test_verbose_shows_llama_cpp_log(run_cli) -> None:
    result = run_cli("--cli", "-p", "Hello", "-n", "2", "--verbose")
    assert result.returncode == 0
    assert "llama_model_load" in result.stderr or "llama_context" in result.stderr
    assert "tokens/s" in result.stderr


def test_without_verbose_llama_cpps_debug_lines_never_reach_python() -> None:
    """gemmachat/_quiet_log.c: debug lines, and the lines that continue them, are dropped in C;
    every other line goes on to the Python callback, in order."""
    import ctypes

    from gemmachat import _quiet_log
    from gemmachat.bindings import llama_cpp

    received = []
    python_side = llama_cpp.llama_log_callback(lambda level, text, _: received.append((level, text)))
    quiet = llama_cpp.llama_log_callback(_quiet_log.CALLBACK)
    debug, info, error, cont = 1, 2, 4, 5  # ggml.h's levels
    for level, text in [(info, b"a"), (cont, b"a+"), (debug, b"b"), (cont, b"b+"), (error, b"c"), (cont, b"c+")]:
        quiet(level, text, ctypes.cast(python_side, ctypes.c_void_p))
    assert received == [(info, b"a"), (cont, b"a+"), (error, b"c"), (cont, b"c+")]


def test_prompt_from_stdin_and_from_a_file(run_cli, tmp_path: Path) -> None:
    by_flag = run_cli("--cli", "-p", "Once upon a time", "-n", "12", *GREEDY).stdout
    assert run_cli("--cli", "-n", "12", *GREEDY, input="Once upon a time").stdout == by_flag
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    assert run_cli("--cli", "-f", str(prompt), "-n", "12", *GREEDY).stdout == by_flag
    # "-" is stdin, as everywhere ("cannot read prompt file -: no such file" before).
    assert run_cli("--cli", "-f", "-", "-n", "12", *GREEDY, input="Once upon a time").stdout == by_flag
    chat = run_cli("--chat", "-f", "-", input="Hello\n")
    assert chat.returncode == 2 and chat.stderr == ("gemma-chat: -f - reads stdin, where the chat reads its "
                                                    "messages: give the system prompt with -p or in a file\n")


def test_a_prompt_typed_in_a_terminal_ends_with_one_ctrl_d(run_cli, cli_env: dict[str, str]) -> None:
    # It took two (the read went on to fill its size), and nothing said what it was waiting for.
    by_flag = run_cli("--cli", "-p", "Once upon a time\n", "-n", "6", *GREEDY).stdout
    child = pexpect.spawn(sys.executable, ["-m", "gemmachat", "--cli", "-n", "6", *GREEDY], env=cli_env,
                          encoding="utf-8", timeout=60)
    child.expect("reading the prompt from the terminal; ctrl-d on a line of its own ends it")
    child.sendline("Once upon a time")
    child.expect("Once upon a time")  # the terminal's echo
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and by_flag.strip() and by_flag.strip() in child.before.replace("\r\n", "\n")


def test_invalid_utf8_on_stdin_is_not_an_error(run_cli) -> None:
    result = run_cli("--cli", "-n", "4", *GREEDY, input=b"caf\xe9 \xff\xfe is")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""


def test_stop_string_ends_the_completion_before_it(run_cli) -> None:
    full = run_cli("--cli", "-p", "1, 2, 3, 4,", "-n", "24", *GREEDY).stdout
    assert " 7," in full, full
    stopped = run_cli("--cli", "-p", "1, 2, 3, 4,", "-n", "24", *GREEDY, "--stop", " 7,")
    assert stopped.returncode == 0
    assert stopped.stdout == full[:full.index(" 7,")]


def test_chat_turn_wraps_the_prompt_as_a_user_turn(run_cli, engine: Engine) -> None:
    result = run_cli("--cli", "--chat-turn", "--system", "Be brief.", "-p", "Name a colour.",
                     "-n", "8", *GREEDY)
    assert result.returncode == 0, result.stderr
    from gemmachat.templates import Message, load_template, render

    tokens = to_tokens(engine, render(load_template("gemma"), "Be brief.", [Message("user", "Name a colour.")]))
    expected = engine.generate(engine.new_sequence(), tokens, Sampling(temperature=0), max_tokens=8).text()
    assert result.stdout == expected


def test_special_flag_changes_how_markers_in_the_prompt_are_read(run_cli) -> None:
    prompt = "<start_of_turn>user\nSay hi<end_of_turn>\n<start_of_turn>model\n"
    plain = run_cli("--cli", "-p", prompt, "-n", "8", *GREEDY)
    special = run_cli("--cli", "-p", prompt, "-n", "8", *GREEDY, "--special")
    assert plain.returncode == special.returncode == 0
    assert plain.stdout != special.stdout


def test_emoji_and_cjk_are_never_split(run_cli) -> None:
    result = run_cli("--cli", "-p", "日本語の文章: 東京は", "-n", "32", *GREEDY)
    assert result.returncode == 0
    assert "\ufffd" not in result.stdout
    emoji = run_cli("--cli", "-p", "Emoji list: 😀 😃 😄 😁", "-n", "24", *GREEDY)
    assert "\ufffd" not in emoji.stdout


def test_broken_pipe_exits_quietly(cli_env: dict[str, str]) -> None:
    command = (f"{sys.executable} -m gemmachat --cli -p 'Count: 1, 2, 3,' -n 200 --temp 0 "
               "| head -c 10")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                            env=cli_env, timeout=120)
    assert len(result.stdout) == 10
    assert "Traceback" not in result.stderr and "Error" not in result.stderr


# -- bad input: one line on stderr, exit status 2, never a traceback ------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gemma-chat: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_file(run_cli, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--cli", "-p", "x", "-m", str(tmp_path / "nope.gguf")), "no such file")


def test_model_is_a_directory(run_cli, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--cli", "-p", "x", "-m", str(tmp_path)), "directory")


def test_model_is_not_a_gguf(run_cli, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    assert_one_line_error(run_cli("--cli", "-p", "x", "-m", str(fake)), "not a GGUF")


def test_empty_model_file(run_cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    assert_one_line_error(run_cli("--cli", "-p", "x", "-m", str(empty)), "empty")


@pytest.mark.parametrize("fraction", [0.0001, 0.02, 0.5, 0.999])
def test_truncated_model(run_cli, model_path: Path, tmp_path: Path, fraction: float) -> None:
    data = model_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    assert_one_line_error(run_cli("--cli", "-p", "x", "-m", str(cut)), "truncated")


def test_architecture_llama_cpp_cannot_load(run_cli, model_path: Path, tmp_path: Path) -> None:
    data = bytearray(model_path.read_bytes())
    key = b"general.architecture"
    # The value follows the key: uint32 type, uint64 length, then "gemma3"; same length keeps
    # every offset valid, so only llama.cpp can object.
    value_at = data.index(key) + len(key) + 4 + 8
    assert data[value_at:value_at + 6] == b"gemma3"
    data[value_at:value_at + 6] = b"zebra9"
    alien = tmp_path / "alien.gguf"
    alien.write_bytes(bytes(data))
    assert_one_line_error(run_cli("--cli", "-p", "x", "-m", str(alien)), "zebra9")


def test_model_from_environment_variable(run_cli, tmp_path: Path) -> None:
    result = run_cli("--cli", "-p", "x", env={"GEMMA_CHAT_MODEL": str(tmp_path / "env.gguf")})
    assert_one_line_error(result, "env.gguf")


def test_bad_flags_and_prompts(run_cli, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--cli", "--bogus"), "--bogus")
    assert_one_line_error(run_cli("--cli", "-c", "-5"), "-c")
    assert_one_line_error(run_cli("--cli", "-p", ""), "empty")
    assert_one_line_error(run_cli("--cli", "-f", str(tmp_path / "none.txt")), "none.txt")
    assert_one_line_error(run_cli("--cli", "-p", "a", "-f", str(tmp_path)), "-p or -f")
    assert_one_line_error(run_cli("--cli", "-p", "x", "--template", "nope"), "unknown template")
    # An empty title started a new conversation at every call: nothing was ever continued.
    assert_one_line_error(run_cli("--cli", "-p", "x", "--save-to", " "), "--save-to needs a title")


FLAG_ERRORS = {
    "not a whole number": (("-c", "abc"),
                           "argument -c/--ctx-size: expects a whole number, not 'abc' (see gemma-chat --help)"),
    "a fraction for a whole number": (("-n", "2.5"), "argument -n/--n-predict: expects a whole number, not '2.5'"),
    "not a number": (("--temp", "hot"), "argument --temp: expects a number, not 'hot'"),
    "not a finite number": (("--top-p", "nan"), "argument --top-p: expects a number, not 'nan'"),
    "an overflowing number": (("--temp", "1e999"), "argument --temp: expects a number, not '1e999'"),
    "not a port": (("--port", "99999"), "argument --port: expects a port number from 1 to 65535, not '99999'"),
    "not positive": (("-t", "0"), "argument -t/--threads: expects a whole number of 1 or more, not '0'"),
    "negative": (("-c", "-5"), "argument -c/--ctx-size: expects a whole number of 0 or more, not '-5'"),
    "a typo": (("--tmep", "0.5"),
               "unrecognized arguments: --tmep (did you mean --temp?) 0.5 (see gemma-chat --help)"),
    "a typo with its value": (("--ctx-sise=64",), "unrecognized arguments: --ctx-sise=64 (did you mean --ctx-size?)"),
    "nothing close": (("--zzzzzz",), "unrecognized arguments: --zzzzzz (see gemma-chat --help)"),
}


@pytest.mark.parametrize("case", list(FLAG_ERRORS), ids=list(FLAG_ERRORS))
def test_flag_errors_read_as_words_and_typos_get_a_suggestion(run_cli, case: str) -> None:
    args, message = FLAG_ERRORS[case]
    result = run_cli("--cli", "-p", "x", *args)
    assert_one_line_error(result, message)
    assert "_int" not in result.stderr and "invalid" not in result.stderr


def test_prompt_longer_than_the_context(run_cli) -> None:
    result = run_cli("--cli", "-c", "64", "-p", "word " * 1000)
    assert_one_line_error(result, "context")


def test_a_context_over_the_training_context_is_cut_with_one_notice(run_cli) -> None:
    result = run_cli("--cli", "-c", "999999999", "-p", "Hi", "-n", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "gemma-chat: -c 999999999 is more than the model's training context; using 32768"]
    exact = run_cli("--cli", "-c", "32768", "-p", "Hi", "-n", "2")
    assert exact.returncode == 0 and exact.stderr == ""


def test_flags_of_other_modes_are_accepted_in_cli_mode(run_cli) -> None:
    result = run_cli("--cli", "-p", "Hi", "-n", "2", "--port", "9999", "--host", "0.0.0.0",
                     "--nologo", "--plain", "--nobrowser", "--log-disable", "-np", "2")
    assert result.returncode == 0, result.stderr


def test_gpu_layers_without_gpu_support_is_one_notice(run_cli) -> None:
    # This machine has no GPU and the CI build has no CUDA: the CPU path is the real one here.
    result = run_cli("--cli", "-p", "Hi", "-n", "2", "-ngl", "999")
    assert result.returncode == 0
    assert result.stderr.strip().splitlines() == [
        "gemma-chat: no GPU found, running on the CPU (this llama.cpp build has no GPU support: README, GPU)"
    ]


def test_help_documents_every_option(run_cli) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--cli", "--chat", "--server", "-m", "-p", "-f", "-c", "-ngl", "-t", "-b", "--seed",
                 "--mlock", "--no-mmap", "--temp", "--top-k", "--top-p", "--min-p",
                 "--repeat-penalty", "-n", "--ignore-eos", "--stop", "--verbose", "--special",
                 "--template", "--jinja", "--chat-turn", "--system"):
        assert f" {flag}" in result.stdout, flag


def test_console_script_is_installed() -> None:
    script = shutil.which("gemma-chat", path=os.path.dirname(sys.executable))
    assert script, "pip install should put gemma-chat beside the interpreter"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("gemma-chat ")


def test_a_gpu_out_of_memory_says_what_to_try() -> None:
    # No GPU here, so no real out-of-memory: these are the reasons llama.cpp gives for one, as its
    # log words them (llama-model.cpp, ggml-alloc.c, ggml-cuda.cu), through the engine's hint.
    from gemmachat.engine import EngineOptions, _gpu_memory_hint

    on_gpu, on_cpu = EngineOptions(n_gpu_layers=999), EngineOptions()
    for reason in ("unable to allocate CUDA0 buffer",
                   "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 1073741824",
                   "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 2048.00 MiB on device 0: "
                   "cudaMalloc failed: out of memory"):
        assert "try a smaller -ngl, or a smaller -c" in _gpu_memory_hint(reason, on_gpu)
        assert _gpu_memory_hint(reason, on_cpu) == ""
    assert _gpu_memory_hint("unknown model architecture: 'llama9'", on_gpu) == ""
