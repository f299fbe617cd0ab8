"""The config file: keys are long flag names; flags > environment > config file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmachat.errors import UserError
from gemmachat.settings import parse_settings


def settings_with(config: Path, *argv: str, **environ: str):
    return parse_settings(list(argv), {"GEMMA_CHAT_CONFIG": str(config), **environ})


def test_config_values_replace_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('ctx-size = 4096\ntemp = 0.2\nmodel = "/models/x.gguf"\nport = 8081\n'
                      'mlock = true\nno-mmap = true\nstop = ["###", "END"]\nflash-attn = "off"\n'
                      'top-p = 1\nserver = true\n')
    settings = settings_with(config)
    assert settings.ctx_size == 4096 and settings.port == 8081
    assert settings.sampling.temperature == 0.2 and settings.temp_given
    assert settings.sampling.top_p == 1.0
    assert settings.model == Path("/models/x.gguf")
    assert settings.mlock and not settings.mmap
    assert settings.stop == ("###", "END") and settings.flash_attn == "off"
    assert settings.mode == "server"


def test_flags_beat_environment_beat_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('model = "/from/config.gguf"\napi-key = "config-key"\nport = 9000\n')
    settings = settings_with(config)
    assert settings.model == Path("/from/config.gguf") and settings.api_key == "config-key"
    settings = settings_with(config, GEMMA_CHAT_MODEL="/from/env.gguf", GEMMA_CHAT_API_KEY="env-key")
    assert settings.model == Path("/from/env.gguf") and settings.api_key == "env-key"
    settings = settings_with(config, "-m", "/from/flag.gguf", "--api-key", "flag-key", "--port", "9001",
                                "--cli", GEMMA_CHAT_MODEL="/from/env.gguf", GEMMA_CHAT_API_KEY="env-key")
    assert settings.model == Path("/from/flag.gguf") and settings.api_key == "flag-key"
    assert settings.port == 9001 and settings.mode == "cli"


def test_no_config_file_gives_the_defaults(tmp_path: Path) -> None:
    # The default location: absent is normal, not an error.
    settings = parse_settings(["--cli"], {"XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)})
    assert settings.port == 8080 and settings.ctx_size is None and settings.sampling.temperature == 0.8


BAD_CONFIGS = {
    "unknown key": ("ctxsize = 4096\n", "unknown key 'ctxsize'"),
    "help is not a setting": ("help = true\n", "unknown key 'help'"),
    "string for an integer": ('ctx-size = "4096"\n', "key 'ctx-size' must be a number"),
    "float for an integer": ("port = 80.5\n", "key 'port': expects a whole number, not '80.5'"),
    "bool for a number": ("temp = true\n", "key 'temp' must be a number"),
    "number for a string": ("model = 5\n", "key 'model' must be a string"),
    "string for a switch": ('mlock = "yes"\n', "key 'mlock' must be true or false"),
    "out of range": ("port = 70000\n", "key 'port': expects a port number from 1 to 65535"),
    "not a choice": ('flash-attn = "maybe"\n', "key 'flash-attn' must be one of on, off, auto"),
    "stop not a list": ('stop = "###"\n', "key 'stop' must be a list of strings"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_a_wrong_key_or_value_is_an_error_naming_the_file_and_key(tmp_path: Path, case: str) -> None:
    text, fragment = BAD_CONFIGS[case]
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(UserError) as raised:
        settings_with(config)
    message = str(raised.value)
    assert str(config) in message and fragment in message and "\n" not in message
    assert config.read_text() == text  # a file with a mistake in it is the user's to fix, not moved


def test_config_named_by_the_environment_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        settings_with(tmp_path / "missing.toml")


def test_the_cli_reports_a_bad_key_in_one_line_with_exit_2(run_cli, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("tempp = 0.2\n")
    result = run_cli("--cli", "-p", "x", env={"GEMMA_CHAT_CONFIG": str(config)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"gemma-chat: config file {config}: unknown key 'tempp' (keys are long flag " \
                            "names, see gemma-chat --help)\n"


@pytest.mark.parametrize("content", [b"temp = = 0.2\n", b"model = \"\xff\xfe\"\n", b"[unclosed\n",
                                     b'api-key = "s3cret"\nparallel = 2,\n'])
def test_a_config_that_does_not_parse_is_refused_in_one_line_and_left_as_it_is(run_cli, tmp_path: Path,
                                                                                content: bytes) -> None:
    # It was renamed aside and the program ran without it: a server, without the api-key it names.
    home = tmp_path / "home"
    config = home / ".config" / "gemma-chat" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_bytes(content)
    result = run_cli("--server", "--nobrowser", "--port", "1", env={"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"gemma-chat: config file {config} is not ") and result.stderr.count("\n") == 1
    assert result.stderr.endswith(": correct it, or move it away\n"), result.stderr
    assert config.read_bytes() == content and sorted(p.name for p in config.parent.iterdir()) == ["config.toml"]


def test_help_documents_the_config_file(run_cli) -> None:
    result = run_cli("--help")
    text = " ".join(result.stdout.split())
    assert "$GEMMA_CHAT_CONFIG" in text and "config.toml" in text and "ctx-size = 4096" in text


def test_one_model_source_wins_between_m_and_hf(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('hf-repo = "gemma3:1b"\n')
    # hf-repo in the config file is the model unless a stronger source names a file ...
    def chosen(*argv: str, **environ: str) -> tuple[str | None, Path | None]:
        settings = settings_with(config, "--cli", *argv, **environ)
        return settings.hf_repo, settings.model

    assert chosen() == ("gemma3:1b", None)
    assert chosen("-m", "x.gguf") == (None, Path("x.gguf"))
    # As argparse reads them: attached, abbreviated, with "=" (each was "the config file gives both").
    for spelling in (["-mx.gguf"], ["--mod", "x.gguf"], ["--model=x.gguf"]):
        assert chosen(*spelling) == (None, Path("x.gguf")), spelling
    assert chosen(GEMMA_CHAT_MODEL="y.gguf") == (None, Path("y.gguf"))
    # ... and -hf on the command line beats a file from the environment; both flags at once is an error.
    assert chosen("-hf", "a/b", GEMMA_CHAT_MODEL="y.gguf") == ("a/b", None)
    with pytest.raises(UserError, match="both a model"):
        chosen("-hf", "a/b", "-m", "x.gguf")
    config.write_text("")
    with pytest.raises(UserError, match="--hf-file"):
        chosen("--hf-file", "x.gguf")


def test_flags_replace_the_config_files_lists_and_its_prompt_is_the_chats(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('stop = ["girl"]\nprompt = "You are a pirate."\n')
    # --stop replaces the config file's list (argparse had added to it).
    assert settings_with(config, "--cli", "--stop", "ZZZ").stop == ("ZZZ",)
    assert settings_with(config, "--cli").stop == ("girl",)
    # The config file's prompt is the chat's system prompt. In --cli, where the prompt is each
    # call's own, it had been completed instead of stdin, and -f was "not both" with it.
    assert settings_with(config).prompt == "You are a pirate."
    cli = settings_with(config, "--cli")
    assert cli.prompt is None and cli.prompt_file is None
    assert settings_with(config, "--cli", "-f", "p.txt").prompt_file == "p.txt"
    assert settings_with(config, "--cli", "--prom", "Hi").prompt == "Hi"
    # A -f on the command line beats the config file's -p in the chat too.
    chat = settings_with(config, "-f", "system.txt")
    assert (chat.prompt, chat.prompt_file) == (None, "system.txt")
    with pytest.raises(UserError, match="-p or -f, not both"):
        settings_with(config, "--cli", "-p", "a", "-f", "b")
