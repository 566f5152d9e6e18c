"""Seconds per FID evaluation during training (`pipeline.train.fid.FidEvaluator`), on this machine's CPU.

A tiny EDM U-Net at 8 px (EDM-Heun, 2 steps), a random-weight Inception file (plumbing only: the point is the
cost, not the value), a reference of 64 images; the test's 64-d feature layer and the full 2048-d pool layer;
three evaluations each (the first builds the Inception network and extracts / caches the reference features).

    python bench/fid_during_training.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    import torch
    from accelerate import Accelerator
    from eval_fixtures import make_random_inception_weights, smooth_images, write_npz_reference
    from train_fixtures import tiny_image_config

    import diffit
    from pipeline.train.config import config_from_dict
    from pipeline.train.fid import FidEvaluator

    class ImageData:
        """What FidEvaluator reads of the dataset: image-space data, no VAE."""

        kind = "images"
        manifest: dict = {}
        scaling_factor = 1.0

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-fid-"))
    weights = make_random_inception_weights(root / "inception.pth")
    reference = write_npz_reference(root / "reference.npz", smooth_images(64, size=8))
    accelerator = Accelerator(cpu=True)
    model = diffit.create_model("DiffiT-UNet-Tiny", img_resolution=8).eval()
    for layer in ("64", "2048"):
        for num_samples in (16, 64):
            config = tiny_image_config(model={"input_size": 8}, sample={"every": 0, "sampler": "edm-heun", "steps": 2})
            config["eval"] = {
                "every": 1,
                "num_samples": num_samples,
                "reference": str(reference),
                "inception_weights": str(weights),
                "feature_layer": layer,
                "batch_size": 32,
                "feature_batch_size": 32,
            }
            evaluator = FidEvaluator(config_from_dict(config), ImageData, accelerator)
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                evaluator.evaluate(model, 1)
                seconds.append(round(time.perf_counter() - start, 3))
            record = {"layer": layer, "num_samples": num_samples, "first_s": seconds[0], "next_s": seconds[1:]}
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
