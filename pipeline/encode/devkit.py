"""The labels of ImageNet's validation archive: the devkit (a directory or `ILSVRC2012_devkit_t12.tar.gz`: its
`ILSVRC2012_validation_ground_truth.txt` and `meta.mat`) or `LOC_val_solution.csv` (+ `LOC_synset_mapping.txt`
beside it).

These files are untrusted and small (the devkit's meta.mat is about 1 MB inflated, the csv a few MB): every file
is read only up to a cap (`MAX_DEVKIT_FILE_BYTES`, `MAX_CSV_BYTES`), a devkit tar.gz is walked only over a bounded
number of members and inflated bytes, and a `.mat` file is checked before scipy reads it (`bounded_mat`): its
compressed variables are inflated here in bounded steps (refused past `MAX_DEVKIT_FILE_BYTES`), and every array
in it must hold the elements its dimensions declare (a 1 KB file declaring a 10^9-cell array would make scipy
allocate it first). Text that is not what it should be (a ground-truth line "abc", a non-ASCII byte, a csv that is
not UTF-8) is one SourceError naming the file.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import tarfile
import zlib
from pathlib import PurePosixPath

from pipeline.core.errors import one_line
from pipeline.encode.source_items import MAX_CLASSES, SourceError

MAX_DEVKIT_FILE_BYTES = 16 << 20  # meta.mat (inflated) and the ground truth; the real ones are about 1 MB
MAX_CSV_BYTES = 256 << 20  # LOC_val_solution.csv is about 10 MB
_MAX_TAR_MEMBERS = 10_000  # the devkit tar.gz holds a few dozen files
_MAX_TAR_BYTES = 1 << 30  # inflated bytes walked through in the devkit tar.gz (it holds about 20 MB)
_MAX_MAT_DEPTH = 16
_MAX_MAT_DIMS = 32
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = range(6, 16)  # double, single, int8 ... uint64
# The data types scipy has a reader for (int8 ... uint64, single, double, utf8/16/32); scipy indexes a fixed table
# with the type of each element without checking it, so any other type is refused here (a fuzzed file crashed it).
_MI_DATA = frozenset((1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 18))
_COMPLEX = 0x0800
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"


def read_capped(path: str, cap: int) -> bytes:
    """The bytes of a local file, SourceError naming it when it holds more than `cap` (checked before reading)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > cap:
                raise SourceError(f"{path}: {size} bytes, more than the {cap} bytes such a file may have")
            data = handle.read(cap + 1)
    except OSError as error:
        raise SourceError(f"{path}: cannot be read ({error.strerror or error})") from error
    if len(data) > cap:
        raise SourceError(f"{path}: more than the {cap} bytes such a file may have")
    return data


def _inflate(compressed: bytes, cap: int, where: str) -> bytes:
    """A zlib stream inflated in bounded steps; SourceError when it inflates past `cap` or is damaged."""
    inflater, out, pending = zlib.decompressobj(), bytearray(), compressed
    try:
        while pending and not inflater.eof:
            out += inflater.decompress(pending, cap + 1 - len(out))
            if len(out) > cap:
                raise SourceError(f"{where}: a compressed variable inflates to more than {cap} bytes: refused")
            pending = inflater.unconsumed_tail
    except zlib.error as error:
        raise SourceError(f"{where}: a damaged compressed variable ({one_line(error)})") from error
    if not inflater.eof:
        raise SourceError(f"{where}: a compressed variable is cut off")
    return bytes(out)


class _MatWalk:
    """Checks the data elements of an uncompressed MAT 5 stream against the bytes they occupy."""

    def __init__(self, data: bytes, endian: str, where: str):
        self.data, self.endian, self.where = data, endian, where

    def fail(self, problem: str) -> SourceError:
        return SourceError(f"{self.where}: not a valid meta.mat ({problem})")

    def tag(self, position: int, end: int) -> tuple[int, int, int, int]:
        """(type, byte count, data start, next element) of the element at `position`, which must end by `end`."""
        if position + 8 > end:
            raise self.fail(f"an element at byte {position} runs past its container")
        first, second = struct.unpack_from(self.endian + "II", self.data, position)
        if first >> 16:  # the small element format: type and count in 4 bytes, data in the next 4
            kind, count, start, following = first & 0xFFFF, first >> 16, position + 4, position + 8
            if count > 4:
                raise self.fail(f"a small element at byte {position} declares {count} bytes")
        else:
            kind, count, start = first, second, position + 8
            following = start + count + (-count % 8)
        if start + count > end:
            raise self.fail(f"an element at byte {position} declares {count} bytes, more than its container holds")
        if kind not in _MI_DATA and kind != _MI_MATRIX:
            raise self.fail(f"an element at byte {position} has the unknown type {kind}")
        return kind, count, start, min(following, end)

    def payload(self, position: int, end: int, elements: int, dims) -> int:
        """Check a numeric or text data element of at least `elements` bytes; the position after it."""
        kind, size, _, following = self.tag(position, end)
        if kind not in _MI_DATA:
            raise self.fail(f"an element at byte {position} of type {kind} where numbers or text were expected")
        if elements > size:
            raise self.fail(f"an array of dimensions {dims} holds {size} bytes")
        return following

    def matrix(self, position: int, end: int, depth: int = 0) -> int:
        """Check the miMATRIX element at `position`; the position of the next element. Its parts must fill it
        exactly: scipy reads them one after the other, so what it reads is what is checked here."""
        kind, count, start, following = self.tag(position, end)
        if kind != _MI_MATRIX:
            raise self.fail(f"element type {kind} at byte {position} where an array was expected")
        if depth > _MAX_MAT_DEPTH:
            raise self.fail(f"arrays nested more than {_MAX_MAT_DEPTH} deep")
        stop = start + count
        if count == 0:
            return following
        kind, size, flags_at, cursor = self.tag(start, stop)
        if kind != _MI_UINT32 or size != 8:
            raise self.fail(f"no array flags at byte {start}")
        flags = struct.unpack_from(self.endian + "I", self.data, flags_at)[0]
        array_class = flags & 0xFF
        kind, size, dims_at, cursor = self.tag(cursor, stop)
        if kind != _MI_INT32 or size % 4 or not 0 < size // 4 <= _MAX_MAT_DIMS:
            raise self.fail(f"no dimensions at byte {cursor}")
        dims = struct.unpack_from(f"{self.endian}{size // 4}i", self.data, dims_at)
        if min(dims) < 0:
            raise self.fail(f"negative dimensions {dims}")
        elements = 1
        for dim in dims:
            elements *= dim
        kind, _, _, cursor = self.tag(cursor, stop)
        if kind != _MI_INT8:
            raise self.fail(f"no array name at byte {cursor}")
        if array_class == _MX_CELL:
            for _ in range(elements):  # each cell is an element of its own: the count is bounded by the bytes
                cursor = self.matrix(cursor, stop, depth + 1)
        elif array_class == _MX_STRUCT:
            kind, size, length_at, cursor = self.tag(cursor, stop)
            length = struct.unpack_from(self.endian + "i", self.data, length_at)[0] if kind == _MI_INT32 else 0
            kind, size, _, cursor = self.tag(cursor, stop)
            if size == 0 and length > 0:
                pass  # a struct without fields
            elif length <= 0 or kind != _MI_INT8 or size % length:
                raise self.fail(f"malformed struct field names at byte {cursor}")
            for _ in range(elements * (size // length if length > 0 else 0)):
                cursor = self.matrix(cursor, stop, depth + 1)
        elif array_class == _MX_CHAR or array_class in _MX_NUMERIC:
            cursor = self.payload(cursor, stop, elements, dims)  # the real part: one or more bytes per element
            if flags & _COMPLEX:
                cursor = self.payload(cursor, stop, elements, dims)  # the imaginary part
        else:
            raise self.fail(f"array class {array_class} (only cells, structs, text and numbers are read)")
        if cursor != stop:
            raise self.fail(f"the array at byte {position} declares {count} bytes and its parts fill {cursor - start}")
        return following


def bounded_mat(data: bytes, where: str, cap: int = MAX_DEVKIT_FILE_BYTES) -> bytes:
    """The MAT 5 file `data` with its compressed variables inflated (at most `cap` bytes in all) and every array
    checked against the bytes it occupies (`_MatWalk`): what scipy may then read without allocating more than
    the bytes hold. SourceError naming `where` for anything else."""
    if len(data) < 136 or data[126:128] not in (b"IM", b"MI"):
        raise SourceError(f"{where}: not a MAT 5 file (the devkit's meta.mat)")
    endian = "<" if data[126:128] == b"IM" else ">"
    # The subsystem offset (MATLAB objects) is cleared: only cells, structs, text and numbers are read.
    out, position, inflated = bytearray(data[:116] + bytes(8) + data[124:128]), 128, 0
    while position + 8 <= len(data):
        kind, count = struct.unpack_from(endian + "II", data, position)
        start = position + 8
        if start + count > len(data):
            raise SourceError(f"{where}: a variable at byte {position} declares {count} bytes, past the file's end")
        if kind == _MI_COMPRESSED:
            element = _inflate(data[start : start + count], cap - inflated, where)
            position = start + count
        elif kind == _MI_MATRIX:
            element = data[position : start + count + (-count % 8)]
            position = start + count + (-count % 8)
        else:
            raise SourceError(f"{where}: element type {kind} at byte {position} is not a variable")
        inflated += len(element)
        walk = _MatWalk(element, endian, where)
        walk.matrix(0, len(element))
        out += element
    return bytes(out)


def synsets_from_meta(data: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID → WNID of the leaf synsets of the devkit's meta.mat (checked by `bounded_mat` first)."""
    import numpy as np
    from scipy.io import loadmat

    checked = bounded_mat(data, where)
    try:
        synsets = np.atleast_1d(loadmat(io.BytesIO(checked), squeeze_me=True)["synsets"])
        ids = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets if int(row["num_children"]) == 0}
    except Exception as error:  # noqa: BLE001 - bounded data that scipy cannot read as the devkit's is not one
        raise SourceError(f"{where}: not the devkit's meta.mat ({type(error).__name__}: {one_line(error)})") from error
    if not 0 < len(ids) <= MAX_CLASSES:
        raise SourceError(f"{where}: names {len(ids)} leaf synsets (expected 1 to {MAX_CLASSES})")
    return ids


def devkit_files(devkit: str) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
    """((where, bytes) of ILSVRC2012_validation_ground_truth.txt, (where, bytes) of meta.mat) of a devkit
    directory or .tar.gz, each at most `MAX_DEVKIT_FILE_BYTES`."""
    wanted = (GROUND_TRUTH, META)
    found: dict[str, tuple[str, bytes]] = {}
    if os.path.isdir(devkit):
        for directory, _, files in os.walk(devkit):
            for name in sorted(files):
                if name in wanted and name not in found:
                    path = os.path.join(directory, name)
                    found[name] = (path, read_capped(path, MAX_DEVKIT_FILE_BYTES))
    else:
        try:
            with tarfile.open(devkit, mode="r:*") as tar:
                for number, member in enumerate(tar):
                    if number >= _MAX_TAR_MEMBERS or tar.offset > _MAX_TAR_BYTES:
                        raise SourceError(f"{devkit}: more than {_MAX_TAR_MEMBERS} members or {_MAX_TAR_BYTES} bytes")
                    name = PurePosixPath(member.name).name
                    if not member.isfile() or name not in wanted or name in found:
                        continue
                    where = f"{devkit}#{member.name}"
                    if member.size > MAX_DEVKIT_FILE_BYTES:
                        raise SourceError(f"{where}: {member.size} bytes, more than {MAX_DEVKIT_FILE_BYTES}")
                    found[name] = (where, tar.extractfile(member).read(MAX_DEVKIT_FILE_BYTES))
                    if len(found) == len(wanted):
                        break
        except (tarfile.TarError, zlib.error, EOFError, OSError) as error:
            raise SourceError(f"{devkit}: not a readable devkit tar.gz ({one_line(error)})") from error
    missing = [name for name in wanted if name not in found]
    if missing:
        raise SourceError(f"devkit {devkit} lacks {', '.join(missing)}")
    return found[GROUND_TRUTH], found[META]


def _ground_truth(where: str, truth: bytes, wnid: dict[int, str]) -> dict[str, str]:
    """Image id → synset from the ground truth's lines (one ILSVRC2012_ID per line)."""
    synset_of = {}
    for number, line in enumerate(truth.split(b"\n"), start=1):
        text = line.strip()
        if not text:
            continue
        if not (text.isdigit() and len(text) <= 9):  # bytes.isdigit: ASCII digits only
            shown = text[:40].decode("ascii", "backslashreplace")
            raise SourceError(f"{where}: line {number} is {shown!r}, not an ILSVRC2012_ID")
        if int(text) not in wnid:
            raise SourceError(f"{where}: line {number} names ILSVRC2012_ID {int(text)}, not a leaf synset of meta.mat")
        synset_of[f"ILSVRC2012_val_{len(synset_of) + 1:08d}"] = wnid[int(text)]  # the n-th id is image n
    return synset_of


def _loc_csv(labels: str) -> tuple[dict[str, str], list[str]]:
    """Image id → synset of LOC_val_solution.csv, and the synsets of LOC_synset_mapping.txt beside it (or those
    the csv names)."""
    text = _utf8(labels, read_capped(labels, MAX_CSV_BYTES))
    synset_of = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            try:
                synset_of[row["ImageId"]] = row["PredictionString"].split()[0]
            except (KeyError, IndexError, AttributeError) as error:
                raise SourceError(f"{labels}: line {reader.line_num} is not a LOC_val_solution.csv row") from error
    except csv.Error as error:
        raise SourceError(f"{labels}: line {reader.line_num}: not a csv file ({one_line(error)})") from error
    mapping = os.path.join(os.path.dirname(labels), "LOC_synset_mapping.txt")
    if os.path.isfile(mapping):
        lines = _utf8(mapping, read_capped(mapping, MAX_DEVKIT_FILE_BYTES)).splitlines()
        synsets = [line.split()[0] for line in lines if line.strip()]
    else:
        synsets = sorted(set(synset_of.values()))
    return synset_of, synsets


def _utf8(where: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SourceError(f"{where}: line {line} is not UTF-8 text (byte {error.start})") from error


def val_labels(labels: str) -> tuple[dict[str, str], dict[str, int]]:
    """(image id `ILSVRC2012_val_00000001` → synset, label map of the synsets in sorted order) from the devkit
    (directory or .tar.gz: ground truth + meta.mat) or LOC_val_solution.csv (+ LOC_synset_mapping.txt beside it,
    which lists all 1000 synsets, when present)."""
    if not os.path.exists(labels):
        raise SourceError(f"validation labels {labels} do not exist")
    if labels.endswith(".csv"):
        synset_of, synsets = _loc_csv(labels)
    else:
        (truth_where, truth), (meta_where, meta) = devkit_files(labels)
        wnid = synsets_from_meta(meta, meta_where)
        synset_of, synsets = _ground_truth(truth_where, truth, wnid), list(wnid.values())
    classes = sorted(set(synsets))
    if len(classes) > MAX_CLASSES:
        raise SourceError(f"{labels}: names {len(classes)} synsets, more than MAX_CLASSES = {MAX_CLASSES}")
    return synset_of, {synset: i for i, synset in enumerate(classes)}


def find_val_labels(location: str) -> str:
    """The devkit or LOC_val_solution.csv beside a local validation archive."""
    directory = os.path.dirname(location)
    for name in ("LOC_val_solution.csv", "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12"):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise SourceError(
        f"no labels for the validation archive {location}: pass --labels with the devkit "
        "(ILSVRC2012_devkit_t12.tar.gz or its directory) or LOC_val_solution.csv, or put one of them beside it"
    )
