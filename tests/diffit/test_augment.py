"""EDM's augmentation pipeline (diffit/augment.py) against NVlabs/edm's own outputs under the same seeds.

The reference (tests/support/edm_reference/augment.safetensors, made by EDM's code: see the README there) holds,
per configuration, the input images, the seed, and EDM's augmented images and labels: EDM's CIFAR-10 setting
(p = 0.12), the same operations always on, the integer blits with every colour operation, and single-channel
images; and EDM's constructor signature.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import diffit
from diffit.augment import AugmentPipe

REFERENCE = Path(__file__).resolve().parents[1] / "support" / "edm_reference" / "augment.safetensors"
CASES = ("cifar10", "geometric", "color", "gray")
CIFAR10 = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), "pt") as handle:
        meta = json.loads(handle.metadata()["reference"])
    return meta, load_file(str(REFERENCE))


@pytest.mark.parametrize("case", CASES)
def test_outputs_are_edms_under_the_same_seed(reference, case):
    meta, tensors = reference
    pipe = AugmentPipe(**meta[case]["kwargs"])
    torch.manual_seed(meta[case]["seed"])
    images, labels = pipe(tensors[f"{case}/images"])
    torch.testing.assert_close(images, tensors[f"{case}/out_images"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(labels, tensors[f"{case}/out_labels"], rtol=0, atol=1e-6)
    assert labels.shape[1] == pipe.label_dim
    # The next draw is the one after EDM's last: the pipe consumed exactly EDM's random stream.
    torch.manual_seed(meta[case]["seed"])
    pipe(tensors[f"{case}/images"])
    after = torch.rand(4)
    torch.manual_seed(meta[case]["seed"])
    pipe(tensors[f"{case}/images"].clone())
    assert torch.equal(torch.rand(4), after)


def test_cifar10_setting_has_edms_augment_dim(reference):
    assert reference[0]["cifar10"]["kwargs"] == CIFAR10
    assert AugmentPipe(**CIFAR10).label_dim == 9
    for name in ("DDPM++-CIFAR10", "NCSN++-CIFAR10"):
        assert diffit.models.resolve_model_kwargs(name)["augment_dim"] == 9
    # Every image is x-flipped with probability 1/2 (xflip 1e8 x p 0.12 >= 1): the first label is 0 or 1.
    torch.manual_seed(0)
    _, labels = AugmentPipe(**CIFAR10)(torch.randn(256, 3, 8, 8))
    assert set(labels[:, 0].tolist()) == {0.0, 1.0} and 0.3 < labels[:, 0].mean() < 0.7


def test_constructor_takes_edms_arguments_with_edms_defaults(reference):
    ours = list(inspect.signature(AugmentPipe.__init__).parameters.values())[1:]
    assert [[p.name, p.default] for p in ours] == reference[0]["signature"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(CIFAR10, p=0),
        dict(p=0, xflip=1, yflip=1, rotate_int=1, translate_int=1),
        dict(p=0, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1),
    ],
    ids=["cifar10", "blits", "color"],
)
def test_p_zero_leaves_images_unchanged_with_zero_labels(kwargs):
    torch.manual_seed(0)
    images = torch.randn(5, 3, 32, 32)
    out, labels = AugmentPipe(**kwargs)(images)
    assert labels.shape == (5, AugmentPipe(**kwargs).label_dim) and not labels.any()
    if any(kwargs.get(op) for op in ("scale", "rotate_frac", "aniso", "translate_frac")):
        # EDM still resamples (pad, sym6 up, identity grid_sample, sym6 down): the identity up to rounding.
        torch.testing.assert_close(out, images, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(out, images, rtol=0, atol=1e-6)


def test_no_operation_returns_the_images_and_no_labels():
    images = torch.randn(2, 3, 8, 8)
    out, labels = AugmentPipe()(images)
    assert out is images and labels.shape == (2, 0)


def test_colour_needs_rgb_or_single_channel_images():
    with pytest.raises(ValueError, match="RGB"):
        AugmentPipe(brightness=1)(torch.randn(1, 2, 8, 8))
