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
 5. a summary of where everything is.

Every step is resumable: run the same command again after an interruption and finished steps are skipped by
the stages' own resume logic.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .atomic import write_text_atomic

logger = logging.getLogger("pipeline.demo")


@dataclass
class DemoSettings:
    """Sizes of one demo run. `quick()` is the ~3 minute variant used by the test suite."""

    classes: int = 10
    per_class: int = 300
    holdout_per_class: int = 30
    resolution: int = 64
    # DiffiT-UNet-Tiny at its native 16 px. At 32 px the same model in the same ~160 s (800 steps at batch 16)
    # left visible noise in its samples and shapes as blobs (class consistency 0.71); at 16 px it is 3.5x faster
    # per image and 1500-1800 steps at batch 32 give clean samples (class consistency 0.99-1.00). At 16 px its
    # shapes stay rougher than the latent model's (a cross is 8 px wide with 3 px bars).
    image_model_resolution: int = 16
    # The consistency classifier sees every model's samples resized to this resolution (shapes stay distinct).
    classifier_resolution: int = 32
    # A /4 VAE (16x16x4 latents at 64 px) reaches ~27 dB held-out PSNR in 1800 steps (~3 minutes on 2 cores),
    # where an /8 one stays near 20 dB with visibly wrong colours. 1300 steps (cosine schedule compressed) buys
    # the latent model ~60 s. Its decoder tolerates latent noise: adding N(0, 0.5^2) to held-out latents (unit
    # std) leaves the classifier's accuracy on the decoded images unchanged. The time budget is only a safety
    # net: when it cuts in, the result depends on machine load instead of the seed.
    vae_steps: int = 1300
    vae_time_budget_s: float = 270.0
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64)
    # The latent model uses EDM preconditioning, not the paper's ADM epsilon-prediction: a model this small
    # trained this briefly predicts epsilon too imprecisely at low SNR (DDIM from pure noise overshot the data
    # std 2-5x; class consistency 0.22), while EDM's c_out/c_skip make it predict the clean latent there.
    # Class consistency of 100 samples vs training steps (width 128 x depth 4, batch 32): 0.71 at 1200, 0.78 at
    # 2000, 0.95 at 3000 (dataset version 1). What made the shape classes shapes instead of blobs of the right
    # colour was not more steps but training at the noise levels where the sampler forms them (P_mean in
    # `_train_config`) and near-centred objects (`procedural.random_centre`). Tried at 1200 steps without gain:
    # lr 2e-3 (0.65), batch 64 for the same images (0.64), a linear lr decay over the last 30% (0.72), patch 4
    # for 3000 steps in the same time (0.68, blocky shapes); width 64 x depth 2 reached 0.74 after 3000 steps.
    latent_model_kwargs: tuple[tuple[str, int], ...] = (("depth", 4), ("hidden_size", 128), ("num_heads", 4))
    latent_steps: int = 2800
    latent_batch: int = 32
    # Class-conditional: unconditional training collapsed onto two classes in the same time.
    image_steps: int = 1800
    image_batch: int = 32
    classifier_steps: int = 300
    num_samples: int = 100
    sample_steps: int = 32
    image_sample_steps: int = 18
    # The paper samples ImageNet-256 with guidance 4.6. Here, on the same trained models (100 samples, shape /
    # class consistency): latent 0.66 / 0.78 at 1.0, 0.74 / 0.93 at 2.0, 0.80 / 0.93 at 4.0, 0.72 / 0.89 at
    # 6.0; image 0.56 / 0.78, 0.68 / 0.94, 0.71 / 0.99 (dataset version 1, EDM's P_mean).
    cfg_scale: float = 4.0
    encode_workers: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(per_class=24, holdout_per_class=6, vae_steps=100, vae_time_budget_s=60.0, latent_steps=60,
                   latent_batch=16, image_steps=40, image_batch=16, classifier_steps=60, num_samples=20,
                   sample_steps=10, image_sample_steps=6, encode_workers=2)


def _step(name: str, log: Callable[[str], None], timings: dict[str, float]):
    """Context manager that logs a step and records its wall time."""

    class _Timer:
        def __enter__(self):
            log(f"[demo] {name} ...")
            self.start = time.perf_counter()
            return self

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)
            if exc[0] is None:
                log(f"[demo] {name} done in {timings[name]:.1f} s")
            return False

    return _Timer()


def _train_config(kind: str, settings: DemoSettings, latent_size: int | None) -> dict[str, Any]:
    """Configuration of one demo training run, in the same schema as the presets in `manifests/`."""
    common_train = {"mixed_precision": "no", "seed": settings.seed, "log_every": 20, "tracker": "tensorboard"}
    # Both models are class-conditional with EDM preconditioning and CFG label dropout (see DemoSettings).
    edm = {"type": "edm", "learn_sigma": False, "sigma_data": 0.5}
    data = {"resampled": True, "shuffle_buffer": 500, "num_workers": 1, "hflip": True, "label_dropout": 0.1}
    if kind == "latent":
        steps = settings.latent_steps
        return {
            "model": {"name": "DiffiT-Tiny/2", "num_classes": None, "input_size": latent_size,
                      "kwargs": dict(settings.latent_model_kwargs)},
            # The VAE's scaling_factor gives the latents unit std, so sigma_data is 1 (EDM's 0.5 is the std of
            # images in [-1, 1]). P_mean 0.3 instead of EDM's -1.2 (-0.5 relative to this data): half of the
            # Heun steps from sigma_max 80 are at sigma > 2, where shapes form, but EDM's lognormal trains there
            # 16% of the time; after this short run the denoiser then answered pure noise with another class's
            # blob (a red disc for the orange cross). Shape / class consistency of 100 samples: 0.74 / 0.91 at
            # -0.5, 0.96 / 0.98 at 0.3, 0.91 / 0.99 at 0.8.
            "diffusion": {**edm, "sigma_data": 1.0, "P_mean": 0.3},
            # Decoding a latent batch costs ~12 ms; in a loader process it competes with the two training
            # threads for the 2 cores, in the main process it does not (~10% faster steps measured here).
            "data": {**data, "num_workers": 0},
            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0},
            "ema": {"decay": 0.995},
            "train": {**common_train, "global_batch_size": settings.latent_batch, "max_steps": steps},
            "checkpoint": {"every": max(steps // 3, 1), "keep": 2},
            "sample": {"every": max(steps // 2, 1), "count": 16, "sampler": "edm-heun", "steps": 18,
                       "guidance_scale": 1.0},
        }
    steps = settings.image_steps
    return {
        "model": {"name": "DiffiT-UNet-Tiny", "num_classes": None, "input_size": settings.image_model_resolution},
        # P_mean -0.4 instead of EDM's -1.2 for the same reason as the latent model (shape / class consistency
        # 0.80 / 0.99 at -1.2, 0.86 / 1.00 at -0.4; 0.91 / 1.00 at 0.0 but with visible speckle).
        "diffusion": {**edm, "P_mean": -0.4},
        "data": data,
        "optim": {"name": "adam", "lr": 2e-3, "weight_decay": 0.0},
        "ema": {"decay": 0.995},
        "train": {**common_train, "global_batch_size": settings.image_batch, "max_steps": steps},
        "checkpoint": {"every": max(steps // 3, 1), "keep": 2},
        "sample": {"every": max(steps // 2, 1), "count": 16, "sampler": "edm-heun", "steps": 18,
                   "guidance_scale": 1.0},
    }


def _write_yaml(path: Path, mapping: dict[str, Any]) -> Path:
    from .config import config_from_dict, dump_config

    config = config_from_dict(mapping, str(path))  # validated before it is written
    return write_text_atomic(path, dump_config(config))


def _run_shards(source: Path, out: Path, kind: str, resolution: int, settings: DemoSettings,
                vae: str | None = None) -> dict[str, Any]:
    from .encode import JobConfig, JobError, run_job

    config = JobConfig(source=str(source), out=str(out), kind=kind, resolution=resolution,
                       shard_size=max(settings.classes * settings.per_class // 4, 16),
                       batch_size=32, workers=settings.encode_workers, progress=False,
                       command=f"diffit-pipe demo ({kind} {resolution}px)")
    if vae is not None:
        config.vae = vae
    result = run_job(config)
    if not result.ok:
        raise JobError(f"{out}: the demo's {kind} job did not finish cleanly: failed shards "
                       f"{result.failed_shards}, failure rate {result.failure_rate:.4f}")
    return result.manifest


def _grid_png(images: np.ndarray, labels: np.ndarray, names: list[str] | None, path: Path, columns: int) -> Path:
    """A grid of uint8 HWC images with each image's class name written under it."""
    from PIL import Image, ImageDraw

    count, height, width = images.shape[:3]
    scale = max(1, 64 // width)
    cell_w, cell_h = width * scale, height * scale + 12
    rows = (count + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(count):
        tile = Image.fromarray(images[i]).resize((width * scale, height * scale), Image.NEAREST)
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        canvas.paste(tile, (x, y))
        if names is not None and labels[i] >= 0:
            draw.text((x + 1, y + height * scale), names[int(labels[i])][:10], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path


def _read_store(eval_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    import zarr

    from .evaluate import STORE_NAME

    group = zarr.open_group(str(eval_dir / STORE_NAME), mode="r")
    return np.asarray(group["samples"][:]), np.asarray(group["labels"][:])


def _vae_reconstructions(vae: str, holdout: Path, settings: DemoSettings) -> tuple[np.ndarray, np.ndarray]:
    """The held-out images through the VAE and back, with their labels: the best latent samples can look."""
    import torch

    from .procedural import load_labelled_images
    from .vae import load_vae, resolve_vae
    from .vae_fit import reconstruct

    held = load_labelled_images(holdout, settings.resolution, seed=settings.seed)
    with torch.no_grad():
        return reconstruct(load_vae(resolve_vae(vae).local_path), held.images), held.labels


def run_demo(out: str | Path = "runs/demo", quick: bool = False, vae: str | None = None,
             inception_weights: str | None = None, settings: DemoSettings | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole pipeline under `out`; returns (and writes to `out/summary.json`) what every step produced."""
    from . import classifier as classifier_lib
    from .evaluate import EvaluateOptions, SamplingOptions, evaluate
    from .export import export_checkpoint
    from .procedural import generate_dataset
    from .train import TrainArgs, run as train_run
    from .vae_fit import fit_vae

    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    paths = {name: out / sub for name, sub in {
        "images": "data/images", "raw_shards": f"data/raw-{settings.resolution}",
        "raw_shards_small": f"data/raw-{settings.image_model_resolution}", "vae": "models/vae",
        "latent_shards": "data/latents", "latent_run": "runs/latent", "image_run": "runs/image",
        "latent_model": "models/latent", "image_model": "models/image", "classifier": "models/classifier",
        "shape_classifier": "models/shape_classifier",
        "latent_eval": "eval/latent", "image_eval": "eval/image"}.items()}
    started = time.perf_counter()

    with _step("1/5 synth: procedural dataset", log, timings):
        dataset = generate_dataset(paths["images"], num_classes=settings.classes, per_class=settings.per_class,
                                   resolution=settings.resolution, seed=settings.seed,
                                   holdout_per_class=settings.holdout_per_class, progress=False)
    class_names = dataset["classes"]
    train_images, holdout_images = paths["images"] / "train", paths["images"] / "holdout"

    with _step("2/5 pack: raw image shards", log, timings):
        raw_manifest = _run_shards(train_images, paths["raw_shards"], "images", settings.resolution, settings)
        _run_shards(train_images, paths["raw_shards_small"], "images", settings.image_model_resolution, settings)
    if vae is None:
        with _step("2/5 vae fit: domain AutoencoderKL", log, timings):
            vae_report = fit_vae(paths["raw_shards"], paths["vae"], resolution=settings.resolution,
                                 block_out_channels=settings.vae_block_out_channels, steps=settings.vae_steps,
                                 time_budget_s=settings.vae_time_budget_s, seed=settings.seed, progress=False,
                                 holdout=holdout_images)
        vae = str(paths["vae"])
    else:
        vae_report = {"skipped": True, "reason": f"--vae {vae} given"}
    with _step("2/5 encode: Dask -> VAE -> latent shards", log, timings):
        latent_manifest = _run_shards(train_images, paths["latent_shards"], "latents", settings.resolution,
                                      settings, vae=vae)
    latent_size = int(latent_manifest["latent_size"])

    runs = {}
    for kind, data_key in (("latent", "latent_shards"), ("image", "raw_shards_small")):
        with _step(f"3/5 train: {kind} DiffiT", log, timings):
            config_path = _write_yaml(out / "configs" / f"{kind}.yaml", _train_config(kind, settings, latent_size))
            runs[kind] = train_run(TrainArgs(run_dir=paths[f"{kind}_run"], config_path=config_path,
                                             data_dir=paths[data_key], resume="auto"))
            export_checkpoint(paths[f"{kind}_run"], paths[f"{kind}_model"])

    # Two yardsticks: the colour classifier says whether a sample shows its class at all; every class has its
    # own colour, so it accepts a blob of the right colour. The grayscale one sees luminance only and must tell
    # circle from square from diamond by shape (and the textures by their pattern).
    classifier_reports, classifiers, ceilings = {}, {}, {}
    with _step("4/5 classifiers: class + shape (grey)", log, timings):
        reconstructions, reconstruction_labels = _vae_reconstructions(vae, holdout_images, settings)
        for name, grayscale in (("classifier", False), ("shape_classifier", True)):
            classifier_reports[name] = classifier_lib.train_classifier(
                train_images, paths[name], resolution=settings.classifier_resolution,
                steps=settings.classifier_steps, seed=settings.seed, holdout=holdout_images, progress=False,
                grayscale=grayscale)
            classifiers[name] = classifier_lib.load_classifier(paths[name])
            ceilings[name] = classifier_lib.class_consistency(classifiers[name], reconstructions,
                                                              reconstruction_labels)

    metrics = ("fid", "is", "prc") if inception_weights else ()
    if not inception_weights:
        log("[demo] FID / IS / precision / recall skipped: no Inception weights (pass --inception-weights "
            "PATH to weights-inception-2015-12-05-6726825d.pth; they cannot be downloaded here)")
    evaluations = {}
    for kind, steps, reference in (("latent", settings.sample_steps, paths["raw_shards"]),
                                   ("image", settings.image_sample_steps, paths["raw_shards_small"])):
        with _step(f"4/5 evaluate: {kind} model", log, timings):
            sampling = SamplingOptions(steps=steps, seed=settings.seed, cfg_scale=settings.cfg_scale,
                                       cfg_schedule="constant", cfg_channels="all")
            options = EvaluateOptions(model_dir=paths[f"{kind}_model"], out_dir=paths[f"{kind}_eval"],
                                      num_samples=settings.num_samples, sampling=sampling, batch_size=20,
                                      reference=reference if metrics else None,
                                      inception_weights=Path(inception_weights) if inception_weights else None,
                                      metrics=metrics, kid_subset_size=min(1000, settings.num_samples))
            record = evaluate(options)
            samples, labels = _read_store(paths[f"{kind}_eval"])
            grid = _grid_png(samples[:40], labels[:40], class_names, out / f"samples_{kind}.png", columns=10)
            entry = {"metrics_json": str(paths[f"{kind}_eval"] / "metrics.json"), "grid": str(grid),
                     "num_samples": int(len(samples)), "reportable_metrics": record.get("metrics", {}),
                     "plumbing_only_metrics": record.get("plumbing_only_metrics", {})}
            predictions = classifier_lib.predict(classifiers["classifier"], samples)
            entry["class_consistency"] = float(np.mean(predictions == labels))
            entry["shape_consistency"] = classifier_lib.class_consistency(classifiers["shape_classifier"], samples,
                                                                          labels)
            # How the samples spread over the classes (a mode-collapse check).
            entry["predicted_class_histogram"] = np.bincount(predictions, minlength=settings.classes).tolist()
            evaluations[kind] = entry

    summary = {
        "out": str(out), "quick": quick, "settings": asdict(settings), "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1), "paths": {k: str(v) for k, v in paths.items()},
        "dataset": {"classes": class_names, "train_images": raw_manifest["counts"]["written"]},
        "vae": vae_report, "latent_size": latent_size, "latent_shards": latent_manifest["counts"],
        "training": runs,
        **{name: {"train_acc": report.get("train_acc"), "holdout_acc": report.get("holdout_acc"),
                  "holdout_acc_on_vae_reconstructions": ceilings[name], "grayscale": report.get("grayscale")}
           for name, report in classifier_reports.items()},
        "evaluation": evaluations, "inception_weights": inception_weights,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
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
        lines.append(f"{label} classifier accuracy on held-out real images: {classifier['holdout_acc']:.3f}; on "
                     f"their VAE reconstructions: {classifier['holdout_acc_on_vae_reconstructions']:.3f} (the best "
                     f"{label.split()[0]} consistency latent samples can reach through this VAE)")
    chance = 1 / len(summary["dataset"]["classes"])
    for kind, entry in summary["evaluation"].items():
        lines.append(f"{kind} model: class consistency of {entry['num_samples']} samples: "
                     f"{entry['class_consistency']:.3f}, shape consistency {entry['shape_consistency']:.3f} "
                     f"(chance {chance:.2f})")
        lines.append(f"{kind} model: predicted classes of samples {entry['predicted_class_histogram']}")
        for name, value in entry["reportable_metrics"].items():
            lines.append(f"{kind} model: {name} = {value:.4g}")
        for name, value in entry["plumbing_only_metrics"].items():
            lines.append(f"{kind} model: {name} = {value:.4g} (PLUMBING-ONLY: non-official Inception weights)")
        lines.append(f"{kind} model: samples grid {entry['grid']}")
    lines.append(f"everything is under {summary['out']} (summary.json lists every path)")
    return "\n".join(lines)
