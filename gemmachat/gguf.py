"""Bounds-checked reader for the header and metadata of a GGUF model file.

A model file is untrusted input and llama.cpp's own GGUF parser has had
memory-safety bugs, so the chatbot validates a file here first and only hands
it to llama.cpp when the whole layout (header, metadata, tensor table and the
extent of the tensor data) is consistent with the file's size.

Every length or count read from the file is compared with the bytes that
remain before anything is allocated or read, so a hostile file costs at most
a pass over its own bytes. Tensor data itself is never read.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, replace
from typing import BinaryIO

__all__ = ["ArraySummary", "GGUFError", "GGUFInfo", "read_gguf"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Far above any real model (Gemma 3 270M: 236 tensors, 40 keys) yet small
# enough that a forged count is rejected before we loop over it.
MAX_TENSOR_COUNT = 1_000_000
MAX_KV_COUNT = 1_000_000
# The spec caps keys at 65535 bytes; llama.cpp's GGML_MAX_NAME caps tensor
# names (including the NUL terminator) at 64 bytes.
MAX_KEY_LEN = 65_535
MAX_TENSOR_NAME_LEN = 63
MAX_DIMS = 4
# The spec permits arrays of arrays; real files use none, so anything deeper
# than an array of arrays is treated as an attack on recursion depth.
MAX_ARRAY_DEPTH = 2
# Larger arrays (tokenizer vocab, scores, merges) are skipped, not stored.
MAX_KEPT_ARRAY_LEN = 64

# Value type ids.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32 = 0, 1, 2, 3, 4, 5
T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = 6, 7, 8, 9
T_UINT64, T_INT64, T_FLOAT64 = 10, 11, 12

TYPE_NAMES: dict[int, str] = {
    T_UINT8: "UINT8", T_INT8: "INT8", T_UINT16: "UINT16", T_INT16: "INT16",
    T_UINT32: "UINT32", T_INT32: "INT32", T_FLOAT32: "FLOAT32",
    T_BOOL: "BOOL", T_STRING: "STRING", T_ARRAY: "ARRAY",
    T_UINT64: "UINT64", T_INT64: "INT64", T_FLOAT64: "FLOAT64",
}

_SCALARS: dict[int, struct.Struct] = {
    T_UINT8: struct.Struct("<B"), T_INT8: struct.Struct("<b"),
    T_UINT16: struct.Struct("<H"), T_INT16: struct.Struct("<h"),
    T_UINT32: struct.Struct("<I"), T_INT32: struct.Struct("<i"),
    T_FLOAT32: struct.Struct("<f"), T_BOOL: struct.Struct("<B"),
    T_UINT64: struct.Struct("<Q"), T_INT64: struct.Struct("<q"),
    T_FLOAT64: struct.Struct("<d"),
}

# Smallest encoding of one value of each type, used to reject counts that
# could not possibly fit in the bytes left (string: length only; array:
# element type + count).
_MIN_SIZE: dict[int, int] = {t: s.size for t, s in _SCALARS.items()}
_MIN_SIZE[T_STRING] = 8
_MIN_SIZE[T_ARRAY] = 12

# ggml type id -> (name, elements per block, bytes per block). Unknown ids
# are tolerated (newer llama.cpp may add types) with a weaker extent check.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")

# Reads are served from a sliding window so the metadata (a few MB for a
# 262k-token vocab) is read in large chunks without mapping the file: a file
# shrinking under an mmap would kill the process with SIGBUS.
_WINDOW = 1 << 20


class GGUFError(Exception):
    """str(e) is a single human-readable line naming the problem (no path
    prefix needed; caller adds it)."""


@dataclass(frozen=True)
class ArraySummary:
    """Stands in for a metadata array too long to keep (e.g. the vocab)."""

    elem_type: int
    count: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.elem_type, str(self.elem_type))

    def __repr__(self) -> str:
        return f"ArraySummary({self.type_name}, {self.count})"


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    tensor_count: int
    metadata: dict[str, object]
    data_offset: int  # from the start of the GGUF
    start: int = 0  # where the GGUF starts in its file: not 0 for the one inside the single file

    @property
    def architecture(self) -> str | None:
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        return self._str("general.name")

    @property
    def chat_template(self) -> str | None:
        return self._str("tokenizer.chat_template")

    def arch_value(self, key: str) -> object | None:
        """metadata[f"{architecture}.{key}"], e.g. "context_length"."""
        arch = self.architecture
        if arch is None:
            return None
        return self.metadata.get(f"{arch}.{key}")

    def _str(self, key: str) -> str | None:
        # A key of the wrong type is as useless to callers as a missing one.
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


def _show(text: str, limit: int = 60) -> str:
    # repr() escapes newlines and control characters, keeping errors on one
    # line even for hostile key names.
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _Reader:
    """Positions count from `start`, the GGUF's first byte in `f`; `size` is the GGUF's."""

    def __init__(self, f: BinaryIO, size: int, start: int = 0) -> None:
        self.f = f
        self.size = size
        self.start = start
        self.pos = 0
        self.base = 0
        self.buf = b""

    def need(self, n: int, what: str) -> None:
        """Fail unless n bytes at pos exist in the file, then buffer them."""
        if self.pos + n > self.size:
            raise GGUFError(
                f"file is truncated: {what} at offset {self.pos} needs {n} bytes "
                f"but the file is only {self.size} bytes"
            )
        if self.pos < self.base or self.pos + n > self.base + len(self.buf):
            self._load(self.pos, n)

    def _load(self, pos: int, n: int) -> None:
        # n has already been checked against the file size.
        self.f.seek(self.start + pos)
        want = min(max(n, _WINDOW), self.size - pos)
        data = self.f.read(want)
        if len(data) < n:
            # The file shrank after we measured it.
            raise GGUFError(
                f"file is truncated: could not read {n} bytes at offset {pos}"
            )
        self.base = pos
        self.buf = data

    def unpack(self, fmt: struct.Struct, what: str) -> int | float:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos - self.base)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.unpack(_U64, what))

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        start = self.pos - self.base
        self.pos += n
        return self.buf[start:start + n]

    def string(self, what: str, max_len: int | None = None) -> str:
        length = self.u64(f"length of {what}")
        if max_len is not None and length > max_len:
            raise GGUFError(f"{what} is {length} bytes long (limit {max_len})")
        # need() inside raw() checks the length against the file before any
        # bytes are read, so a forged length allocates nothing.
        data = self.raw(length, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} at offset {self.pos - length} is not valid UTF-8") from None

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GGUFError(
                f"file is truncated: {what} at offset {self.pos} needs {n} bytes "
                f"but the file is only {self.size} bytes"
            )
        self.pos += n

    def skip_strings(self, count: int, what: str) -> None:
        """Step over count gguf strings without decoding them.

        This is the hot loop for a 262k-token vocab, so it works on local
        variables and reloads the window only when a length prefix runs off
        the end of it.
        """
        pos, size = self.pos, self.size
        base, buf = self.base, self.buf
        end = base + len(buf)
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, f"string length in {what}")
                base, buf = self.base, self.buf
                end = base + len(buf)
            pos += 8 + unpack(buf, pos - base)[0]
            if pos > size:
                raise GGUFError(
                    f"file is truncated: a string in {what} ends at offset {pos} "
                    f"but the file is only {size} bytes"
                )
        self.pos = pos


def _check_fits(r: _Reader, count: int, elem_type: int, what: str) -> None:
    # Rejects a forged count before it drives any loop or allocation.
    least = count * _MIN_SIZE[elem_type]
    if r.pos + least > r.size:
        raise GGUFError(
            f"file is truncated: {what} claims {count} {TYPE_NAMES[elem_type]} "
            f"elements (at least {least} bytes) at offset {r.pos} "
            f"but the file is only {r.size} bytes"
        )


def _read_value(r: _Reader, vtype: int, what: str, depth: int) -> object:
    fmt = _SCALARS.get(vtype)
    if fmt is not None:
        value = r.unpack(fmt, what)
        return bool(value) if vtype == T_BOOL else value
    if vtype == T_STRING:
        return r.string(what)
    if vtype == T_ARRAY:
        return _read_array(r, what, depth + 1)
    raise GGUFError(f"{what} has unknown value type {vtype} at offset {r.pos - 4}")


def _read_array(r: _Reader, what: str, depth: int) -> object:
    if depth > MAX_ARRAY_DEPTH:
        raise GGUFError(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
    elem_type = r.u32(f"element type of {what}")
    if elem_type not in TYPE_NAMES:
        raise GGUFError(f"{what} has unknown array element type {elem_type}")
    count = r.u64(f"element count of {what}")
    _check_fits(r, count, elem_type, what)
    if count <= MAX_KEPT_ARRAY_LEN:
        return [_read_value(r, elem_type, f"element of {what}", depth) for _ in range(count)]
    fmt = _SCALARS.get(elem_type)
    if fmt is not None:
        r.skip(count * fmt.size, what)
    elif elem_type == T_STRING:
        r.skip_strings(count, what)
    else:
        for _ in range(count):
            # Nested arrays are still walked so their extent is validated.
            _read_array(r, f"element of {what}", depth + 1)
    return ArraySummary(elem_type, count)


def _open(path: str | os.PathLike) -> BinaryIO:
    # stat before open: opening a FIFO would block and a device could be
    # endless, so only regular files get opened at all.
    try:
        st = os.stat(path)
    except OSError as e:
        raise _file_error(e, "access") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError("is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError("not a regular file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise _file_error(e, "open") from None


def _file_error(e: OSError, doing: str) -> GGUFError:
    if isinstance(e, FileNotFoundError):
        return GGUFError("no such file")
    if isinstance(e, NotADirectoryError):
        return GGUFError("no such file (a parent in the path is not a directory)")
    if isinstance(e, PermissionError):
        return GGUFError("permission denied")
    if isinstance(e, IsADirectoryError):
        return GGUFError("is a directory, not a GGUF file")
    return GGUFError(f"cannot {doing} file: {e.strerror or e}")


def read_gguf(path: str | os.PathLike, start: int = 0, size: int | None = None) -> GGUFInfo:
    """Validate a GGUF file's layout and return its header and metadata.

    With `start` and `size`, the GGUF is that byte range of the file (the
    single file carries one after its program); the bounds checks then hold
    it to that range, not to the file around it.

    Raises GGUFError (never another exception type for bad content) when the
    file cannot be read or anything in it is inconsistent or truncated.
    """
    f = _open(path)
    try:
        with f:
            file_size = os.fstat(f.fileno()).st_size
            if size is None:
                size = file_size - start
            if start < 0 or size < 0 or start + size > file_size:
                raise GGUFError(f"file is truncated: the model should end at offset {start + size} "
                                f"but the file is only {file_size} bytes")
            return replace(_parse(_Reader(f, size, start)), start=start)
    except OSError as e:
        # An I/O error mid-read (e.g. a failing disk) is still "cannot use".
        raise GGUFError(f"read error: {e.strerror or e}") from None


def _parse(r: _Reader) -> GGUFInfo:
    size = r.size
    if size == 0:
        raise GGUFError("file is empty")
    if size < 4:
        head = r.raw(size, "magic")
        if GGUF_MAGIC.startswith(head):
            raise GGUFError(f"file is truncated: only {size} bytes")
        raise GGUFError(f"not a GGUF file (starts with {head!r})")
    magic = r.raw(4, "magic")
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file (starts with {magic!r})")

    version = r.u32("version")
    if version == 1:
        raise GGUFError(
            "GGUF version 1 is not supported (it used 32-bit counts); "
            "re-download or re-convert the model"
        )
    if version not in SUPPORTED_VERSIONS:
        if (version & 0xFFFFFF) == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise GGUFError("big-endian GGUF files are not supported")
        raise GGUFError(f"unsupported GGUF version {version} (supported: 2, 3)")

    tensor_count = r.u64("tensor count")
    kv_count = r.u64("metadata count")
    if tensor_count > MAX_TENSOR_COUNT:
        raise GGUFError(f"absurd tensor count {tensor_count} (limit {MAX_TENSOR_COUNT})")
    if kv_count > MAX_KV_COUNT:
        raise GGUFError(f"absurd metadata count {kv_count} (limit {MAX_KV_COUNT})")
    # Smallest KV: key length + type + 1-byte value. Smallest tensor info:
    # name length + n_dims + type + offset.
    least = r.pos + kv_count * 13 + tensor_count * 24
    if least > size:
        raise GGUFError(
            f"{kv_count} metadata entries and {tensor_count} tensors cannot fit in "
            f"a {size}-byte file (truncated or corrupt header)"
        )

    metadata: dict[str, object] = {}
    for i in range(kv_count):
        key = r.string(f"metadata key #{i}", MAX_KEY_LEN)
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {_show(key)}")
        vtype = r.u32(f"value type of {_show(key)}")
        if vtype not in TYPE_NAMES:
            raise GGUFError(f"metadata {_show(key)} has unknown value type {vtype}")
        if key == "general.alignment" and vtype != T_UINT32:
            # llama.cpp fetches it with gguf_get_val_u32, which aborts the
            # process on any other type.
            raise GGUFError(
                f"general.alignment has type {TYPE_NAMES[vtype]}, expected UINT32"
            )
        metadata[key] = _read_value(r, vtype, f"metadata {_show(key)}", 0)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    assert isinstance(alignment, int)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment {alignment} is not a power of two")

    tensors = _read_tensor_infos(r, tensor_count, alignment)

    data_offset = -(-r.pos // alignment) * alignment
    if tensor_count and data_offset > size:
        raise GGUFError(
            f"file is truncated: tensor data should start at offset {data_offset} "
            f"but the file is only {size} bytes"
        )
    data_size = size - data_offset
    for name, offset, nbytes in tensors:
        if nbytes is None:
            # Unknown ggml type: size unknown, but it must at least start
            # inside the data section.
            if offset >= data_size:
                raise GGUFError(
                    f"file is truncated: tensor {_show(name)} starts at offset "
                    f"{data_offset + offset} but the file is only {size} bytes"
                )
        elif offset + nbytes > data_size:
            raise GGUFError(
                f"file is truncated: tensor {_show(name)} data ends at offset "
                f"{data_offset + offset + nbytes} but the file is only {size} bytes"
            )

    return GGUFInfo(
        version=version,
        tensor_count=tensor_count,
        metadata=metadata,
        data_offset=data_offset,
    )


def _read_tensor_infos(
    r: _Reader, tensor_count: int, alignment: int
) -> list[tuple[str, int, int | None]]:
    """Return (name, offset within data section, byte size or None)."""
    tensors: list[tuple[str, int, int | None]] = []
    seen: set[str] = set()
    for i in range(tensor_count):
        name = r.string(f"name of tensor #{i}", MAX_KEY_LEN)
        label = f"tensor {_show(name)}"
        if len(name.encode()) > MAX_TENSOR_NAME_LEN:
            raise GGUFError(f"{label} name is longer than {MAX_TENSOR_NAME_LEN} bytes")
        if name in seen:
            raise GGUFError(f"duplicate {label}")
        seen.add(name)
        n_dims = r.u32(f"dimension count of {label}")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"{label} has {n_dims} dimensions (limit {MAX_DIMS})")
        dims = [r.u64(f"dimensions of {label}") for _ in range(n_dims)]
        n_elements = 1
        for d in dims:
            n_elements *= d
        # ggml stores element counts in int64; anything larger overflows it.
        if any(d >= 1 << 63 for d in dims) or n_elements >= 1 << 63:
            raise GGUFError(f"{label} has absurd dimensions {dims}")
        ggml_type = r.u32(f"type of {label}")
        offset = r.u64(f"data offset of {label}")
        if offset % alignment:
            raise GGUFError(
                f"{label} data offset {offset} is not a multiple of the alignment {alignment}"
            )
        nbytes: int | None = None
        known = GGML_TYPES.get(ggml_type)
        if known is not None:
            type_name, block_elems, block_bytes = known
            row = dims[0] if dims else 1
            if row % block_elems:
                raise GGUFError(
                    f"{label} row of {row} elements is not a multiple of the "
                    f"{type_name} block size {block_elems}"
                )
            nbytes = n_elements // block_elems * block_bytes
        tensors.append((name, offset, nbytes))
    return tensors
