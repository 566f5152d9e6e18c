"""Reading `.npz` members from untrusted files in bounded memory: the declared shape and dtype of every member are
read from its `.npy` header, and checked, before a byte of its data is decompressed.

An `.npz` is a zip of `.npy` files. `np.load(path)[name]` inflates a member whole, whatever it declares, so a
few-MB zip bomb can ask for gigabytes before any shape is checked. Here:

- the header must describe a plain array (no object dtype, so no pickle), and the member's uncompressed size in
  the zip directory must be exactly the header plus `prod(shape) * itemsize` bytes (zipfile never inflates more
  than that size, so the declared shape bounds the memory a read can take);
- a member stored uncompressed (`np.savez`, the ADM reference batches; C or Fortran order) is memory-mapped: no
  copy at all;
- a compressed member is inflated only when it declares at most `max_in_memory_bytes()` bytes
  (`DIFFIT_MAX_NPZ_BYTES`, default 2 GiB), else refused with the way out (store it with `np.savez`); and only when
  its declared size is at most `MAX_COMPRESSION_RATIO` (100) times the bytes the zip stores for it, for members
  declaring more than `RATIO_CHECKED_BYTES` (64 MiB). Deflate reaches ~1030:1 on constant data; image arrays
  compress a few times at most (ADM's batches are stored uncompressed), so a higher ratio is a zip bomb: a 4 MB file
  declaring 1.5 GB is refused from the zip directory, before a byte is inflated. `check_inflatable` is this check;
  `open_reference` applies it to `arr_0` and then checks the data chunk by chunk without keeping it
  (`verify_member`: damage is found before any sampling);
- a compressed member declaring more than `SPILL_BYTES` (64 MiB) is inflated in `CHUNK_BYTES` (16 MiB) pieces into
  an unlinked temporary file and memory-mapped from there, so reading it costs disk, not memory; smaller members
  are read into memory.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.evaluate.datasets import ReferenceInputError

MAX_NPZ_BYTES_ENV = "DIFFIT_MAX_NPZ_BYTES"
DEFAULT_MAX_IN_MEMORY_BYTES = 2 * 1024**3
# numpy's own limit on `.npy` header sizes (`max_header_size`), far above any real header.
MAX_HEADER_BYTES = 10_000
# Zip bombs: a compressed member declaring more than RATIO_CHECKED_BYTES may declare at most this many times the
# bytes stored for it (see the module docstring).
MAX_COMPRESSION_RATIO = 100
RATIO_CHECKED_BYTES = 64 * 2**20
# Compressed members declaring more are inflated chunk by chunk into a temporary file and memory-mapped.
SPILL_BYTES = 64 * 2**20
CHUNK_BYTES = 16 * 2**20
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def max_in_memory_bytes() -> int:
    """The largest member (in bytes, as declared) read into memory: `DIFFIT_MAX_NPZ_BYTES` or 2 GiB."""
    value = os.environ.get(MAX_NPZ_BYTES_ENV)
    if value is None:
        return DEFAULT_MAX_IN_MEMORY_BYTES
    try:
        return int(value)
    except ValueError as error:
        raise ReferenceInputError(f"{MAX_NPZ_BYTES_ENV}={value!r}: expected a number of bytes") from error


@dataclass(frozen=True)
class NpyMember:
    """One member of an `.npz` as its headers declare it."""

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    compressed: bool
    header_offset: int  # of the zip local header
    header_length: int  # of the .npy header (magic included)
    stored_bytes: int = 0  # what the zip stores for the member (compressed size)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def mappable(self) -> bool:
        return not self.compressed


def npz_member_names(path: Path) -> list[str]:
    """The array names of an `.npz` (its `.npy` members), from the zip directory only."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as error:
        raise ReferenceInputError(f"{path}: not an .npz archive ({error})") from error


def read_member_header(path: Path, name: str) -> NpyMember:
    """The declared shape, dtype and layout of member `name`, checked against the zip's size of it."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{name}.npy")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }.get(version)
                if read_header is None:
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, fortran_order, dtype = read_header(member, max_header_size=MAX_HEADER_BYTES)
                header_length = member.tell()
    except READ_ERRORS as error:
        raise ReferenceInputError(
            f"{path}: cannot read the header of {name} ({type(error).__name__}: {error})"
        ) from error
    described = NpyMember(
        path, name, tuple(int(n) for n in shape), dtype, bool(fortran_order),
        info.compress_type != zipfile.ZIP_STORED, info.header_offset, header_length, info.compress_size,
    )  # fmt: skip
    if dtype.hasobject:
        raise ReferenceInputError(f"{path}: {name} holds Python objects (dtype {dtype}); only plain arrays are read")
    if any(n < 0 for n in described.shape):
        raise ReferenceInputError(f"{path}: {name} declares a negative shape {described.shape}")
    if info.file_size != header_length + described.nbytes:
        raise ReferenceInputError(
            f"{path}: {name} declares shape {described.shape} {dtype} ({described.nbytes} bytes) but the archive "
            f"holds {info.file_size - header_length} bytes of data for it: a damaged or forged file"
        )
    return described


def _memory_map(member: NpyMember) -> np.ndarray:
    with open(member.path, "rb") as handle:
        handle.seek(member.header_offset)
        local_header = handle.read(30)
        size = os.fstat(handle.fileno()).st_size
    name_length = int.from_bytes(local_header[26:28], "little")
    extra_length = int.from_bytes(local_header[28:30], "little")
    offset = member.header_offset + 30 + name_length + extra_length + member.header_length
    if offset + member.nbytes > size:
        raise ReferenceInputError(f"{member.path}: {member.name} runs past the end of the file (truncated)")
    order = "F" if member.fortran_order else "C"
    if member.nbytes == 0:
        return np.empty(member.shape, member.dtype, order=order)
    return np.memmap(member.path, dtype=member.dtype, mode="r", offset=offset, shape=member.shape, order=order)


def check_inflatable(member: NpyMember) -> None:
    """Refuse, from its headers alone, a compressed member that declares more than `max_in_memory_bytes()` or
    more than `MAX_COMPRESSION_RATIO` times its stored bytes (module docstring). Uncompressed members pass."""
    if not member.compressed:
        return
    limit = max_in_memory_bytes()
    if member.nbytes > limit:
        raise ReferenceInputError(
            f"{member.path}: {member.name} is compressed and would take {member.nbytes / 2**30:.2f} GiB in memory "
            f"(shape {member.shape} {member.dtype}), more than the {limit / 2**30:.2f} GiB allowed; store it "
            f"uncompressed (np.savez, read by memory map) or raise {MAX_NPZ_BYTES_ENV}"
        )
    declared = member.header_length + member.nbytes
    if member.nbytes > RATIO_CHECKED_BYTES and declared > MAX_COMPRESSION_RATIO * max(member.stored_bytes, 1):
        raise ReferenceInputError(
            f"{member.path}: {member.name} declares {member.nbytes / 2**30:.2f} GiB (shape {member.shape} "
            f"{member.dtype}) from {member.stored_bytes:,} compressed bytes, a ratio of "
            f"{declared / max(member.stored_bytes, 1):,.0f}:1, above the {MAX_COMPRESSION_RATIO}:1 that real data "
            "reaches (a zip bomb?); it is not inflated. Store real arrays uncompressed (np.savez)"
        )


def _stream_data(member: NpyMember, write) -> None:
    """Inflate a member's data in `CHUNK_BYTES` pieces, each passed to `write` (the zip's CRC checked at the end)."""
    with zipfile.ZipFile(member.path) as archive, archive.open(f"{member.name}.npy") as handle:
        if len(handle.read(member.header_length)) != member.header_length:
            raise EOFError("the member ends inside its header")
        remaining = member.nbytes
        while remaining:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise EOFError(f"the member ends {remaining:,} bytes early")
            write(chunk)
            remaining -= len(chunk)
        if handle.read(1):  # reading to the end is also what makes zipfile check the CRC
            raise ValueError("data after the array")


def verify_member(member: NpyMember) -> None:
    """Check a compressed member whole (`check_inflatable`, then its data inflated chunk by chunk and dropped, the
    CRC checked) without keeping it: a damaged reference is refused when it is opened, before any sampling, in
    bounded memory. Uncompressed members need nothing beyond their header (they are mapped)."""
    if not member.compressed:
        return
    check_inflatable(member)
    try:
        _stream_data(member, lambda chunk: None)
    except READ_ERRORS as error:
        raise ReferenceInputError(
            f"{member.path}: cannot read {member.name} ({type(error).__name__}: {error})"
        ) from error


def _inflate_to_file(member: NpyMember) -> np.ndarray:
    """A compressed member inflated in `CHUNK_BYTES` pieces into an unlinked temporary file, memory-mapped (the
    zip's CRC checked at the end): its data never sits in memory whole."""
    order = "F" if member.fortran_order else "C"
    with tempfile.TemporaryFile(prefix="diffit-npz-") as spill:
        _stream_data(member, spill.write)
        spill.flush()
        # The mapping keeps the (unlinked) file alive after it is closed here; its space is freed with the array.
        return np.memmap(spill, dtype=member.dtype, mode="r", shape=member.shape, order=order)


def load_member(path: Path, name: str, member: NpyMember | None = None, memory_map: bool = True) -> np.ndarray:
    """Array `name` of an `.npz`: memory-mapped when stored uncompressed (and `memory_map`); else, after
    `check_inflatable`, inflated with the zip's CRC checked: into memory, or (`memory_map` and more than
    `SPILL_BYTES`) chunk by chunk into a memory-mapped temporary file. Every problem is one `ReferenceInputError`
    naming the file and the member."""
    member = member or read_member_header(path, name)
    if memory_map and member.mappable:
        try:
            return _memory_map(member)
        except READ_ERRORS as error:
            raise ReferenceInputError(f"{path}: cannot map {name} ({type(error).__name__}: {error})") from error
    check_inflatable(member)
    if memory_map and member.nbytes > SPILL_BYTES:
        try:
            return _inflate_to_file(member)
        except READ_ERRORS as error:
            raise ReferenceInputError(f"{path}: cannot read {name} ({type(error).__name__}: {error})") from error
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as handle:
            array = np.lib.format.read_array(handle, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
            if handle.read(1):  # reading to the end is also what makes zipfile check the CRC
                raise ValueError("data after the array")
            return array
    except READ_ERRORS as error:
        raise ReferenceInputError(f"{path}: cannot read {name} ({type(error).__name__}: {error})") from error
