"""Opening tar archives as sources: ImageNet's train archive, its validation archive + devkit labels, WebDataset
tars (a file, a directory of them, or an object-store URL / prefix). See `pipeline.encode.archives` for how the
members are found and read; this module turns them into the `SourceScan` every source gives.

The index is built in one pass the first time and cached in OUT (`pipeline.encode.member_index`); a run that
finds a cached index of the same archive files plans from it without opening the archives. Under `--limit` the
pass stops after the first N items (the train archive parses only the inner tars it needs) and nothing is
cached.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

from pipeline.core.storage import is_url, local_path, url_to_fs
from pipeline.encode.archives import (
    IMAGE_EXTENSIONS,
    TRAIN_MEMBER,
    VAL_MEMBER,
    ArchiveIdentity,
    Group,
    Member,
    _clean_name,
    _is_hidden,
    identify,
    index_inner_tar,
    open_archive,
    scan_tar,
)
from pipeline.encode.member_index import IndexCache, MemberIndex, load_cached_index, save_index
from pipeline.encode.source_items import SourceError, SourceItem, SourceScan, keys_per_directory

logger = logging.getLogger(__name__)

_MAX_LABEL_BYTES = 1 << 20  # a cls / json member is a few bytes; never read more than this
_WDS_NAME = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")  # webdataset: key = up to the first dot of the name


def problem_meta(problem: str | None) -> dict[str, Any] | None:
    """How an item carries the problem the index found (see `sources.read_item_bytes`)."""
    return None if problem is None else {"index_problem": problem}


def group_items(groups: Iterator[Group], mtimes: dict[str, int], limit: int | None) -> Iterator[SourceItem]:
    """The items of `groups` in order, numbered from 0, up to `limit`. Keys are made unique per directory of the
    relative path (`prefix/name`), as the folder walk does, so an archive and its extraction give equal keys."""
    count = 0
    for group in groups:
        paths = group.paths()
        keys = group.keys if group.keys is not None else keys_per_directory(paths)
        for member, path, key in zip(group.members, paths, keys):
            yield SourceItem(
                index=count,
                path=path,
                key=key,
                label=member.label,
                size=member.size,
                mtime_ns=mtimes.get(group.location, 0),
                shard_file=group.location,
                member_offset=member.offset,
                member_size=member.size,
                packed_meta=problem_meta(member.problem),
            )
            count += 1
            if count == limit:
                return
    if count == 0:
        raise SourceError("the archive source holds no image member")


def _scan(
    root: str,
    layout: str,
    label_map: dict[str, int],
    groups: Iterator[Group],
    identities: list[ArchiveIdentity],
    ignored: list[str],
    limit: int | None,
) -> SourceScan:
    mtimes = {identity.location: identity.mtime_ns for identity in identities}
    return SourceScan(root, layout, label_map, group_items(groups, mtimes, limit), ignored, limit=limit)


def _indexed(
    root: str,
    layout: str,
    identities: list[ArchiveIdentity],
    cache: IndexCache | None,
    limit: int | None,
    build: Callable[[list[str], dict[str, int]], Iterator[Group]],
    label_map: dict[str, int] | None = None,
) -> SourceScan:
    """A scan from the cached index, or from `build(ignored, label_map)` (groups produced as they are indexed),
    saving the index into `cache` once the walk has gone through every group."""
    cached = load_cached_index(cache, layout, identities)
    if cached is not None:
        logger.info("planning from the cached member index in %s", cache.location)
        return _scan(root, layout, cached.label_map, iter(cached.groups), identities, cached.ignored, limit)
    ignored: list[str] = []
    labels = {} if label_map is None else label_map

    def walk() -> Iterator[Group]:
        done: list[Group] = []
        for group in build(ignored, labels):
            done.append(group)
            yield group
        if limit is None:
            save_index(cache, MemberIndex(layout, identities, labels, done, ignored))

    return _scan(root, layout, labels, walk(), identities, ignored, limit)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet train archive


def _outer_members(handle, identity: ArchiveIdentity) -> list[tarfile.TarInfo]:
    members, problem = scan_tar(handle, identity.size)
    if problem is not None and not (members and "after the last readable member" in problem):
        raise SourceError(f"{identity.location} is {problem}")
    if problem is not None:
        raise SourceError(f"{identity.location}: {problem}; is the download complete?")
    return members


def open_train_archive(location: str, limit: int | None, cache: IndexCache | None) -> SourceScan:
    """ILSVRC2012_img_train.tar: a tar of `nXXXXXXXX.tar` per-class tars. Label = position of the synset in the
    sorted synset list; classes are indexed in that order, one inner tar at a time."""
    identity = identify(location)
    with open_archive(location) as handle:
        outer = _outer_members(handle, identity)
    inner: dict[str, tarfile.TarInfo] = {}
    ignored_outer = []
    for member in outer:
        name = _clean_name(member.name)
        if TRAIN_MEMBER.fullmatch(name):
            inner[name[: -len(".tar")]] = member  # a repeated name keeps its last copy, as extraction would
        else:
            ignored_outer.append(member.name)
    if not inner:
        raise SourceError(f"{location} holds no nXXXXXXXX.tar member: it is not the ImageNet train archive")
    if ignored_outer:
        logger.warning(
            "%d member(s) of %s are not per-class tars and are ignored (first: %s)",
            len(ignored_outer),
            location,
            ignored_outer[0],
        )
    label_map = {synset: label for label, synset in enumerate(sorted(inner))}

    def build(ignored: list[str], labels: dict[str, int]) -> Iterator[Group]:
        ignored.extend(ignored_outer)
        with open_archive(location) as archive:
            for synset, label in label_map.items():
                members = index_inner_tar(archive, identity.size, inner[synset], label, ignored)
                yield Group(synset, identity.location, members)

    return _indexed(identity.location, "imagenet-train", [identity], cache, limit, build, dict(label_map))


# ----------------------------------------------------------------------------------------------------------------
# ImageNet validation archive + devkit labels


def _synsets_from_meta(data: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID → WNID of the 1000 leaf synsets of the devkit's meta.mat."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        ids = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets if int(row["num_children"]) == 0}
    except (KeyError, ValueError, TypeError) as error:
        raise SourceError(f"{where}: not the devkit's meta.mat ({error})") from error
    return ids


def _devkit_files(devkit: str) -> tuple[bytes, bytes]:
    """(ILSVRC2012_validation_ground_truth.txt, meta.mat) of a devkit directory or .tar.gz."""
    wanted = ("ILSVRC2012_validation_ground_truth.txt", "meta.mat")
    found: dict[str, bytes] = {}
    if os.path.isdir(devkit):
        for directory, _, files in os.walk(devkit):
            for name in files:
                if name in wanted:
                    found[name] = open(os.path.join(directory, name), "rb").read()
    else:
        with tarfile.open(devkit, mode="r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in wanted and member.size <= 64 << 20:
                    found[name] = tar.extractfile(member).read()
    missing = [name for name in wanted if name not in found]
    if missing:
        raise SourceError(f"devkit {devkit} lacks {', '.join(missing)}")
    return found[wanted[0]], found[wanted[1]]


def val_labels(labels: str) -> tuple[dict[str, str], dict[str, int]]:
    """(image id `ILSVRC2012_val_00000001` → synset, label map of the synsets in sorted order) from the devkit
    (directory or .tar.gz: ground truth + meta.mat) or LOC_val_solution.csv (+ LOC_synset_mapping.txt beside it,
    which lists all 1000 synsets, when present)."""
    if not os.path.exists(labels):
        raise SourceError(f"validation labels {labels} do not exist")
    if labels.endswith(".csv"):
        synset_of = {}
        with open(labels, newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    synset_of[row["ImageId"]] = row["PredictionString"].split()[0]
                except (KeyError, IndexError, AttributeError) as error:
                    raise SourceError(f"{labels}: not a LOC_val_solution.csv row: {row}") from error
        mapping = os.path.join(os.path.dirname(labels), "LOC_synset_mapping.txt")
        if os.path.isfile(mapping):
            synsets = [line.split()[0] for line in open(mapping).read().splitlines() if line.strip()]
        else:
            synsets = sorted(set(synset_of.values()))
        return synset_of, {synset: i for i, synset in enumerate(sorted(synsets))}
    truth, meta = _devkit_files(labels)
    wnid = _synsets_from_meta(meta, labels)
    synset_of = {}
    for number, line in enumerate(truth.decode("ascii").split(), start=1):
        if int(line) not in wnid:
            raise SourceError(f"{labels}: ground truth line {number} names ILSVRC2012_ID {line}, not in meta.mat")
        synset_of[f"ILSVRC2012_val_{number:08d}"] = wnid[int(line)]
    return synset_of, {synset: i for i, synset in enumerate(sorted(wnid.values()))}


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


def open_val_archive(location: str, limit: int | None, cache: IndexCache | None, labels: str | None) -> SourceScan:
    """ILSVRC2012_img_val.tar: 50,000 JPEGs in one flat tar; labels from the devkit, in the sorted synset order."""
    identity = identify(location)
    labels = labels or find_val_labels(location)
    synset_of, label_map = val_labels(labels)

    def build(ignored: list[str], _: dict[str, int]) -> Iterator[Group]:
        with open_archive(location) as handle:
            found, problem = scan_tar(handle, identity.size)
        if problem is not None:
            raise SourceError(f"{location} is damaged: {problem}")
        by_name: dict[str, Member] = {}
        for member in found:
            name = _clean_name(member.name)
            if not name or _is_hidden(name):
                ignored.append(member.name)
                continue
            synset = synset_of.get(PurePosixPath(name).name.split(".")[0])
            problem = None if synset is not None else f"{name}: no label for this image in {labels}"
            label = label_map[synset] if synset is not None else -1
            by_name[name] = Member(name, member.offset_data, member.size, label, problem)
        yield Group("", identity.location, [by_name[name] for name in sorted(by_name)])

    return _indexed(identity.location, "imagenet-val", [identity], cache, limit, build, dict(label_map))


def looks_like(location: str) -> str | None:
    """ "imagenet-train" / "imagenet-val" / "webdataset" from the first member of a tar (None: not a tar)."""
    try:
        with open_archive(location) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            first = next((m for m in tar if m.isfile()), None)
    except (tarfile.TarError, OSError):
        return None
    if first is None:
        return None
    name = PurePosixPath(_clean_name(first.name)).name
    if TRAIN_MEMBER.fullmatch(name):
        return "imagenet-train"
    if VAL_MEMBER.fullmatch(name):
        return "imagenet-val"
    return "webdataset"


# ----------------------------------------------------------------------------------------------------------------
# WebDataset tars


def list_tars(location: str) -> list[str]:
    """The .tar files of a WebDataset source: the file itself, or those directly in a directory / URL prefix,
    sorted by name."""
    if location.endswith(".tar"):
        return [location]
    if is_url(location):
        fs, path = url_to_fs(location)
        fs.invalidate_cache(path)
        names = [str(name).rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)]
        prefix = location.rstrip("/")
        return [f"{prefix}/{name}" for name in sorted(names) if name.endswith(".tar")]
    directory = local_path(location)
    return [str(directory / name) for name in sorted(os.listdir(directory)) if name.endswith(".tar")]


def _label_of(extension: str, data: bytes) -> int:
    """The class of a `cls` member (an integer) or a `json` member (`label` or `cls` field); ValueError."""
    if extension == "cls":
        return int(data.decode("ascii").strip())
    record = json.loads(data)
    value = record.get("label", record.get("cls")) if isinstance(record, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("its json has no integer `label` or `cls` field")
    return value


def _wds_samples(location: str, ignored: list[str]) -> list[tuple[str, Member | None, list[tuple[str, bytes]]]]:
    """(key, image member, [(label extension, bytes)]) of one WebDataset tar in member order (one pass: the
    headers, and the bytes of the small label members)."""
    samples: dict[str, list] = {}
    mode = "r|" if is_url(location) else "r:"  # a URL is read once from start to end; a file skips with seeks
    try:
        with open_archive(location) as handle, tarfile.open(fileobj=handle, mode=mode) as tar:
            for member in tar:
                name = _clean_name(member.name)
                match = _WDS_NAME.match(name)
                if not member.isfile() or _is_hidden(name) or match is None:
                    ignored.append(f"{location}#{member.name}")
                    continue
                key, extension = match.group(1), match.group(2).lower()
                sample = samples.setdefault(key, [key, None, []])
                if extension in IMAGE_EXTENSIONS and sample[1] is None:
                    sample[1] = Member(name, member.offset_data, member.size)
                elif extension in ("cls", "json") and member.size <= _MAX_LABEL_BYTES:
                    sample[2].append((extension, tar.extractfile(member).read()))
                else:
                    ignored.append(f"{location}#{member.name}")
    except tarfile.TarError as error:
        raise SourceError(f"cannot read the WebDataset tar {location}: {error}") from error
    return [tuple(sample) for sample in samples.values()]


def open_webdataset(location: str, limit: int | None, cache: IndexCache | None) -> SourceScan:
    """WebDataset tars (img2dataset output and similar): samples `KEY.jpg|png|webp` with an optional `KEY.cls`
    or `KEY.json` label, in tar order, tars in name order. Labels are the integers found; the label map names
    classes "0" ... "max" and grows while the tars are walked. A sample without an image is ignored; one whose
    label cannot be read becomes a failure with the reason."""
    tars = list_tars(location)
    if not tars:
        raise SourceError(f"no .tar file in {location}")
    identities = [identify(tar) for tar in tars]
    state = {"labelled": None}

    def build(ignored: list[str], labels: dict[str, int]) -> Iterator[Group]:
        for identity in identities:
            members = []
            for key, image, label_members in _wds_samples(identity.location, ignored):
                if image is None:
                    ignored.append(f"{identity.location}#{key}")
                    continue
                image.label, image.problem = _sample_label(key, label_members, identity.location, state)
                for value in range(len(labels), image.label + 1):
                    labels[str(value)] = value
                members.append(image)
            stem = PurePosixPath(identity.location).name[: -len(".tar")]
            yield Group(stem, identity.location, members)

    return _indexed(location.rstrip("/"), "webdataset", identities, cache, limit, build)


def _sample_label(key: str, found: list[tuple[str, bytes]], tar: str, state: dict) -> tuple[int, str | None]:
    """(label, problem) of one sample; a source mixes labelled and unlabelled samples only as failures."""
    if not found:
        if state["labelled"]:
            return -1, f"{tar}#{key}: no cls/json label while other samples have one"
        state["labelled"] = False
        return -1, None
    if state["labelled"] is False:
        raise SourceError(f"{tar}#{key} has a label but earlier samples have none: label every sample or none")
    state["labelled"] = True
    extension, data = found[0]
    try:
        label = _label_of(extension, data)
    except (ValueError, UnicodeDecodeError) as error:
        return -1, f"{tar}#{key}: unreadable {extension} label ({error})"
    if label < 0:
        return -1, f"{tar}#{key}: negative label {label}"
    return label, None
