"""The ADM evaluator's sample layout: a finished sample store as one `.npz`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.evaluate.sample_store import SampleStore

logger = logging.getLogger(__name__)


def export_npz(store: SampleStore, path: str | os.PathLike, batch: int | None = None) -> Path:
    """Write the store as an ADM-evaluator `.npz` (`arr_0` uint8 [N, H, W, 3], `arr_1` int64 labels), atomically,
    with `pixel_quantization` (a string the evaluator ignores: how the samples became uint8, "round" or "truncate").

    The archive is streamed chunk by chunk (uncompressed, like `np.savez`), so 50k images at 512 px never need
    to fit in memory at once. A store with a chunk not done, absent or undecodable is refused with a
    `SampleStoreError` naming it (and no file is left behind): zarr would read it as black images with label -1.
    """
    import zipfile

    store.require_complete()  # every chunk done and its files present: nothing read below is a fill value
    labels = store.read_labels()  # checked before the long image stream
    layout = store.layout
    batch = batch or layout.chunk_size
    with (
        atomic_path(path) as temp,
        zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        shape = (layout.num_samples, layout.height, layout.width, 3)
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(
                member,
                {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape},
            )
            for start in range(0, layout.num_samples, batch):
                stop = min(start + batch, layout.num_samples)
                member.write(np.ascontiguousarray(store.read_images(start, stop)).tobytes())
        with archive.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, labels.astype(np.int64))
        with archive.open("pixel_quantization.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(store.pixel_quantization))
    logger.info("exported %d samples to %s", layout.num_samples, path)
    return Path(path)
