"""Check a safetensors weights file's header before any tensor is read: the 8-byte length and the JSON header
read by hand (bounded, against the file size), the dtypes (floating point only, integer buffers where a caller
names them), data offsets consistent with the shapes and the file, and the names and shapes equal to those a
checked config implies (`check_safetensors_header(path, expected_shapes)`; the shapes come from a model built on
the meta device, `diffit.io.expected_state_shapes`). A 1 KB header can list zero-element tensors whose shapes
decide the architecture, so nothing is trusted before this. Refusals are `diffit.config_check.InvalidModelFileError`.
No torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .config_check import InvalidModelFileError, _is_int

MAX_HEADER_BYTES = 8 * 2**20  # XL/2's safetensors header is ~40 KB
MAX_TENSOR_RANK = 8

# safetensors dtype names -> bytes per element. Weights must be floating point; integer tensors are refused
# except where a caller names them (the released checkpoints' int64 relative-position index buffers).
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INTEGER_DTYPES = ("I64", "I32", "I16")
ZIP_MAGIC = b"PK\x03\x04"


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header ({name: {dtype, shape, data_offsets}}, `__metadata__`
    dropped), each checked against the format and the file size. Reads the first 8 + header bytes only."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise InvalidModelFileError(path, "empty file, not safetensors")
        head = handle.read(8)
        if head.startswith(ZIP_MAGIC):
            raise InvalidModelFileError(path, "a zip archive (a torch.save .pt file?), not safetensors")
        if len(head) < 8:
            raise InvalidModelFileError(path, f"truncated: {size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            raise InvalidModelFileError(
                path, f"header length {length:,} over the limit of {MAX_HEADER_BYTES:,} bytes (not safetensors?)"
            )
        if 8 + length > size:
            raise InvalidModelFileError(
                path, f"truncated: the header needs {8 + length:,} bytes, the file has {size:,}"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidModelFileError(path, "garbled header (not the JSON of a safetensors file)") from None
    if not isinstance(header, dict):
        raise InvalidModelFileError(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InvalidModelFileError(path, "header __metadata__ must map names to strings")
    _check_entries(path, header, size - 8 - length)
    return header


def _check_entries(path: Path, header: dict[str, Any], data_size: int) -> None:
    """Each entry well-formed; offsets inside the data, matching the shape, not overlapping, covering it."""
    spans = []
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidModelFileError(path, f"{where}: header entry must hold dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise InvalidModelFileError(path, f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK or not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidModelFileError(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise InvalidModelFileError(path, f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise InvalidModelFileError(
                path, f"{where}: data_offsets [{begin}, {end}] outside the {data_size:,} data bytes (truncated?)"
            )
        needed = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != needed:
            raise InvalidModelFileError(
                path, f"{where}: shape {shape} of {dtype} needs {needed:,} bytes, data_offsets hold {end - begin:,}"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else f"leaves a gap at byte {position:,}"
            raise InvalidModelFileError(path, f"tensor {name!r}: data {problem}")
        position = end
    if position != data_size:
        raise InvalidModelFileError(path, f"{data_size - position:,} bytes after the last tensor (damaged file?)")


def check_dtypes(path: str | os.PathLike, dtypes: dict[str, str], integer_names: Any = None) -> None:
    """Refuse any non-floating tensor (by safetensors dtype name), naming it; `integer_names(name) -> bool`
    names the tensors that are integer buffers instead (they must then have an integer dtype)."""
    for name in sorted(dtypes):
        dtype = dtypes[name]
        if integer_names is not None and integer_names(name):
            if dtype not in INTEGER_DTYPES:
                raise InvalidModelFileError(path, f"tensor {name!r} has dtype {dtype}; an index needs {INTEGER_DTYPES}")
        elif dtype not in FLOAT_DTYPES:
            raise InvalidModelFileError(
                path, f"tensor {name!r} has dtype {dtype}; weights must be floating point ({', '.join(FLOAT_DTYPES)})"
            )


def check_safetensors_header(
    path: str | os.PathLike, expected_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, dict[str, Any]]:
    """Check a weights file's header (format, file size, floating dtypes) and, when given, that it holds
    exactly `expected_shapes` (see `diffit.io.expected_state_shapes`); returns the header entries."""
    header = read_safetensors_header(path)
    check_dtypes(path, {name: info["dtype"] for name, info in header.items()})
    if expected_shapes is not None:
        check_shapes(path, {name: tuple(info["shape"]) for name, info in header.items()}, expected_shapes)
    return header


def check_shapes(
    path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """The file's tensors are exactly the expected names with the expected shapes."""
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise InvalidModelFileError(path, f"lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise InvalidModelFileError(
            path, f"holds {len(unexpected)} tensors the config has no place for, e.g. {unexpected[:3]}"
        )
    for name in sorted(expected):
        if tuple(shapes[name]) != tuple(expected[name]):
            raise InvalidModelFileError(
                path, f"tensor {name!r} has shape {list(shapes[name])}, the config implies {list(expected[name])}"
            )
