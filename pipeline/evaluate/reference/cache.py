"""What is computed once per reference and kept: its content hash (memoised by names, sizes and modification
times, like git's index) and its features per layer, cached beside the reference (or in a user cache directory when
the reference is read-only), keyed by the reference's content hash and the feature extractor's identity.

torch-fidelity's own cache (`cache_root`, `input2_cache_name`) is not used: it is keyed by a name only, not by the
weights file, and reads its entries back with pickle (`torch.load(weights_only=False)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import AtomicFile, write_bytes_atomic, write_json_atomic
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import json_bytes, sha256_file, shard_problems
from pipeline.evaluate.datasets import ReferenceInputError, list_image_files
from pipeline.evaluate.inception import FeatureConfig, create_feature_extractor, extract_features
from pipeline.evaluate.reference.formats import Reference, reference_dataset

logger = logging.getLogger(__name__)

CACHE_DIR_NAME = ".fidelity-cache"


# ----------------------------------------------------------------------------------------------------------------
# Hashing helpers


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable value in canonical form (`json_bytes`: sorted keys, no spaces)."""
    return hashlib.sha256(json_bytes(value)).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Reference content hashes and the feature cache


def reference_cache_dir(reference: Reference, override: str | os.PathLike | None = None) -> Path:
    """Where reference features are cached: `override`, else beside the reference, else the user cache."""
    if override is not None:
        directory = Path(override)
    else:
        beside = (reference.path if reference.path.is_dir() else reference.path.parent) / CACHE_DIR_NAME
        if _writable(beside):
            return beside
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        directory = base / "diffit-pipe" / "fidelity"
        logger.info("%s is not writable; caching reference features in %s", beside, directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _writable(directory: Path) -> bool:
    """True when files can be created in `directory` (made if missing): a temporary file is opened and dropped."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        AtomicFile(directory / ".probe").abort()
        return True
    except OSError:
        return False


def _fingerprint(files: Sequence[Path], root: Path) -> str:
    """Cheap identity of a file set (relative names, sizes, modification times) for memoising content hashes."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append(
            [path.relative_to(root).as_posix() if path != root else path.name, stat.st_size, stat.st_mtime_ns]
        )
    return sha256_json(entries)


def _memoised(cache_dir: Path, fingerprint: str, compute) -> str:
    """The content hash memoised under `fingerprint` in `cache_dir/content-hashes.json` (like git's index)."""
    memo_path = cache_dir / "content-hashes.json"
    memo = _read_memo(memo_path)
    if fingerprint in memo:
        return memo[fingerprint]
    value = compute()
    memo[fingerprint] = value
    write_json_atomic(memo_path, memo)
    return value


def _read_memo(memo_path: Path) -> dict[str, str]:
    """The memo of content hashes, keeping only well-formed entries (a SHA-256 hex string per fingerprint).

    The memo is only a cache: an unreadable or damaged one is logged and rebuilt, never trusted.
    """
    if not memo_path.is_file():
        return {}
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable memo (%s), recomputing content hashes", memo_path, error)
        return {}
    if not isinstance(memo, dict):
        logger.warning("%s: not a JSON object, recomputing content hashes", memo_path)
        return {}
    valid = {key: value for key, value in memo.items() if _is_sha256(value)}
    if len(valid) != len(memo):
        logger.warning("%s: %d malformed entries dropped", memo_path, len(memo) - len(valid))
    return valid


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def reference_content_hash(reference: Reference, cache_dir: Path) -> str:
    """SHA-256 identifying the reference's content.

    Shards: the manifest's per-shard SHA-256 (each shard's size is checked against the manifest). Folders and
    `.npz` files: the bytes of every file, memoised by (names, sizes, mtimes) so unchanged references are not
    re-read.
    """
    if reference._content_hash is not None:
        return reference._content_hash
    if reference.kind == "shards":
        manifest = load_manifest(reference.path)
        problems = [p for shard in manifest["shards"] for p in shard_problems(reference.path, shard, rehash=False)]
        if problems:
            raise ReferenceInputError(f"{reference.path}: shards do not match manifest.json: {'; '.join(problems)}")
        value = sha256_json(
            {
                "kind": "images-shards",
                "resolution": manifest["resolution"],
                "shards": [[s["name"], s["sha256"], int(s["count"])] for s in manifest["shards"]],
            }
        )
    elif reference.kind == "folder":
        files = list_image_files(reference.path)

        def compute() -> str:
            digest = hashlib.sha256()
            for path in files:
                digest.update(path.relative_to(reference.path).as_posix().encode() + b"\0")
                digest.update(sha256_file(path).encode())
            return digest.hexdigest()

        value = _memoised(cache_dir, "folder:" + _fingerprint(files, reference.path), compute)
    else:
        value = _memoised(
            cache_dir,
            f"file:{reference.path.resolve()}:" + _fingerprint([reference.path], reference.path),
            lambda: sha256_file(reference.path),
        )
    reference._content_hash = value
    return value


def _cache_file(
    cache_dir: Path, content_hash: str, identity: dict[str, Any], layer: str, subset: str | None = None
) -> Path:
    fields = {"reference": content_hash, "extractor": identity, "layer": layer}
    if subset is not None:
        fields["subset"] = subset  # only then: the cache files of whole references keep their names
    key = sha256_json(fields)
    return cache_dir / f"features-{content_hash[:12]}-{key[:16]}-{layer}.safetensors"


def _subset_key(indices: np.ndarray | None) -> str | None:
    return None if indices is None else hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()


def reference_features(
    reference: Reference,
    layers: Sequence[str],
    config: FeatureConfig,
    cache_dir: Path,
    extractor: torch.nn.Module | None = None,
    indices: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reference features of `layers` (of the images `indices` only, when given): from the cache when present,
    else extracted once and cached atomically.

    Returns (features by layer, cache report {layer: {"file", "hit"}}).
    """
    from safetensors.torch import save as safetensors_bytes

    content_hash = reference_content_hash(reference, cache_dir)
    identity = config.extractor_identity()
    subset = _subset_key(indices)
    features: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {}
    missing = []
    for layer in sorted(set(layers)):
        path = _cache_file(cache_dir, content_hash, identity, layer, subset)
        if path.is_file():
            features[layer] = _load_cached_features(path)
            report[layer] = {"file": str(path), "hit": True}
            logger.info("reference features %s: cache hit %s", layer, path)
        else:
            missing.append(layer)
    if missing:
        extractor = extractor if extractor is not None else create_feature_extractor(config, missing)
        dataset = reference_dataset(reference)
        if indices is not None:
            dataset = torch.utils.data.Subset(dataset, np.asarray(indices).tolist())
        logger.info("extracting reference features %s from %d images of %s", missing, len(dataset), reference.path)
        extracted = extract_features(dataset, extractor, config, "reference features")
        for layer in missing:
            path = _cache_file(cache_dir, content_hash, identity, layer, subset)
            metadata = {
                "reference": json.dumps(reference.describe()),
                "extractor": json.dumps(identity),
                "layer": layer,
                "subset_sha256": subset or "",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # Serialised in memory, then written through `write_bytes_atomic`: safetensors' own `save_file`
            # creates its files private (0600), and the cache is shared like the reference beside it.
            write_bytes_atomic(path, safetensors_bytes({"features": extracted[layer].contiguous()}, metadata))
            features[layer] = extracted[layer]
            report[layer] = {"file": str(path), "hit": False}
    return features, report


def _load_cached_features(path: Path) -> torch.Tensor:
    """The features tensor of a cache file; a damaged one is reported with the way out (delete it)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["features"]
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ReferenceInputError(
            f"{path}: unreadable reference feature cache ({type(error).__name__}: {error}); delete it to recompute"
        ) from error
