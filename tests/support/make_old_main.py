"""Write the files an older main wrote (run directories, exports, an evaluate store, a study directory), kept as
test fixtures so every later main is tested on what users already have on disk.

Written by this script with the main of 2026-12-06 (commit f831b0e, whose tests/ was flat) into
tests/support/old_main/; to write them again, run it with that commit's code first on the path:

    git archive f831b0e | tar -x -C /tmp/old
    cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/old/tests python $REPO/tests/support/make_old_main.py OUT
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from train_fixtures import (
    tiny_image_config,
    tiny_latent_config,
    write_config,
    write_image_dataset,
    write_latent_dataset,
)

OUT = Path(sys.argv[1]).resolve()
WORK = OUT.parent / (OUT.name + "-work")
shutil.rmtree(OUT, ignore_errors=True)
shutil.rmtree(WORK, ignore_errors=True)
OUT.mkdir(parents=True)
WORK.mkdir(parents=True)


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "cli.main", *map(str, args)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=OUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[1:3])},
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)}\n{done.stdout}\n{done.stderr}")


# A class-conditional image-space EDM U-Net run (2 classes, 16 px), one checkpoint kept at step 4 of 6.
images = write_image_dataset(OUT / "image-data", num_samples=8, num_shards=1, resolution=16, num_classes=2)
image_config = tiny_image_config(
    train={"global_batch_size": 4, "max_steps": 4, "mixed_precision": "no", "log_every": 1, "tracker": "none"},
    checkpoint={"every": 2, "keep": 1},
    sample={"every": 2, "count": 2, "sampler": "edm-heun", "steps": 2, "guidance_scale": 1.5},
)
image_config["model"]["kwargs"] = {"channels": [16, 16], "blocks_per_stage": [1, 1], "num_heads": 2, "num_groups": 4}
write_config(OUT / "image.yaml", image_config)
cli("train", "--config", OUT / "image.yaml", "--data", images, "--run-dir", OUT / "image-run")
cli("export", OUT / "image-run", OUT / "image-export")

# The evaluate stage on that export: guided (old flag names), the store and metrics.json as written then.
cli(
    "evaluate",
    "--model",
    OUT / "image-export",
    "--out",
    OUT / "image-eval",
    "--num-samples",
    "4",
    "--batch-size",
    "2",
    "--steps",
    "2",
    "--cfg-scale",
    "1.5",
    "--cfg-channels",
    "all",
    "--metrics",
    "",
)

# A latent DiffiT-Tiny/2 ADM run (4 channels, 8x8 latents, 10 classes), checkpoint at step 3 of 6, and its export.
latents = write_latent_dataset(OUT / "latent-data", num_samples=8, num_shards=2)
latent_config = tiny_latent_config(
    train={
        "global_batch_size": 4,
        "max_steps": 3,
        "mixed_precision": "no",
        "log_every": 1,
        "tracker": "none",
        "seed": 0,
    }
)
write_config(OUT / "latent.yaml", latent_config)
cli("train", "--config", OUT / "latent.yaml", "--data", latents, "--run-dir", OUT / "latent-run")
cli("export", OUT / "latent-run", OUT / "latent-export")

# A random demo classifier (FD_demo features), as the study tests make it.
from pipeline.demo.classifier import ClassifierConfig, SmallCNN, save_classifier  # noqa: E402

torch.manual_seed(0)
save_classifier(SmallCNN(ClassifierConfig(num_classes=2, resolution=16, channels=(8, 16), groups=4)), OUT / "clf")

# The latent export as a DiffiTPipeline: a saved pipeline folder (model_index.json as written then) and guided
# latents sampled from it, with a tiny random VAE (the export names a hub VAE that cannot be downloaded here).
import numpy as np  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from diffit import DiffiTPipeline  # noqa: E402

torch.manual_seed(0)
blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
vae = AutoencoderKL(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, **blocks)
pipe = DiffiTPipeline.from_pretrained(OUT / "latent-export", vae=vae)
pipe.save_pretrained(OUT / "latent-pipeline")
latents = pipe(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=5, seeds=[0, 1], output_type="latent")
np.save(OUT / "latent-pipeline-samples.npy", latents.images.float().numpy())

# A study with an axis of guidance settings (old names), complete: plan.json, every unit's result, study.json.
write_config(OUT / "study-base.yaml", {**image_config, "checkpoint": {"every": 2, "keep": 2}})
(OUT / "study.yaml").write_text(
    "name: old-main\n"
    "base: study-base.yaml\n"
    "data: image-data\n"
    "seeds: [0, 1]\n"
    "set: {checkpoint.keep_every: 2}\n"
    "axes:\n"
    "  guidance:\n"
    "    s1: {evaluate.cfg_scale: 1.0}\n"
    "    s2: {evaluate.cfg_scale: 2.0, evaluate.cfg_channels: all}\n"
    "evaluate: {num_samples: 4, batch_size: 4, steps: 2, metrics: []}\n"
    "demo_metrics: {reference: image-data, classifier: clf}\n"
)
cli("study", "study.yaml", "--out", "study")
# Kept small: the latent run's checkpoints and the study's training checkpoints (the exported models stay).
shutil.rmtree(OUT / "latent-run")
for checkpoints in (OUT / "study" / "runs").glob("*/*/checkpoints"):
    shutil.rmtree(checkpoints)
shutil.rmtree(WORK)
print(json.dumps(sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*") if p.is_file()), indent=0))
