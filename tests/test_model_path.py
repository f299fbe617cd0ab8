"""Model resolution order and the default model's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gemmachat.errors import UserError
from gemmachat.model_path import default_model, resolve_model
from gemmachat.settings import parse_settings


def test_default_model_is_assembled_once_and_reused(tmp_path: Path) -> None:
    env = {"GEMMA_CHAT_CACHE_DIR": str(tmp_path)}
    messages: list[str] = []
    first = default_model(env, messages.append)
    assert first.is_file() and first.parent == tmp_path / "models"
    assert len(messages) == 1 and "copying the model" in messages[0]
    stamp = first.stat()
    # A later start finds it by name and size: no second assembly, the same file untouched.
    second = default_model(env, messages.append)
    assert second == first and len(messages) == 1
    assert second.stat().st_mtime_ns == stamp.st_mtime_ns and second.stat().st_ino == stamp.st_ino
    assert not [p for p in first.parent.iterdir() if p != first], "no temporary files left behind"


def test_a_half_written_model_is_never_used(tmp_path: Path) -> None:
    env = {"GEMMA_CHAT_CACHE_DIR": str(tmp_path)}
    good = default_model(env)
    size = good.stat().st_size
    with good.open("r+b") as handle:
        handle.truncate(size // 2)
    messages: list[str] = []
    again = default_model(env, messages.append)
    assert again.stat().st_size == size and messages, "a short file is assembled again"


def test_unwritable_cache_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="GEMMA_CHAT_CACHE_DIR"):
        default_model({"GEMMA_CHAT_CACHE_DIR": str(blocker / "cache")})


def test_flag_beats_environment_beats_default(tmp_path: Path, model_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    os.link(model_path, copy)
    env = {"GEMMA_CHAT_MODEL": str(copy), "GEMMA_CHAT_CACHE_DIR": str(tmp_path / "c")}
    assert parse_settings(["--cli"], env).model == copy
    assert parse_settings(["--cli", "-m", str(model_path)], env).model == model_path
    assert parse_settings(["--cli"], {}).model is None
    path, info = resolve_model(None, {"GEMMA_CHAT_CACHE_DIR": str(model_path.parent.parent)})
    assert path == model_path and info.architecture == "gemma3"


def test_resolve_reports_bad_files_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        resolve_model(tmp_path / "missing.gguf", {})
    assert "missing.gguf" in str(error.value) and "\n" not in str(error.value)
