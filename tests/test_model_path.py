"""Model resolution order and the default model's cache."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import pytest

from gemmachat import engine as engine_module
from gemmachat.bundle import BUNDLE_VARIABLE, read_trailer
from gemmachat.engine import Engine
from gemmachat.errors import UserError
from gemmachat.model_path import default_model, resolve_model
from gemmachat.settings import Sampling, parse_settings

REPO = Path(__file__).resolve().parent.parent


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
    path, info, name = resolve_model(None, {"GEMMA_CHAT_CACHE_DIR": str(model_path.parent.parent)})
    assert path == model_path and name == model_path.name and info.architecture == "gemma3" and info.start == 0


def test_resolve_reports_bad_files_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        resolve_model(tmp_path / "missing.gguf", {})
    assert "missing.gguf" in str(error.value) and "\n" not in str(error.value)


def single_file(tmp_path: Path, model: Path) -> Path:
    """A file laid out as packaging/build.py lays out the single file, around a stand-in program."""
    spec = importlib.util.spec_from_file_location("gemma_chat_build", REPO / "packaging" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    launcher = tmp_path / "launcher"
    launcher.write_bytes(b"\x7fELF stand-in launcher")
    program = tmp_path / "program"
    program.mkdir()
    (program / "gemma-chat").write_bytes(b"stand-in program")
    return build.pack(launcher, program, model, "gemma.gguf", tmp_path / "dist" / "gemma-chat", external_model=False)


def test_the_single_files_gguf_is_used_in_place(tmp_path: Path, model_path: Path, engine: Engine) -> None:
    bundle = single_file(tmp_path, model_path)
    env = {"GEMMA_CHAT_CACHE_DIR": str(tmp_path / "cache"), BUNDLE_VARIABLE: str(bundle)}
    messages: list[str] = []
    path, info, name = resolve_model(None, env, messages.append)
    trailer = read_trailer(bundle)
    assert (path, info.start, name) == (bundle, trailer.model_offset, "gemma.gguf")
    assert info.start % 4096 == 0 and info.tensor_count == engine.info.tensor_count
    assert messages == [] and not (tmp_path / "cache").exists(), "nothing copied"
    # llama.cpp loads it from inside the file and answers as from the GGUF itself.
    tokens = engine.tokenize("The capital of France is", add_bos=True)
    expected = engine.generate(engine.new_sequence(), tokens, Sampling(temperature=0.0), max_tokens=12).text()
    with Engine(path, info, replace(engine.options, inline=True), name) as embedded:
        assert embedded.name == "gemma.gguf"
        assert embedded.generate(embedded.new_sequence(), tokens, Sampling(temperature=0.0), max_tokens=12).text() == expected


def test_the_single_files_gguf_is_copied_where_it_cannot_be_used_in_place(tmp_path: Path, model_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands in for Windows, where a FILE cannot pass from Python's C runtime to llama.dll's: that
    # platform cannot run here, so the capability is switched off instead.
    monkeypatch.setattr(engine_module, "loads_at_offset", lambda: False)
    bundle = single_file(tmp_path, model_path)
    env = {"GEMMA_CHAT_CACHE_DIR": str(tmp_path / "cache"), BUNDLE_VARIABLE: str(bundle)}
    messages: list[str] = []
    path, info, name = resolve_model(None, env, messages.append)
    assert path.parent == tmp_path / "cache" / "models" and info.start == 0 and name == "gemma.gguf"
    assert path.read_bytes() == model_path.read_bytes()
    assert len(messages) == 1 and "cannot read it in place" in messages[0]
    assert resolve_model(None, env, messages.append).path == path and len(messages) == 1, "copied once"


def test_a_single_file_whose_gguf_is_cut_short_is_one_line(tmp_path: Path, model_path: Path) -> None:
    bundle = single_file(tmp_path, model_path)
    trailer = read_trailer(bundle)
    # The trailer promises more bytes than the GGUF has: validation holds to the GGUF's own range.
    forged = replace(trailer, model_size=trailer.model_size - 4096)
    with bundle.open("r+b") as handle:
        handle.seek(-len(forged.pack()), os.SEEK_END)
        handle.write(forged.pack())
    with pytest.raises(UserError, match="truncated") as error:
        resolve_model(None, {"GEMMA_CHAT_CACHE_DIR": str(tmp_path / "cache"), BUNDLE_VARIABLE: str(bundle)})
    assert "\n" not in str(error.value)


def small_split(folder: Path, count: int) -> list[Path]:
    """A model split in `count` parts, one small tensor each, as llama.cpp's gguf-split names them."""
    import gguf
    import numpy

    paths = []
    for number in range(1, count + 1):
        path = folder / f"m-{number:05d}-of-{count:05d}.gguf"
        writer = gguf.GGUFWriter(path, "gemma3")
        writer.add_uint16("split.no", number - 1)
        writer.add_uint16("split.count", count)
        writer.add_tensor(f"t{number}", numpy.zeros(4, dtype=numpy.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(path)
    return paths


def test_every_part_of_a_split_model_is_checked_before_llama_cpp_opens_it(tmp_path: Path) -> None:
    first, second, third = small_split(tmp_path, 3)

    def refusal(path: Path) -> str:
        with pytest.raises(UserError) as error:
            resolve_model(path, {})
        return str(error.value)

    assert resolve_model(first, {}).info.metadata["split.count"] == 3
    assert "give the first part (…-00001-of-00003.gguf)" in refusal(second)
    third.write_bytes(third.read_bytes()[:40])
    assert "part 3 of 3 (m-00003-of-00003.gguf): 3 metadata entries and 1 tensors cannot fit" in refusal(first)
    third.unlink()
    assert "part 3 of 3 is missing: m-00003-of-00003.gguf" in refusal(first)
    third.write_bytes(second.read_bytes())  # the second part again, under the third's name
    assert "is not part 3 of this 3-part model" in refusal(first)
