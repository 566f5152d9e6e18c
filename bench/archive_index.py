"""Planning over a synthetic ImageNet train archive: the first pass (member index from the tar headers) and a
resumed run (index cached in OUT).

    python bench/archive_index.py --classes 1000 --per-class 1281 --work /tmp/archive-bench

The archive has ImageNet's layout and member count (a tar of `nXXXXXXXX.tar` per-class tars) with one tiny JPEG
repeated, so its size is dominated by tar headers (~1.3 GB for 1.28M members). "wall s" is `plan_job` for a job
of kind `images` (source index + shard tasks + fingerprints, as a real run does before its first task); peak RSS
is the process's maximum resident size after that step.
"""

from __future__ import annotations

import argparse
import io
import resource
import tarfile
import time
from pathlib import Path


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def build_archive(path: Path, classes: int, per_class: int) -> None:
    """The outer tar, written member by member (each inner tar built in memory: ~1.3 MB for 1281 members)."""
    image = tiny_jpeg()
    with tarfile.open(path, "w") as outer:
        for c in range(classes):
            synset = f"n{1440764 + c:08d}"
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for i in range(per_class):
                    info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                    info.size = len(image)
                    inner.addfile(info, io.BytesIO(image))
            info = tarfile.TarInfo(f"{synset}.tar")
            info.size = buffer.tell()
            buffer.seek(0)
            outer.addfile(info, buffer)


def plan(archive: Path, out: Path) -> tuple[float, int]:
    from pipeline.encode.job import EncodeOptions, plan_job

    started = time.perf_counter()
    planned = plan_job(EncodeOptions(source=str(archive), out=str(out), kind="images", progress=False))
    return time.perf_counter() - started, planned.items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1281)
    parser.add_argument("--work", type=Path, default=Path("/tmp/archive-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    archive = args.work / f"train-{args.classes}x{args.per_class}.tar"
    if not archive.exists():
        started = time.perf_counter()
        build_archive(archive, args.classes, args.per_class)
        print(f"built {archive} ({archive.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.1f} s")
    out = args.work / "out"
    (out / "source-index.npz").unlink(missing_ok=True)
    first, items = plan(archive, out)
    rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    index_mib = (out / "source-index.npz").stat().st_size / 2**20
    print(
        f"first pass (index from tar headers): {items} items, {first:.2f} s, peak RSS {rss_first} MiB, "
        f"index {index_mib:.1f} MiB"
    )
    resumed, items = plan(archive, out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"resumed (cached index): {items} items, {resumed:.2f} s, peak RSS {rss} MiB")


if __name__ == "__main__":
    main()
