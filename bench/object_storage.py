"""Datasets on local disk vs in object storage (S3): the same jobs and the same bytes, timed both ways (a benchmark,
not a test).

The object store is a real S3 server, `rclone serve s3` on 127.0.0.1 (the rclone binary the test extra installs
beside Python), serving a temporary directory on the same disk as the local outputs; the pipeline reaches it
through s3fs over HTTP, with the endpoint and keys in `AWS_ENDPOINT_URL` / `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` as a user would set them. There is no network in between: the S3 - local differences are
the protocol's and the client's costs (s3fs requests, HTTP, spooling an upload to a temporary file, rclone
writing the object), a lower bound on what a real object store over a real network adds.

What it measures, local vs S3 interleaved round by round (order swapped every round; the machine drifts by
+-20% and may be shared), median and spread (min-max) over the rounds:

1. encode: `pipeline.encode.job.run_encode` with a random-init AutoencoderKL (the small VAE of bench/encode.py, or
   the SD-VAE architecture with --full) on photo-like JPEGs at 256 px, workers=0 (tasks in this process) and
   torch_threads=1; images/s writing to a local directory vs to s3://bench/...; each round writes a fresh
   output and deletes the previous one. Bytes written, and the upload rate the job needs (bytes / S3 job time).
2. resume check: the same job run again over its finished output (every shard trusted from its sealed
   sidecar, nothing encoded): seconds.
3. train data path: the trainer's loader alone (`pipeline.train.data.make_loader`, resampled mode as in
   training, every shard checked against the manifest's sha256), samples/s with num_workers 0 and 2 over a
   synthetic latent dataset of ~200 MB (12 shards of 512 DiffiT-XL/2-sized latents, 32x32x4, written locally
   with the encode stage's ShardWriter, then uploaded); shard URLs and hashes come from the manifest
   (`shard_urls(url, load_manifest(url))`). Also: time to the first batch, and `read_shard` of one whole shard
   (download + sha256) in MB/s. A local shard is hashed once per process and then trusted by file identity;
   an object is downloaded and hashed on every read.
4. `diffit-pipe train` (`pipeline.train.run`, in process), DiffiT-Tiny/2 on that dataset, 5 steps of batch 8
   with 1 loader worker: wall seconds of the whole run (setup, checkpoint) and median seconds per step.
5. where the time goes: latency of single S3 requests through s3fs (stat / HEAD, GET of a small object, list,
   PUT of a small object) against their local equivalents; the S3 requests of an encode job and of its resume
   check, counted by operation; CPU seconds of this process and of the rclone server per image, shard or 1000
   samples (on these cores the server's CPU competes with the pipeline's; on a real store it would not).

The loader rows close this process's object-store clients before their workers fork, as the trainer does
(`pipeline.core.storage_io.release_clients`: a forked child can otherwise stall this process's next request by
15 s), and measure the trainer's loader and reads as a fresh trainer process would (its cache of verified local
shards emptied before each run).

Run:  .venv/bin/python bench/object_storage.py            (about 4 minutes on 2 idle cores, 6 when shared)
      .venv/bin/python bench/object_storage.py --quick    (smoke run, < 60 s: 1 round, small data)
      .venv/bin/python bench/object_storage.py --full     (also the SD-VAE architecture in the encode rows; slow)

The markdown table is printed and written, with a short reading of the numbers, to --report
(default /tmp/docs-storage-bench.md).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUCKET = "bench"
ACCESS_KEY, SECRET_KEY = "benchaccesskey", "benchsecretkey123"  # rclone wants 10+ characters
STORES = ("local", "s3")


def _load_bench_encode():
    """bench/encode.py as a module (its `save_random_vae`, `make_jpegs`, VAE configs)."""
    spec = importlib.util.spec_from_file_location("bench_encode", REPO / "bench" / "encode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are created
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# The S3 server
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def s3_server(root: Path):
    """`rclone serve s3 ROOT` with one bucket (tests/s3_server.py), and the environment that points s3fs at it
    (set for this process and the DataLoader workers it forks)."""
    sys.path.insert(0, str(REPO / "tests"))  # the server helper the object-storage tests use
    from s3_server import rclone_s3_server

    with rclone_s3_server(root, BUCKET, ACCESS_KEY, SECRET_KEY) as server:
        os.environ.update(server.environment)
        yield server


def _fs():
    """The s3fs file system the pipeline uses (fsspec's cached instance for this process)."""
    from pipeline.core.storage_io import url_to_fs

    return url_to_fs(f"s3://{BUCKET}")[0]


def remove(where: str) -> None:
    """Delete an output: a local directory, or every object under an S3 prefix (through S3, never behind the
    server's back)."""
    if where.startswith("s3://"):
        fs = _fs()
        path = where[len("s3://") :]
        fs.invalidate_cache(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        fs.invalidate_cache(path)
    else:
        shutil.rmtree(where, ignore_errors=True)


def stored_bytes(where: str) -> int:
    """Total bytes of the files of an output (local directory or S3 prefix), hidden files (the lock) excepted."""
    from pipeline.core.storage import Location

    location = Location.of(where)
    return sum(location.stat(name).size for name in location.names() if not name.startswith("."))


@contextlib.contextmanager
def counted_requests() -> Iterator[collections.Counter]:
    """Count the S3 operations (HeadObject, GetObject, ListObjectsV2, PutObject, ...) this process sends inside the
    block, from botocore's before-call event on the s3fs client the pipeline uses."""
    fs = _fs()
    counts: collections.Counter = collections.Counter()

    def hook(model, **_) -> None:
        counts[model.name] += 1

    fs.s3.meta.events.register("before-call.s3", hook)
    try:
        yield counts
    finally:
        fs.s3.meta.events.unregister("before-call.s3", hook)


def _requests_text(counts: collections.Counter) -> str:
    return f"{sum(counts.values())} (" + ", ".join(f"{n} {name}" for name, n in counts.most_common()) + ")"


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a value per store per round (bigger is better when `higher`)."""

    label: str
    unit: str
    higher: bool
    values: dict[str, list[float]] = field(default_factory=lambda: {store: [] for store in STORES})
    digits: int = 2
    key: str = ""  # how the reading below the table finds it

    def add(self, store: str, value: float) -> None:
        self.values[store].append(value)

    def median(self, store: str) -> float:
        return statistics.median(self.values[store])

    def cell(self, store: str) -> str:
        values = self.values[store]
        if not values:
            return "-"
        text = f"{self.median(store):.{self.digits}f}"
        if len(values) > 1:
            text += f" ({min(values):.{self.digits}f}-{max(values):.{self.digits}f})"
        return text

    def ratio(self) -> str:
        if not (self.values["local"] and self.values["s3"]):
            return "-"
        local, s3 = self.median("local"), self.median("s3")
        return f"{s3 / local:.2f}x" if local else "-"


def interleaved(rounds: int) -> Iterator[tuple[int, tuple[str, ...]]]:
    """(round, store order): local first in even rounds, S3 first in odd ones."""
    for index in range(rounds):
        yield index, STORES if index % 2 == 0 else STORES[::-1]


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count after a job that sets its own (`torch_threads`)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def encode_rows(options, tmp: Path, bench_encode, server) -> tuple[list[Row], dict]:
    """Encode jobs and their resume checks, local vs S3, interleaved; per VAE: images/s, seconds, bytes."""
    from pipeline.encode.job import EncodeOptions, run_encode

    # (name, config, images, shard size, images of the warm-up job); the SD-VAE takes seconds per image on 1 thread
    vaes = [("small VAE", bench_encode.SMALL_VAE, options.images, options.shard_size, options.batch_size)]
    if options.full:
        vaes.append(("SD-VAE arch", bench_encode.SD_VAE, 2 if options.quick else 8, 1 if options.quick else 4, 1))
    source = tmp / "jpegs"
    bench_encode.make_jpegs(source, options.images)
    rows, facts = [], {}
    for vae_name, vae_config, images, shard_size, warm_images in vaes:
        vae_path = bench_encode.save_random_vae(tmp / f"vae-{vae_name.replace(' ', '-')}", vae_config)

        def job(
            out: str, images: int = images, vae_path: str = vae_path, shard_size: int = shard_size
        ) -> EncodeOptions:
            return EncodeOptions(
                source=str(source),
                out=out,
                kind="latents",
                resolution=256,
                vae=vae_path,
                shard_size=shard_size,
                batch_size=options.batch_size,
                workers=0,
                torch_threads=1,
                progress=False,
                limit=images,
            )

        targets = {"local": lambda name: str(tmp / "out" / name), "s3": lambda name: f"s3://{BUCKET}/encode/{name}"}
        with torch_threads_kept():  # warm-up: the VAE loaded and cached, both stores' first requests made
            for store in STORES:
                warm = targets[store]("warm-up")
                assert run_encode(replace(job(warm), limit=warm_images)).ok
                remove(warm)
        tag = "" if vae_name == "small VAE" else "-sd"
        encode = Row(
            f"encode, {vae_name}, {images} images, shard size {shard_size}",
            "images/s",
            True,
            key=f"encode{tag}",
        )
        resume = Row(
            "  resume check (rerun of the finished job, all shards trusted)", "s", False, digits=3, key=f"resume{tag}"
        )
        wall = Row("  encode wall time", "s", False, key=f"encode-wall{tag}")
        cpu = Row(
            "  CPU per image, this process (all threads; less sensitive to a shared machine)",
            "s",
            False,
            key=f"encode-cpu{tag}",
        )
        server_cpu = Row("  rclone server CPU for the whole job", "s", False, digits=3)
        previous: dict[str, str] = {}
        for index, order in interleaved(options.rounds):
            for store in order:
                out = targets[store](f"{vae_name.replace(' ', '-')}-round{index}")
                if store in previous:
                    remove(previous[store])  # keep one output per store on disk
                with torch_threads_kept(), counted_requests() as encode_requests:
                    started, cpu_started, server_started = time.perf_counter(), time.process_time(), server.cpu_s()
                    result = run_encode(job(out))
                    elapsed = time.perf_counter() - started
                    cpu.add(store, (time.process_time() - cpu_started) / images)
                    if store == "s3":
                        server_cpu.add(store, server.cpu_s() - server_started)
                assert result.ok and result.shards_written == result.shards_total, result
                with torch_threads_kept(), counted_requests() as resume_requests:
                    started = time.perf_counter()
                    again = run_encode(job(out))
                    resumed = time.perf_counter() - started
                assert again.ok and again.shards_skipped == again.shards_total, again
                if store == "s3":
                    facts.setdefault(vae_name, {}).update(
                        encode_requests=_requests_text(encode_requests),
                        encode_request_count=sum(encode_requests.values()),
                        resume_requests=_requests_text(resume_requests),
                        resume_request_count=sum(resume_requests.values()),
                    )
                encode.add(store, images / elapsed)
                wall.add(store, elapsed)
                resume.add(store, resumed)
                previous[store] = out
                facts.setdefault(vae_name, {})["shards"] = result.shards_total
                facts[vae_name].setdefault("bytes", {})[store] = stored_bytes(out)
                _progress(f"encode {vae_name} round {index} {store}: {elapsed:.1f} s, resume {resumed:.2f} s")
        for out in previous.values():
            remove(out)
        written = facts[vae_name]["bytes"]
        assert written["local"] == written["s3"], written  # the same files, byte counts equal
        mb = written["s3"] / 1e6
        upload = Row(
            f"  bytes written {mb:.1f} MB ({facts[vae_name]['shards']} shards): MB/s the job writes", "MB/s", True
        )
        for store in STORES:
            for seconds in wall.values[store]:
                upload.add(store, mb / seconds)
        rows += [encode, wall, cpu, upload, server_cpu, resume]
    return rows, facts


def write_latent_dataset(out: Path, shards: int, per_shard: int, latent_size: int = 32, classes: int = 1000) -> Path:
    """A latent dataset in the encode format (float16 mean/std [2, 4, s, s], labels, sidecars, manifest) with
    random latents: what the loader reads, without a VAE."""
    from pipeline.core.atomic import write_json_atomic
    from pipeline.core.manifest import FORMAT_VERSION
    from pipeline.core.shard_members import latent_sample
    from pipeline.core.shards import ShardWriter

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for index in range(shards):
        with ShardWriter(out, index) as writer:
            for i in range(per_shard):
                mean = rng.standard_normal((2, 4, latent_size, latent_size), dtype=np.float32) * 5
                std = np.full_like(mean, 0.1)
                key = f"{index:04d}{i:06d}"
                writer.write(latent_sample(key, mean, std, int(rng.integers(classes)), {"path": f"{key}.JPEG"}))
            sidecar = writer.commit({"failures": 0})  # writes the sidecar too
        entries.append({name: sidecar[name] for name in ("name", "count", "sha256", "bytes")})
    (out / "failures.jsonl").write_text("")
    count = shards * per_shard
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "latents",
        "resolution": latent_size * 8,
        "num_classes": classes,
        "label_map": {f"n{c:08d}": c for c in range(classes)},
        "latent_channels": 4,
        "latent_size": latent_size,
        "latent_shape": [2, 4, latent_size, latent_size],
        "vae": {"id": "bench/random", "scaling_factor": 0.18215, "downsample_factor": 8, "convention": "unscaled"},
        "counts": {"seen": count, "written": count, "failed": 0},
        "shards": entries,
        "command": ["bench/object_storage.py"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out


def upload_dataset(local: Path, url: str) -> tuple[float, int]:
    """Upload a dataset directory file by file through `Location.write_bytes` (one PUT each), manifest last as
    the writers order it; (seconds, bytes)."""
    from pipeline.core.storage import Location

    location = Location.of(url)
    files = sorted((p for p in local.iterdir() if p.is_file()), key=lambda p: (p.name == "manifest.json", p.name))
    total, started = 0, time.perf_counter()
    for path in files:
        data = path.read_bytes()
        location.write_bytes(path.name, data)
        total += len(data)
    return time.perf_counter() - started, total


def loader_spec(where: str, batch_size: int):
    """The trainer's StreamSpec (resampled, shuffle buffer, sha256 from the manifest) over a dataset."""
    from pipeline.core.manifest import load_manifest, shard_urls
    from pipeline.train.data import StreamSpec

    manifest = load_manifest(where)
    urls = shard_urls(where, manifest)
    hashes = {entry["name"]: entry["sha256"] for entry in manifest["shards"]}
    return StreamSpec(
        urls=tuple(urls),
        kind="latents",
        batch_size=batch_size,
        resampled=True,
        shuffle_buffer=256,
        scaling_factor=manifest["vae"]["scaling_factor"],
        num_classes=manifest["num_classes"],
        sha256=tuple(hashes[url.rsplit("/", 1)[-1]] for url in urls),
    )


def time_loader(spec, workers: int, warmup: int, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over `batches` batches after `warmup` more)."""
    from pipeline.train.data import infinite, make_loader

    started = time.perf_counter()
    stream = infinite(make_loader(spec, workers))
    next(stream)
    first = time.perf_counter() - started
    for _ in range(warmup):
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - started
    stream.close()
    return first, batches * spec.batch_size / seconds


def loader_rows(options, datasets: dict[str, str], shard_mb: float, server) -> list[Row]:
    """Samples/s of the loader (0 and 2 workers) and whole-shard reads, local vs S3, interleaved."""
    from pipeline.core.storage_io import release_clients
    from pipeline.train import shard_reading

    specs = {store: loader_spec(where, options.loader_batch) for store, where in datasets.items()}
    read = Row(
        f"read_shard of one {shard_mb:.1f} MB shard (read or download, + sha256)", "MB/s", True, digits=0, key="read"
    )
    raw = Row(
        "  the same bytes without the hash (local: read_bytes; S3: one GET, s3fs cat_file)", "MB/s", True, digits=0
    )
    client_cpu = Row("  read_shard: CPU of this process per shard (all threads)", "ms", False, digits=1, key="read-cpu")
    server_cpu = Row("  read_shard: rclone server CPU per shard", "ms", False, digits=1, key="read-server")
    for _, order in interleaved(options.rounds):
        for store in order:
            spec = specs[store]
            rates, raw_rates, client_s, server_s = [], [], 0.0, 0.0
            shards = list(zip(spec.urls, spec.sha256))[: options.read_shards]
            for url, expected in shards:
                shard_reading._VERIFIED.clear()  # local: hash it as the first read in a process does
                started, cpu_started, server_started = time.perf_counter(), time.process_time(), server.cpu_s()
                shard_reading.read_shard(url, expected)
                rates.append(shard_mb / (time.perf_counter() - started))
                client_s += time.process_time() - cpu_started
                server_s += server.cpu_s() - server_started
                started = time.perf_counter()
                if store == "s3":
                    _fs().cat_file(url[len("s3://") :])
                else:
                    Path(url).read_bytes()
                raw_rates.append(shard_mb / (time.perf_counter() - started))
            read.add(store, statistics.median(rates))
            raw.add(store, statistics.median(raw_rates))
            client_cpu.add(store, client_s / len(shards) * 1000)
            if store == "s3":  # the server's CPU time counts in clock ticks (10 ms): summed over the reads
                server_cpu.add(store, server_s / len(shards) * 1000)
    rows = [read, raw, client_cpu, server_cpu]
    for workers in (0, 2):
        rate = Row(
            f"loader, {workers} workers, batch {options.loader_batch}, {options.loader_batches} batches",
            "samples/s",
            True,
            digits=0,
            key=f"loader{workers}",
        )
        first = Row("  time to the first batch (workers start, first shard read)", "s", False, key=f"first{workers}")
        cpu = Row("  CPU of this process per 1000 samples (all threads)", "ms", False, digits=0, key=f"cpu{workers}")
        server_cpu = Row("  rclone server CPU per 1000 samples", "ms", False, digits=0, key=f"server{workers}")
        samples = (options.loader_warmup + options.loader_batches + 1) * options.loader_batch
        for index, order in interleaved(options.rounds):
            for store in order:
                shard_reading._VERIFIED.clear()  # every round starts as a new trainer process would
                spec = replace(specs[store], start_step=index)  # a fresh draw of shards each round
                if workers:
                    release_clients()  # as `pipeline.train.data.infinite` does before its workers fork
                cpu_started, server_started = time.process_time(), server.cpu_s()
                seconds, samples_per_s = time_loader(spec, workers, options.loader_warmup, options.loader_batches)
                rate.add(store, samples_per_s)
                first.add(store, seconds)
                if not workers:  # the workers' CPU is theirs, not this process's
                    cpu.add(store, (time.process_time() - cpu_started) / samples * 1e6)
                if store == "s3":
                    server_cpu.add(store, (server.cpu_s() - server_started) / samples * 1e6)
                _progress(f"loader {workers} workers round {index} {store}: {samples_per_s:.0f} samples/s")
        rows += [rate, first] + ([] if workers else [cpu]) + [server_cpu]
    return rows


def train_rows(options, datasets: dict[str, str], tmp: Path) -> list[Row]:
    """`pipeline.train.run` (what `diffit-pipe train` calls), DiffiT-Tiny/2, from local vs S3, interleaved."""
    import torch
    import yaml

    from pipeline.train import TrainOptions, run_train

    steps, batch = options.train_steps, 8
    config = {
        "model": {"name": "DiffiT-Tiny/2", "input_size": 32},
        "diffusion": {"type": "adm"},
        "data": {"num_workers": 1},
        "optim": {"name": "adamw", "lr": 1e-4},
        "train": {
            "global_batch_size": batch,
            "max_steps": steps,
            "mixed_precision": "no",
            "log_every": 1,
            "tracker": "none",
            "seed": 0,
        },
        "checkpoint": {"every": steps, "keep": 1},
        "sample": {"every": 0},
    }
    config_path = tmp / "train.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    wall = Row(
        f"train DiffiT-Tiny/2, {steps} steps of batch {batch}, 1 loader worker: whole run", "s", False, key="train"
    )
    step = Row(f"  median step (of {steps}, the first included)", "s", False, digits=3, key="step")
    first_step = Row("  first step (waits for the first shard)", "s", False, digits=3, key="first-step")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    for index, order in interleaved(options.rounds):
        for store in order:
            run_dir = tmp / f"run-{store}-{index}"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            captured = io.StringIO()  # the trainer's progress bar (shown when the run fails)
            try:
                with contextlib.redirect_stderr(captured):
                    started = time.perf_counter()
                    run_train(TrainOptions(run_dir=run_dir, config_path=config_path, data_dir=datasets[store]))
                    elapsed = time.perf_counter() - started
            except BaseException:
                sys.stderr.write(captured.getvalue())
                raise
            finally:
                torch.set_num_threads(threads)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            seconds = [batch / record["images_per_s"] for record in records if "images_per_s" in record]
            assert len(seconds) == steps, records
            wall.add(store, elapsed)
            step.add(store, statistics.median(seconds))
            first_step.add(store, seconds[0])
            shutil.rmtree(run_dir)
            _progress(f"train round {index} {store}: {elapsed:.1f} s")
    return [wall, step, first_step]


def request_rows(options, datasets: dict[str, str]) -> list[Row]:
    """Latency of the single operations behind the resume check and the readers: stat, small GET, list, small
    PUT (through `pipeline.core.storage.Location`, as the pipeline calls them), local vs S3."""
    from pipeline.core.storage import Location

    repeats = 20 if not options.quick else 5
    operations: dict[str, tuple[str, Callable[[object], object]]] = {
        "stat one file (HEAD)": ("req-stat", lambda location: location.stat("shard-000000.json")),
        "read a sidecar (GET, ~300 B)": ("req-get", lambda location: location.read_bytes("shard-000000.json")),
        "list the dataset directory (LIST)": ("req-list", lambda location: location.names()),
        "write a 1 KB file (PUT)": ("req-put", lambda location: location.write_bytes("probe.json", b"{}" * 512)),
    }
    rows = {name: Row(f"request: {name}", "ms", False, digits=2, key=key) for name, (key, _) in operations.items()}
    locations = {store: Location.of(where) for store, where in datasets.items()}
    for _, order in interleaved(options.rounds):
        for store in order:
            for name, (_, operation) in operations.items():
                started = time.perf_counter()
                for _ in range(repeats):
                    operation(locations[store])
                rows[name].add(store, (time.perf_counter() - started) / repeats * 1000)
    for location in locations.values():
        location.remove("probe.json")
    return list(rows.values())


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def table(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| measurement | unit | local disk | S3 (rclone, localhost) | S3 / local |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        better = "higher is better" if row.higher else "lower is better"
        lines.append(
            f"| {row.label} | {row.unit} ({better}) | {row.cell('local')} | {row.cell('s3')} | {row.ratio()} |"
        )
    return "\n".join(lines)


def reading(rows: list[Row], facts: dict) -> str:
    """A short reading of the figures (what they mean, and what they do not)."""
    by_key = {row.key: row for row in rows if row.key}

    def med(key: str, store: str = "s3") -> float:
        row = by_key.get(key)
        return row.median(store) if row is not None and row.values[store] else float("nan")

    request_ms = statistics.median(med(key) for key in ("req-stat", "req-get", "req-list", "req-put"))
    small = facts.get("small VAE", {})
    requests, shards = small.get("resume_request_count", 0), max(small.get("shards", 1), 1)
    # The extra time of the S3 resume check per request it sent, against one request's latency alone: about
    # equal when they go one after another, less when they overlap.
    per_request_ms = (med("resume") - med("resume", "local")) / max(requests, 1) * 1000
    overlap = "about equal: one after another" if per_request_ms > 0.6 * request_ms else "less: they overlap"
    encode_extra_s = small.get("encode_request_count", 0) * request_ms / 1000
    lines = [
        "What the numbers mean. The S3 server is `rclone serve s3` on localhost, serving a directory on the same "
        "disk: there is no network, so the S3 column measures the protocol and the client (s3fs / aiobotocore / "
        "aiohttp: request signing, HTTP, copies of every byte, an upload spooled to a temporary file first), plus "
        "the server's own CPU, which here competes with the pipeline for the same cores (on a real object store it "
        "runs elsewhere). It is a lower bound on what a real store over a network adds in latency: a request costs "
        f"~{request_ms:.1f} ms here against ~10-50 ms to S3 in the same region; and an upper bound on the CPU "
        "the store costs this machine (the server's share goes away).",
        "",
        f"- Encode: the VAE dominates. The S3 job sends {small.get('encode_requests', '?')} requests, "
        f"~{encode_extra_s:.2f} s at the latency measured here, {encode_extra_s / med('encode-wall', 'local'):.2%} of "
        "the job, and uploads the bytes the local job writes (a few MB): a difference in images/s beyond that is "
        "the machine's drift (see the spread; the CPU-per-image row is steadier).",
        f"- Resume check of a finished job ({shards} shards): {med('resume', 'local'):.3f} s local vs "
        f"{med('resume'):.3f} s over S3, which took {requests} requests, {requests / shards:.1f} per shard with the "
        f"job's fixed ones; the extra time is {per_request_ms:.1f} ms per request against {request_ms:.1f} ms for "
        f"one request alone ({overlap}). At 20 ms a request (a real store), "
        f"ImageNet's 1282 shards would take ~{1282 * requests / shards * 20e-3 * per_request_ms / request_ms:.0f} s.",
        f"- Reading a shard (`read_shard`): {med('read'):.0f} MB/s from S3 vs {med('read', 'local'):.0f} MB/s from "
        f"the page cache. A download costs this process {med('read-cpu'):.0f} ms of CPU per shard "
        f"({med('read-cpu', 'local'):.0f} ms locally, mostly the sha256) and the server {med('read-server'):.0f} ms; "
        "an object is hashed on every read, a local file once per process.",
        f"- Loader: {med('loader0'):.0f} vs {med('loader0', 'local'):.0f} samples/s in process, {med('loader2'):.0f} "
        f"vs {med('loader2', 'local'):.0f} with 2 workers (S3 vs local). The read-ahead thread hides the transfer "
        "time, not its CPU: on these 2 cores the client's copies and hashes and the server's "
        f"{med('server2'):.0f} ms of CPU per 1000 samples come out of the decoding. Starting workers costs "
        f"{med('first2'):.2f} s vs {med('first2', 'local'):.2f} s to the first batch: each worker builds its own s3fs "
        "client before its first read.",
    ]
    if "train" in by_key:
        lines.append(
            f"- Training (DiffiT-Tiny/2, a model far cheaper than any real one): {med('train'):.2f} s vs "
            f"{med('train', 'local'):.2f} s for the whole run, a median step of {med('step'):.3f} vs "
            f"{med('step', 'local'):.3f} s; the difference is the setup (manifest, listing, client) and the first "
            f"step waiting for its shard ({med('first-step'):.2f} vs {med('first-step', 'local'):.2f} s). With a model "
            "whose step takes longer than decoding a batch, the loader's S3 overhead disappears behind the step."
        )
    lines += [
        "",
        "Notes (s3fs 2026.9, rclone 1.75): a process that forks after using S3 (DataLoader workers) closes its "
        "clients first (`pipeline.core.storage_io.release_clients`, called by the trainer's loader): a child that "
        "garbage-collects an inherited client breaks the parent's pooled connections, whose next request waits for "
        "s3fs's read timeout (15 s). rclone (not S3) answers GETs of multipart objects (over 50 MiB) with a "
        "checksum botocore rejects: this benchmark sets `AWS_RESPONSE_CHECKSUM_VALIDATION=when_required`.",
    ]
    return "\n".join(lines)


def resume_scaling(shards: int, rounds: int) -> None:
    """The resume check of an encode job with `shards` finished shards in S3 (ImageNet-256: 1282): what
    `run_encode` does now (one listing, the sidecars fetched in concurrent batches, sizes and times from the
    listing) against one request after the other (a GET of each sidecar and a HEAD of its tar and of itself, as
    before 2026-11-27), interleaved. The shards are tiny: only the requests are measured."""
    from pipeline.core.shards import ShardWriter, read_sidecar, shard_name, sidecar_of
    from pipeline.core.storage import Location
    from pipeline.encode.plan import ShardTask, read_sidecars, seal_sidecar, trusted_shard, trusted_shards

    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp_name, s3_server(Path(tmp_name) / "root"):
        out = Location.of(f"s3://{BUCKET}/resume")
        started = time.perf_counter()
        for index in range(shards):
            with ShardWriter(out, index) as writer:
                writer.write({"__key__": f"k{index}", "bin": b"x"})
                writer.commit({"fingerprint": "f", "items": 1, "failures": []}, finish=seal_sidecar)
        _progress(f"{shards} shards written in {time.perf_counter() - started:.1f} s")
        tasks = [ShardTask(i, None, "", "", "", 0, 0, 0, "f", None, "", "", None, None) for i in range(shards)]

        def batched() -> int:
            return len(trusted_shards(out, tasks, read_sidecars(out)))

        def one_by_one() -> int:
            kept = 0
            for index in range(shards):
                sidecar = read_sidecar(out, index)
                names = (shard_name(index), sidecar_of(shard_name(index)))
                stats = {name: found for name in names if (found := out.stat(name)) is not None}
                kept += sidecar is not None and trusted_shard(stats, sidecar, "f")
            return kept

        checks = {"batched": batched, "one by one": one_by_one}
        times: dict[str, list[float]] = {label: [] for label in checks}
        for index in range(rounds):
            for label in list(checks) if index % 2 == 0 else list(checks)[::-1]:
                began = time.perf_counter()
                assert checks[label]() == shards
                times[label].append(time.perf_counter() - began)
        for label, values in times.items():
            print(
                f"| resume check of {shards} shards in S3, {label} | s | {statistics.median(values):.2f} "
                f"({min(values):.2f}-{max(values):.2f}) |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 60 s): 1 round, small data")
    parser.add_argument("--full", action="store_true", help="also encode with the SD-VAE architecture (slow)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--images", type=int, help="JPEGs to encode (default 128; --quick 16)")
    parser.add_argument("--no-train", action="store_true", help="leave out the diffit-pipe train rows")
    parser.add_argument("--report", type=Path, default=Path("/tmp/docs-storage-bench.md"))
    parser.add_argument(
        "--resume-shards", type=int, help="only the resume check of N finished shards in S3 (ImageNet-256: 1282)"
    )
    options = parser.parse_args()
    if options.resume_shards:
        resume_scaling(options.resume_shards, options.rounds or 3)
        return
    quick = options.quick
    options.rounds = options.rounds or (1 if quick else 3)
    options.images = options.images or (16 if quick else 128)
    options.shard_size = 8 if quick else 32
    options.batch_size = 8 if quick else 16
    options.latent_shards, options.per_shard = (4, 64) if quick else (12, 512)
    options.loader_batch = 32
    options.read_shards = 4 if quick else 8  # whole-shard reads per store and round
    options.loader_warmup, options.loader_batches = (2, 8) if quick else (4, 192)
    options.train_steps = 2 if quick else 5
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.core.logs import setup_logging

    setup_logging()
    logging.getLogger("pipeline").setLevel(logging.WARNING)  # the jobs' INFO lines would bury the progress lines
    logging.getLogger("distributed").setLevel(logging.ERROR)
    for name in ("botocore", "aiobotocore"):  # "Found credentials in environment variables", once per process
        logging.getLogger(name).setLevel(logging.WARNING)
    bench_encode = _load_bench_encode()
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp_name:
        tmp = Path(tmp_name)
        with s3_server(tmp / "s3-root") as server:
            rows, facts = encode_rows(options, tmp, bench_encode, server)

            local = write_latent_dataset(tmp / "latents", options.latent_shards, options.per_shard)
            url = f"s3://{BUCKET}/latents"
            upload_s, upload_bytes = upload_dataset(local, url)
            shard_mb = (local / "shard-000000.tar").stat().st_size / 1e6
            datasets = {"local": str(local), "s3": url}
            _progress(f"latent dataset: {upload_bytes / 1e6:.0f} MB, uploaded in {upload_s:.1f} s")
            rows += loader_rows(options, datasets, shard_mb, server)
            if not options.no_train:
                rows += train_rows(options, datasets, tmp)
            rows += request_rows(options, datasets)
    elapsed = time.perf_counter() - began
    load_after = os.getloadavg()[0]

    import s3fs
    import torch

    command = " ".join([Path(sys.executable).name, "bench/object_storage.py", *sys.argv[1:]])
    header = (
        f"### Local disk vs S3 (`{command}`)\n\n"
        f"Machine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}; "
        f"{datetime.date.today().isoformat()}; torch {torch.__version__}, s3fs {s3fs.__version__}, {server.version} "
        f"(`rclone serve s3` on 127.0.0.1, its directory on the same disk). {options.rounds} interleaved round(s), "
        f"median (min-max). Load average {load_before:.1f} before / {load_after:.1f} after; total {elapsed:.0f} s. "
        f"Latent dataset: {options.latent_shards} shards x {options.per_shard} latents of 32x32x4 "
        f"({upload_bytes / 1e6:.0f} MB; its upload, one PUT per file, took {upload_s:.1f} s = "
        f"{upload_bytes / 1e6 / upload_s:.0f} MB/s)."
    )
    notes = []
    for vae_name, fact in facts.items():
        notes.append(
            f"- S3 requests of one encode job ({vae_name}, {fact['shards']} shards): {fact['encode_requests']}; of "
            f"its resume check: {fact['resume_requests']}, i.e. {fact['resume_request_count'] / fact['shards']:.1f} "
            "per shard."
        )
    text = table(rows, header) + "\n\n" + "\n".join(notes) + "\n\n" + reading(rows, facts)
    print("\n" + text)
    options.report.write_text(text + "\n")
    print(f"\n(written to {options.report})")


if __name__ == "__main__":
    main()
