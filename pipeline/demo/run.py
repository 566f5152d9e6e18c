"""The embedded default: every stage of diffit-pipe, offline, on data the project makes itself.

`diffit-pipe demo` runs, in order, with the same functions the stage commands call:

 1. `synth`   a procedural, class-labelled image dataset (10 classes of coloured shapes and patterns, 64 px,
              deterministic from the seed) written as an image folder in the ImageNet layout, plus held-out
              images;
 2. `pack`    raw image shards (64 px for the VAE and the FID reference, 16 px for the image-space model);
    `vae fit` a small AutoencoderKL fitted on the 64 px shards (no SD VAE can be downloaded here; `--vae` uses
              a local one instead), saved with `save_pretrained`;
    `encode`  Dask -> that VAE -> latent shards;
 3. `train`   a small class-conditional latent DiffiT on the latents and a tiny class-conditional image-space
              DiffiT U-Net on the 16 px shards, both with EDM preconditioning and CFG label dropout, with
              checkpoints, EMA and tensorboard logs; `export` both;
 4. `evaluate` samples of both models into zarr stores, a labelled grid PNG per model, FID / IS / precision /
              recall when Inception weights are given (`--inception-weights`), otherwise a line saying they
              were skipped and why; and always the class consistency of both models' samples, measured by
              a small classifier trained on the procedural images, reported next to that classifier's accuracy
              on held-out real images (so the number means something), and their shape consistency, measured
              the same way by a classifier that sees grayscale only (every class has its own colour, so the
              first one accepts a blob of the right colour; this one needs the right shape or texture).
 5. `report` one self-contained HTML page per training run (curves, sample grids over training, evaluation,
              lineage with hashes), `report_latent.html` and `report_image.html`;
    and a summary of where everything is.

Every step is resumable: run the same command again after an interruption and finished steps are skipped by
the stages' own resume logic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import write_text_atomic
from pipeline.core.errors import JobFailedError
from pipeline.core.grids import image_grid, labelled_tiles, write_png

logger = logging.getLogger("pipeline.demo")


@dataclass
class DemoSettings:
    """Sizes of one demo run. The default run takes about 14 minutes on 2 CPU cores and its samples show the
    classes (docs/benchmarks.md, "demo"); `quick()` is the ~3 minute variant the test suite runs, which checks
    that every step works, not how good the samples are."""

    # The procedural dataset (`procedural.py`): enough images per class for both tiny models to learn every
    # class, and held-out images to measure the classifiers on real images they never saw.
    classes: int = 10
    per_class: int = 300
    holdout_per_class: int = 30
    resolution: int = 64
    # The image-space model (DiffiT-UNet-Tiny) works at its native 16 px: an image costs 3.5x less than at
    # 32 px, so its share of the time budget gives it enough steps for clean samples. Its shapes stay coarser
    # than the latent model's (a cross is 8 px wide with 3 px bars).
    image_model_resolution: int = 16
    # Both classifiers judge every model's samples resized to this size, at which all classes stay distinct.
    classifier_resolution: int = 32
    # The domain VAE: three stages (16, 32, 64 channels), so /4: 64 px images -> 16x16x4 latents. An /8 VAE
    # cannot reproduce these shapes and colours after a few CPU minutes of fitting. 1300 steps give the VAE
    # about 2.5 minutes and leave the rest of the budget to the latent model; its decoder tolerates the error
    # left in sampled latents (N(0, 0.5^2) noise on held-out latents of unit std leaves the classifier's
    # accuracy on the decoded images unchanged). The time budget is a safety net that a quiet machine never
    # reaches: when it cuts in, the VAE depends on machine load instead of the seed.
    vae_steps: int = 1300
    vae_time_budget_s: float = 270.0
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64)
    # The latent model: DiffiT-Tiny/2 at width 128 and depth 4 (64 tokens of 16x16 latents), trained with EDM
    # preconditioning (`_train_config`): a model this small and this briefly trained predicts ADM's epsilon too
    # imprecisely at low SNR, while EDM's c_skip / c_out make it predict the clean latent there. 2800 steps at
    # batch 32 are what the time budget allows; they give samples whose shapes the grayscale classifier
    # recognises (shape consistency in docs/benchmarks.md).
    latent_model_kwargs: tuple[tuple[str, int], ...] = (("depth", 4), ("hidden_size", 128), ("num_heads", 4))
    latent_steps: int = 2800
    latent_batch: int = 32
    # The image model, class-conditional like the latent one (an unconditional model of the same size and
    # training time spreads its samples over a few classes only).
    image_steps: int = 1800
    image_batch: int = 32
    # Enough for both yardstick classifiers to be right on ~all held-out real images (docs/benchmarks.md).
    classifier_steps: int = 300
    # Evaluation: samples per model, and sampling steps per sample (the 16 px image model needs fewer).
    num_samples: int = 100
    sample_steps: int = 32
    image_sample_steps: int = 18
    # Classifier-free guidance scale of both models, near the paper's 4.6 for ImageNet-256: it pushes these
    # briefly trained models to draw each class's shape rather than a blob of the class colour, and much
    # stronger guidance distorts the samples.
    guidance_scale: float = 4.0
    # Dask worker processes of pack and encode: one per core of the 2-core machine the demo is sized for.
    encode_workers: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            per_class=24,
            holdout_per_class=6,
            vae_steps=100,
            vae_time_budget_s=60.0,
            latent_steps=60,
            latent_batch=16,
            image_steps=40,
            image_batch=16,
            classifier_steps=60,
            num_samples=20,
            sample_steps=10,
            image_sample_steps=6,
            encode_workers=2,
        )


# Where each output of a run lives, relative to its directory.
PATHS = {
    "images": "data/images",
    "raw_shards": "data/raw-{resolution}",
    "raw_shards_small": "data/raw-{image_model_resolution}",
    "vae": "models/vae",
    "latent_shards": "data/latents",
    "latent_run": "runs/latent",
    "image_run": "runs/image",
    "latent_model": "models/latent",
    "image_model": "models/image",
    "classifier": "models/classifier",
    "shape_classifier": "models/shape_classifier",
    "latent_eval": "eval/latent",
    "image_eval": "eval/image",
}
# The two yardsticks: the colour classifier says whether a sample shows its class at all, but every class has
# its own colour, so it accepts a blob of the right colour. The grayscale one sees luminance only and must tell
# circle from square from diamond by shape (and the textures by their pattern).
CLASSIFIERS = (("classifier", False), ("shape_classifier", True))
INCEPTION_SKIPPED = (
    "[demo] FID / IS / precision / recall skipped: no Inception weights (pass --inception-weights "
    "PATH to weights-inception-2015-12-05-6726825d.pth; they cannot be downloaded here)"
)


@dataclass
class DemoRun:
    """One demo run: its settings, where everything goes, and the wall time of each step."""

    out: Path
    settings: DemoSettings
    log: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)
    paths: dict[str, Path] = field(init=False)

    def __post_init__(self) -> None:
        sizes = asdict(self.settings)
        self.paths = {name: self.out / sub.format(**sizes) for name, sub in PATHS.items()}

    @property
    def train_images(self) -> Path:
        return self.paths["images"] / "train"

    @property
    def holdout_images(self) -> Path:
        return self.paths["images"] / "holdout"

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Log a step and record its wall time."""
        self.log(f"[demo] {name} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 1)
        self.log(f"[demo] {name} done in {self.timings[name]:.1f} s")


def _train_config(kind: str, settings: DemoSettings, latent_size: int | None) -> dict[str, Any]:
    """Configuration of one demo training run, in the same schema as the presets in `manifests/`."""
    steps = settings.latent_steps if kind == "latent" else settings.image_steps
    # Every 20 steps, and at least 20 records per run so that the report's curves have a shape (`--quick`).
    log_every = min(20, max(steps // 20, 1))
    common_train = {"mixed_precision": "no", "seed": settings.seed, "log_every": log_every, "tracker": "tensorboard"}
    # Four sample grids over training, side by side in the report.
    sample_every = max(steps // 4, 1)
    # Both models are class-conditional with EDM preconditioning and CFG label dropout (see DemoSettings).
    edm = {"type": "edm", "learn_sigma": False, "sigma_data": 0.5}
    data = {"resampled": True, "shuffle_buffer": 500, "num_workers": 1, "hflip": True, "label_dropout": 0.1}
    if kind == "latent":
        return {
            "model": {
                "name": "DiffiT-Tiny/2",
                "num_classes": None,
                "input_size": latent_size,
                "kwargs": dict(settings.latent_model_kwargs),
            },
            # The VAE's scaling_factor gives the latents unit std, so sigma_data is 1 (EDM's 0.5 is the std of
            # images in [-1, 1]). P_mean 0.3 (EDM: -1.2, i.e. -0.5 relative to this data) so that training covers
            # sigma > 2, where the sampler forms the shapes: half of the Heun steps from sigma_max 80 are there,
            # and EDM's lognormal would train there 16% of the time, too little for a run this short to learn
            # shapes from pure noise.
            "diffusion": {**edm, "sigma_data": 1.0, "P_mean": 0.3},
            # Decoding a latent batch costs ~12 ms; in a loader process it competes with the two training
            # threads for the 2 cores, in the main process it does not (~10% faster steps).
            "data": {**data, "num_workers": 0},
            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0},
            "ema": {"decay": 0.995},
            "train": {**common_train, "global_batch_size": settings.latent_batch, "max_steps": steps},
            "checkpoint": {"every": max(steps // 3, 1), "keep": 2},
            "sample": {
                "every": sample_every,
                "count": 16,
                "sampler": "edm-heun",
                "steps": 18,
                "guidance_scale": 1.0,
            },
        }
    return {
        "model": {"name": "DiffiT-UNet-Tiny", "num_classes": None, "input_size": settings.image_model_resolution},
        # P_mean -0.4 (EDM: -1.2) for the same reason as the latent model: more training at the high noise
        # levels where shapes form; higher values leave visible speckle in the samples.
        "diffusion": {**edm, "P_mean": -0.4},
        "data": data,
        "optim": {"name": "adam", "lr": 2e-3, "weight_decay": 0.0},
        "ema": {"decay": 0.995},
        "train": {**common_train, "global_batch_size": settings.image_batch, "max_steps": steps},
        "checkpoint": {"every": max(steps // 3, 1), "keep": 2},
        "sample": {"every": sample_every, "count": 16, "sampler": "edm-heun", "steps": 18, "guidance_scale": 1.0},
    }


def _write_yaml(path: Path, mapping: dict[str, Any]) -> Path:
    """The training configuration as YAML, validated by the train stage before it is written."""
    from pipeline.train import config_from_dict, dump_config

    return write_text_atomic(path, dump_config(config_from_dict(mapping, str(path))))


def _run_shards(
    source: Path, out: Path, kind: str, resolution: int, settings: DemoSettings, vae: str | None = None
) -> dict[str, Any]:
    """Pack (`kind` "images") or encode ("latents") `source` with the encode stage; returns the manifest."""
    from pipeline.encode import EncodeOptions, run_encode

    config = EncodeOptions(
        source=str(source),
        out=str(out),
        kind=kind,
        resolution=resolution,
        shard_size=max(settings.classes * settings.per_class // 4, 16),
        batch_size=32,
        workers=settings.encode_workers,
        progress=False,
        command=f"diffit-pipe demo ({kind} {resolution}px)",
        overwrite=True,  # the demo owns its work directory: a re-run with other settings rebuilds the shards
        # Each latent sample keeps its crop (a small PNG): REPA's targets (`repa_demo.yaml`) need the images.
        keep_images=kind == "latents",
    )
    if vae is not None:
        config.vae = vae
    result = run_encode(config)
    if not result.ok:
        raise JobFailedError(
            f"{out}: the demo's {kind} job did not finish cleanly: failed shards "
            f"{result.failed_shards}, failure rate {result.failure_rate:.4f}"
        )
    return result.manifest


def _grid_png(images: np.ndarray, labels: np.ndarray, names: list[str], path: Path, columns: int) -> Path:
    """A grid of uint8 HWC images, each enlarged to at least 64 px with its class name written under it."""
    scale = max(1, 64 // images.shape[2])
    captions = [names[int(label)][:10] if label >= 0 else "" for label in labels]
    return write_png(path, image_grid(labelled_tiles(images, captions, scale), columns=columns, pad_value=255))


def _read_store(eval_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The samples and their class labels from an evaluation's zarr store (complete chunks only)."""
    from pipeline.evaluate import STORE_NAME, SampleStore

    store = SampleStore.open(eval_dir / STORE_NAME, mode="r")
    store.require_complete()
    return store.read_images(0, store.layout.num_samples), store.read_labels()


# ----------------------------------------------------------------------------------------------------------------
# The steps, in order.


def synth_step(demo: DemoRun) -> list[str]:
    """1: the procedural dataset (train and holdout splits); returns the class names."""
    from pipeline.demo.procedural import generate_dataset

    settings = demo.settings
    with demo.step("1/5 synth: procedural dataset"):
        dataset = generate_dataset(
            demo.paths["images"],
            num_classes=settings.classes,
            per_class=settings.per_class,
            resolution=settings.resolution,
            seed=settings.seed,
            holdout_per_class=settings.holdout_per_class,
            progress=False,
        )
    return dataset["classes"]


def pack_step(demo: DemoRun) -> dict[str, Any]:
    """2: raw image shards at the dataset's resolution and at the image model's; returns the first manifest."""
    settings, paths = demo.settings, demo.paths
    with demo.step("2/5 pack: raw image shards"):
        manifest = _run_shards(demo.train_images, paths["raw_shards"], "images", settings.resolution, settings)
        _run_shards(demo.train_images, paths["raw_shards_small"], "images", settings.image_model_resolution, settings)
    return manifest


def vae_step(demo: DemoRun, vae: str | None) -> tuple[str, dict[str, Any]]:
    """2: the domain VAE fitted on the raw shards, unless `vae` is given; returns (VAE, fit report)."""
    from pipeline.demo.vae_fit import fit_vae
    from pipeline.demo.vae_fit_config import VAEFitConfig

    if vae is not None:
        return vae, {"skipped": True, "reason": f"--vae {vae} given"}
    settings = demo.settings
    config = VAEFitConfig(
        resolution=settings.resolution,
        block_out_channels=settings.vae_block_out_channels,
        steps=settings.vae_steps,
        seed=settings.seed,
    )
    with demo.step("2/5 vae fit: domain AutoencoderKL"):
        report = fit_vae(
            demo.paths["raw_shards"],
            demo.paths["vae"],
            config,
            holdout=demo.holdout_images,
            time_budget=settings.vae_time_budget_s,
            progress=False,
        )
    return str(demo.paths["vae"]), report


def encode_step(demo: DemoRun, vae: str) -> dict[str, Any]:
    """2: the training images through the VAE into latent shards; returns their manifest."""
    with demo.step("2/5 encode: Dask -> VAE -> latent shards"):
        return _run_shards(
            demo.train_images, demo.paths["latent_shards"], "latents", demo.settings.resolution, demo.settings, vae=vae
        )


def train_step(demo: DemoRun, kind: str, data_key: str, latent_size: int) -> dict[str, Any]:
    """3: train the `kind` model ("latent" or "image") on the shards `data_key` and export it."""
    from pipeline.train import TrainOptions, export_checkpoint
    from pipeline.train import run_train as train_run

    run_dir = demo.paths[f"{kind}_run"]
    with demo.step(f"3/5 train: {kind} DiffiT"):
        config_path = _write_yaml(
            demo.out / "configs" / f"{kind}.yaml", _train_config(kind, demo.settings, latent_size)
        )
        record = train_run(
            TrainOptions(run_dir=run_dir, config_path=config_path, data_dir=demo.paths[data_key], resume="auto")
        )
        export_checkpoint(run_dir, demo.paths[f"{kind}_model"])
    return record


def _vae_reconstructions(vae: str, holdout: Path, settings: DemoSettings) -> tuple[np.ndarray, np.ndarray]:
    """The held-out images through the VAE and back, with their labels: the best latent samples can look."""
    import torch

    from pipeline.core.vae import load_vae, resolve_vae
    from pipeline.demo.labelled_images import load_labelled_images
    from pipeline.demo.vae_fit_math import reconstruct

    held = load_labelled_images(holdout, settings.resolution, seed=settings.seed)
    with torch.no_grad():
        return reconstruct(load_vae(resolve_vae(vae).local_path), held.images), held.labels


def classifiers_step(demo: DemoRun, vae: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """4: both yardstick classifiers, trained on the procedural images; returns (summary entries, models)."""
    from pipeline.demo import classifier as classifier_lib

    settings, entries, models = demo.settings, {}, {}
    with demo.step("4/5 classifiers: class + shape (grey)"):
        reconstructions, reconstruction_labels = _vae_reconstructions(vae, demo.holdout_images, settings)
        for name, grayscale in CLASSIFIERS:
            report = classifier_lib.train_classifier(
                demo.train_images,
                demo.paths[name],
                resolution=settings.classifier_resolution,
                steps=settings.classifier_steps,
                seed=settings.seed,
                holdout=demo.holdout_images,
                progress=False,
                grayscale=grayscale,
            )
            models[name] = classifier_lib.load_classifier(demo.paths[name])
            entries[name] = {
                "train_acc": report.get("train_acc"),
                "holdout_acc": report.get("holdout_acc"),
                "holdout_acc_on_vae_reconstructions": classifier_lib.class_consistency(
                    models[name], reconstructions, reconstruction_labels
                ),
                "grayscale": report.get("grayscale"),
            }
    return entries, models


def _evaluate_options(demo: DemoRun, kind: str, inception_weights: str | None):
    """How the evaluate stage samples and scores the `kind` model."""
    from pipeline.evaluate import EvaluateOptions

    settings = demo.settings
    sampling = {
        "steps": settings.sample_steps if kind == "latent" else settings.image_sample_steps,
        "guidance_scale": settings.guidance_scale,
        "guidance_schedule": "constant",
        "guidance_channels": "all",
    }
    reference = demo.paths["raw_shards" if kind == "latent" else "raw_shards_small"]
    return EvaluateOptions(
        model_dir=demo.paths[f"{kind}_model"],
        out_dir=demo.paths[f"{kind}_eval"],
        num_samples=settings.num_samples,
        sampling=sampling,
        seed=settings.seed,
        batch_size=20,
        reference=reference if inception_weights else None,
        inception_weights=Path(inception_weights) if inception_weights else None,
        metrics=("fid", "is", "prc") if inception_weights else (),
        kid_subset_size=min(1000, settings.num_samples),
    )


def evaluate_step(
    demo: DemoRun, kind: str, classifiers: dict[str, Any], class_names: list[str], inception_weights: str | None
) -> dict[str, Any]:
    """4: sample the `kind` model into a zarr store, write its labelled grid, and measure its samples."""
    from pipeline.demo.classifier import class_consistency, predict
    from pipeline.evaluate import run_evaluate

    eval_dir = demo.paths[f"{kind}_eval"]
    with demo.step(f"4/5 evaluate: {kind} model"):
        record = run_evaluate(_evaluate_options(demo, kind, inception_weights))
        samples, labels = _read_store(eval_dir)
        grid = _grid_png(samples[:40], labels[:40], class_names, demo.out / f"samples_{kind}.png", columns=10)
        predictions = predict(classifiers["classifier"], samples)
        return {
            "metrics_json": str(eval_dir / "metrics.json"),
            "grid": str(grid),
            "num_samples": int(len(samples)),
            "reportable_metrics": record.get("metrics", {}),
            "plumbing_only_metrics": record.get("plumbing_only_metrics", {}),
            "class_consistency": float(np.mean(predictions == labels)),
            "shape_consistency": class_consistency(classifiers["shape_classifier"], samples, labels),
            # How the samples spread over the classes (a mode-collapse check).
            "predicted_class_histogram": np.bincount(predictions, minlength=demo.settings.classes).tolist(),
        }


def report_step(demo: DemoRun) -> dict[str, str]:
    """5: one HTML report per training run, linking its export and evaluation; returns their paths."""
    from pipeline.report import ReportOptions, run_report

    reports = {}
    with demo.step("5/5 report: one page per run"):
        for kind in ("latent", "image"):
            reports[kind] = str(
                run_report(
                    ReportOptions(
                        demo.paths[f"{kind}_run"],
                        demo.out / f"report_{kind}.html",
                        exports=[demo.paths[f"{kind}_model"]],
                        evaluations=[demo.paths[f"{kind}_eval"]],
                    )
                )
            )
    return reports


@dataclass
class DemoOptions:
    """What `diffit-pipe demo` is asked to do."""

    out: str | Path = "runs/demo"
    quick: bool = False  # `DemoSettings.quick()`: about 3 minutes instead of 15
    vae: str | None = None  # a diffusers AutoencoderKL to encode with instead of fitting the demo's own
    inception_weights: str | None = None  # FID / IS / precision-recall need them; skipped without
    settings: DemoSettings | None = None  # sizes of the run; None: by `quick`


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole pipeline under `options.out`; returns (and writes to `out/summary.json`) what every step
    produced."""
    out, quick, vae, inception_weights = options.out, options.quick, options.vae, options.inception_weights
    settings = options.settings or (DemoSettings.quick() if quick else DemoSettings())
    demo = DemoRun(Path(out).resolve(), settings, log)
    demo.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    class_names = synth_step(demo)
    raw_manifest = pack_step(demo)
    vae, vae_report = vae_step(demo, vae)
    latent_manifest = encode_step(demo, vae)
    latent_size = int(latent_manifest["latent_size"])
    runs = {
        kind: train_step(demo, kind, data_key, latent_size)
        for kind, data_key in (("latent", "latent_shards"), ("image", "raw_shards_small"))
    }
    classifier_entries, classifiers = classifiers_step(demo, vae)
    if not inception_weights:
        log(INCEPTION_SKIPPED)
    evaluations = {
        kind: evaluate_step(demo, kind, classifiers, class_names, inception_weights) for kind in ("latent", "image")
    }
    reports = report_step(demo)

    summary = {
        "out": str(demo.out),
        "quick": quick,
        "settings": asdict(settings),
        "timings_s": demo.timings,
        "total_s": round(time.perf_counter() - started, 1),
        "paths": {k: str(v) for k, v in demo.paths.items()},
        "dataset": {"classes": class_names, "train_images": raw_manifest["counts"]["written"]},
        "vae": vae_report,
        "latent_size": latent_size,
        "latent_shards": latent_manifest["counts"],
        "training": runs,
        **classifier_entries,
        "evaluation": evaluations,
        "reports": reports,
        "inception_weights": inception_weights,
    }
    write_text_atomic(demo.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    log(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The table printed at the end of a demo run."""
    lines = ["", "diffit-pipe demo: summary", "-" * 60]
    lines.append(f"{'step':<42} {'seconds':>8}")
    for name, seconds in summary["timings_s"].items():
        lines.append(f"{name:<42} {seconds:>8.1f}")
    lines.append(f"{'total':<42} {summary['total_s']:>8.1f}")
    lines.append("-" * 60)
    for name, label in (("classifier", "class"), ("shape_classifier", "shape (grayscale)")):
        classifier = summary[name]
        lines.append(
            f"{label} classifier accuracy on held-out real images: {classifier['holdout_acc']:.3f}; on "
            f"their VAE reconstructions: {classifier['holdout_acc_on_vae_reconstructions']:.3f} (the best "
            f"{label.split()[0]} consistency latent samples can reach through this VAE)"
        )
    chance = 1 / len(summary["dataset"]["classes"])
    for kind, entry in summary["evaluation"].items():
        lines.append(
            f"{kind} model: class consistency of {entry['num_samples']} samples: "
            f"{entry['class_consistency']:.3f}, shape consistency {entry['shape_consistency']:.3f} "
            f"(chance {chance:.2f})"
        )
        counts = ", ".join(f"{label}: {count}" for label, count in enumerate(entry["predicted_class_histogram"]))
        lines.append(f"{kind} model: samples the classifier assigns to each class (class: count) {counts}")
        for name, value in entry["reportable_metrics"].items():
            lines.append(f"{kind} model: {name} = {value:.4g}")
        for name, value in entry["plumbing_only_metrics"].items():
            lines.append(f"{kind} model: {name} = {value:.4g} (PLUMBING-ONLY: non-official Inception weights)")
        lines.append(f"{kind} model: samples grid {entry['grid']}")
        lines.append(f"{kind} model: run report {summary['reports'][kind]}")
    lines.append(f"everything is under {summary['out']} (summary.json lists every path)")
    return "\n".join(lines)
