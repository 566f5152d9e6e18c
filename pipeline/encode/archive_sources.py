"""Opening tar archives as sources: ImageNet's train archive, its validation archive + devkit labels, WebDataset
tars (a file, a directory of them, or an object-store URL / prefix). See `pipeline.encode.archives` for how the
members are found and read; this module turns them into the `SourceScan` every source gives.

The index is built in one pass the first time and cached in OUT (`pipeline.encode.member_index`); a run that
finds a cached index of the same archive files plans from it without reading their headers again, once the index
is shown to be bound to them and to hold only locations they could have produced (anything else is indexed
again, with a warning). Under `--limit` the pass stops after the first N items (the train archive parses only the
inner tars it needs) and nothing is cached.

What a file declares is bounded before anything is allocated for it: labels (`source_items.check_label`, at most
`MAX_CLASSES`), the devkit's files (`pipeline.encode.devkit`), parquet row groups (`parquet_source`). Links and
other members that are not regular files are listed among the ignored with the reason, a WebDataset key that
repeats a member is a failure, and a damaged outer tar keeps the members before the damage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

from pipeline.core.errors import one_line
from pipeline.core.storage_io import is_url, local_path, url_to_fs
from pipeline.encode.archives import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    TRAIN_MEMBER,
    VAL_MEMBER,
    ArchiveIdentity,
    Group,
    Member,
    _clean_name,
    _is_hidden,
    identify,
    index_inner_tar,
    not_read,
    open_archive,
    scan_tar,
)
from pipeline.encode.devkit import find_val_labels, val_labels
from pipeline.encode.member_index import (
    IndexCache,
    MemberIndex,
    check_index,
    headers_digest,
    load_cached_index,
    save_index,
)
from pipeline.encode.source_items import SourceError, SourceItem, SourceScan, check_label, keys_per_directory

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
    structure: bytes = b"",
    check: Callable[[MemberIndex], None] | None = None,
    row_counts: Callable | None = None,
) -> SourceScan:
    """A scan from the cached index, or from `build(ignored, label_map)` (groups produced as they are indexed),
    saving the index into `cache` once the walk has gone through every group.

    A cached index is used only when it is bound to the source (`headers_digest` of the archive files and
    `structure`, what the source read of them already) and passes `check_index`, the label map the source
    computed (`label_map`) and the source's own `check` (`row_counts`: the rows per row group of a parquet file,
    for `check_index`); anything else is indexed again."""
    bound: list[str] = []

    def binding() -> str:
        """Read only when a cached index is compared or a new one saved (two small reads per archive file)."""
        if not bound:
            bound.append(headers_digest(identities, structure))
        return bound[0]

    def verify(index: MemberIndex) -> None:
        check_index(index, identities, row_counts)
        if label_map is not None and index.label_map != label_map:
            raise ValueError("its label map is not the one the source gives")
        if check is not None:
            check(index)

    cached = load_cached_index(cache, layout, identities, binding, verify)
    if cached is not None:
        logger.info("planning from the cached member index in %s", cache.location)
        return _scan(root, layout, cached.label_map, iter(cached.groups), identities, cached.ignored, limit)
    ignored: list[str] = []
    labels = {} if label_map is None else dict(label_map)

    def walk() -> Iterator[Group]:
        done: list[Group] = []
        for group in build(ignored, labels):
            done.append(group)
            yield group
        if limit is None:
            if cache is not None and cache.writable:
                save_index(cache, MemberIndex(layout, identities, labels, done, ignored, binding()))

    return _scan(root, layout, labels, walk(), identities, ignored, limit)


def _cut_off(member: Member, identity: ArchiveIdentity) -> str | None:
    """The problem of a member whose declared data runs past the end of its archive file (a truncated tar, or a
    header declaring 8 GiB in a small file): it is never read, and a cached index keeps only data inside files."""
    if member.offset + member.size <= identity.size:
        return None
    return f"truncated tar: member {member.name!r} of {member.size} bytes is cut off by the end of {identity.location}"


def _damaged_rest(location: str, offset: int, problem: str) -> Member:
    """The failed item that stands for the unreadable rest of a tar (its members cannot be listed)."""
    name = PurePosixPath(location).name
    reason = f"{location}: {problem}; the members after byte {offset} cannot be listed"
    return Member(f"~damaged-{name}", offset, 0, -1, reason)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet train archive


def _outer_members(handle, identity: ArchiveIdentity, ignored: list[str]) -> tuple[list[tarfile.TarInfo], str | None]:
    """The outer members (per-class tars) and the problem of the archive's unreadable rest (None: intact).
    SourceError when not one member can be read."""
    members, problem = scan_tar(handle, identity.size, ignored=ignored)
    if problem is not None and not members:
        raise SourceError(f"{identity.location} is {problem}")
    return members, problem


def open_train_archive(location: str, limit: int | None, cache: IndexCache | None) -> SourceScan:
    """ILSVRC2012_img_train.tar: a tar of `nXXXXXXXX.tar` per-class tars. Label = position of the synset in the
    sorted synset list; classes are indexed in that order, one inner tar at a time. A damaged outer tar (a
    truncated download) keeps the per-class tars before the damage; the rest is one failed item."""
    identity = identify(location)
    ignored_outer: list[str] = []
    with open_archive(location) as handle:
        outer, damage = _outer_members(handle, identity, ignored_outer)
    inner: dict[str, tarfile.TarInfo] = {}
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
    rest = None
    if damage is not None:
        end = max(m.offset_data + m.size for m in outer)
        rest = _damaged_rest(identity.location, min(end, identity.size), damage)
        logger.warning("%s; the %d per-class tars before the damage are used", rest.problem, len(inner))
    label_map = {synset: label for label, synset in enumerate(sorted(inner))}

    def build(ignored: list[str], labels: dict[str, int]) -> Iterator[Group]:
        ignored.extend(ignored_outer)
        with open_archive(location) as archive:
            for synset, label in label_map.items():
                members = index_inner_tar(archive, identity.size, inner[synset], label, ignored)
                yield Group(synset, identity.location, members)
        if rest is not None:
            yield Group("", identity.location, [rest])

    spans = {synset: (m.offset_data, m.offset_data + m.size) for synset, m in inner.items()}

    def check(index: MemberIndex) -> None:
        """Each group is a per-class tar of the archive now, its members inside it, labelled with its synset."""
        numbers, first = index.member_arrays(), 0
        for group in index.groups:
            mine, first = slice(first, first + len(group.members)), first + len(group.members)
            if group.prefix == "" and numbers.damaged[mine].all():
                continue  # the damaged rest
            if group.prefix not in spans:
                raise ValueError(f"group {group.prefix!r} is not a per-class tar of {location}")
            start, end = spans[group.prefix]
            readable = ~numbers.damaged[mine]
            offsets, sizes = numbers.offsets[mine][readable], numbers.sizes[mine][readable]
            if not ((offsets >= start) & (offsets + sizes <= end)).all():
                raise ValueError(f"a member of group {group.prefix!r} lies outside {group.prefix}.tar")
            if not (numbers.labels[mine] == label_map[group.prefix]).all():
                raise ValueError(f"a member of group {group.prefix!r} has another label than its synset's")

    structure = json.dumps([[m.name, m.offset_data, m.size] for m in outer]).encode("utf-8", "surrogateescape")
    return _indexed(
        identity.location, "imagenet-train", [identity], cache, limit, build, dict(label_map), structure, check
    )


# ----------------------------------------------------------------------------------------------------------------
# ImageNet validation archive + devkit labels


def open_val_archive(location: str, limit: int | None, cache: IndexCache | None, labels: str | None) -> SourceScan:
    """ILSVRC2012_img_val.tar: 50,000 JPEGs in one flat tar; labels from the devkit, in the sorted synset order."""
    identity = identify(location)
    labels = labels or find_val_labels(location)
    synset_of, label_map = val_labels(labels)

    def build(ignored: list[str], _: dict[str, int]) -> Iterator[Group]:
        with open_archive(location) as handle:
            found, damage = scan_tar(handle, identity.size, ignored=ignored)
        if damage is not None and not found:
            raise SourceError(f"{location} is damaged: {damage}")
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
            by_name[name].problem = problem or _cut_off(by_name[name], identity)
        members = [by_name[name] for name in sorted(by_name)]
        if damage is not None:  # a truncated download: the members before the damage are used
            end = max(m.offset_data + m.size for m in found)
            members.append(_damaged_rest(identity.location, min(end, identity.size), damage))
            logger.warning("%s; the %d members before the damage are used", members[-1].problem, len(found))
        yield Group("", identity.location, members)

    def check(index: MemberIndex) -> None:
        """Every readable member's label is the one the labels give its image id."""
        for group in index.groups:
            for member in group.members:
                synset = synset_of.get(PurePosixPath(member.name).name.split(".")[0])
                if member.problem is None and (synset is None or label_map[synset] != member.label):
                    raise ValueError(f"{member.name} has the label {member.label}")

    return _indexed(identity.location, "imagenet-val", [identity], cache, limit, build, dict(label_map), check=check)


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


_WdsSample = tuple[str, Member | None, list[tuple[str, bytes]], list[str]]


def _wds_samples(location: str, ignored: list[str]) -> tuple[list[_WdsSample], str | None]:
    """(key, image member, [(label extension, bytes)], [duplicate members]) of one WebDataset tar in member order
    (one pass: the headers, and the bytes of the small label members). A key with two images or two labels of
    one extension keeps its first of each and lists the others as duplicates (the sample becomes a failure).
    With them, the problem of a tar that cannot be read to its end (None: intact)."""
    samples: dict[str, list] = {}
    mode = "r|" if is_url(location) else "r:"  # a URL is read once from start to end; a file skips with seeks
    try:
        with open_archive(location) as handle, tarfile.open(fileobj=handle, mode=mode) as tar:
            for member in tar:
                name = _clean_name(member.name)
                match = _WDS_NAME.match(name)
                if not member.isfile() and not member.isdir():
                    ignored.append(not_read(member, f"{location}#{member.name}"))
                    continue
                if not member.isfile() or _is_hidden(name) or match is None:
                    ignored.append(f"{location}#{member.name}")
                    continue
                key, extension = match.group(1), match.group(2).lower()
                sample = samples.setdefault(key, [key, None, [], []])
                if extension in IMAGE_EXTENSIONS:
                    if sample[1] is None:
                        sample[1] = Member(name, member.offset_data, member.size)
                    else:
                        sample[3].append(name)
                elif extension in LABEL_EXTENSIONS and member.size <= _MAX_LABEL_BYTES:
                    if any(found == extension for found, _ in sample[2]):
                        sample[3].append(name)
                    else:
                        sample[2].append((extension, tar.extractfile(member).read()))
                else:
                    ignored.append(f"{location}#{member.name}")
    except tarfile.TarError as error:
        if not samples:
            raise SourceError(f"cannot read the WebDataset tar {location}: {one_line(error)}") from error
        damage = f"damaged tar ({one_line(error)})"  # the members read before the damage are kept
    else:
        damage = None
    return [tuple(sample) for sample in samples.values()], damage


def open_webdataset(location: str, limit: int | None, cache: IndexCache | None) -> SourceScan:
    """WebDataset tars (img2dataset output and similar): samples `KEY.jpg|png|webp` with an optional `KEY.cls`
    or `KEY.json` label, in tar order, tars in name order. Labels are the integers found (below MAX_CLASSES: a
    larger one is a SourceError naming the member); the label map names classes "0" ... "max" and grows while the
    tars are walked. A sample without an image is ignored; one whose label cannot be read, or whose key repeats an
    image or a label (which copy is meant is unknown), becomes a failure with the reason, and the repeated members
    are listed among the ignored."""
    tars = list_tars(location)
    if not tars:
        raise SourceError(f"no .tar file in {location}")
    identities = [identify(tar) for tar in tars]
    state = {"labelled": None}

    def build(ignored: list[str], labels: dict[str, int]) -> Iterator[Group]:
        for identity in identities:
            members = []
            samples, damage = _wds_samples(identity.location, ignored)
            for key, image, label_members, duplicates in samples:
                if image is None:
                    ignored.append(f"{identity.location}#{key}")
                    continue
                image.label, image.problem = _sample_label(key, label_members, identity.location, state)
                if image.problem is None:
                    image.problem = _cut_off(image, identity)
                if duplicates:
                    ignored.extend(f"{identity.location}#{name} (a duplicate of the key {key})" for name in duplicates)
                    image.label = -1
                    image.problem = (
                        f"{identity.location}#{key}: duplicate key: {', '.join(duplicates)} repeat(s) a member of "
                        "this sample, so which image or label is meant is unknown"
                    )
                for value in range(len(labels), image.label + 1):
                    labels[str(value)] = value
                members.append(image)
            if damage is not None and not any((m.problem or "").startswith("truncated tar") for m in members):
                # (A member cut off by the end of the tar already accounts for the damage.)
                members.append(_damaged_rest(identity.location, identity.size, damage))
            stem = PurePosixPath(identity.location).name[: -len(".tar")]
            yield Group(stem, identity.location, members)

    def check(index: MemberIndex) -> None:
        if index.label_map != {str(value): value for value in range(len(index.label_map))}:
            raise ValueError('its label map is not the classes "0" ... "max"')

    return _indexed(location.rstrip("/"), "webdataset", identities, cache, limit, build, check=check)


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
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        return -1, f"{tar}#{key}: unreadable {extension} label ({error})"
    if label < 0:
        return -1, f"{tar}#{key}: negative label {label}"
    return check_label(label, f"{tar}#{key}.{extension}"), None
