"""The fp16/bf16 encode path of `pipeline.core.vae.encode_pixels`: a batch whose low-precision moments are NaN/inf or
overflow float16 is encoded again in fp32 (exactly the fp32 result, counted and logged); a finite batch is not.

Runs on CPU with the tiny random AutoencoderKL: one copy has its first convolution scaled by 1e5, which overflows
fp16 (inf after conv_in, NaN after the group norm) while fp32 stays finite, the real failure of the SD VAE.
bf16 does not overflow that way, so its tests inject the bad values with a forward hook on the low-precision
model only.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from pipeline.core import vae as vae_module
from pipeline.core.vae import (
    encode_pixels,
    encode_pixels_checked,
    fp32_retry_count,
    get_vae,
    load_vae,
    vae_load_count,
)
from tests.support.encode_fixtures import TINY_VAE_CONFIG, save_tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    """(normal, overflowing) tiny VAE directories: the second overflows fp16 in its first convolution."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("vae-numerics")
    normal = save_tiny_vae(root / "normal")
    torch.manual_seed(0)
    model = AutoencoderKL(**TINY_VAE_CONFIG)
    with torch.no_grad():
        model.encoder.conv_in.weight.mul_(1e5)
    model.save_pretrained(root / "overflow", safe_serialization=True)
    return str(normal), str(root / "overflow")


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)


def test_fp16_overflow_is_retried_in_fp32_exactly(vae_dirs, pixels, caplog):
    _, overflow = vae_dirs
    vae16 = get_vae(overflow, "fp16", "cpu")
    _, moments = vae_module._encode_moments(vae16, pixels)
    assert not torch.isfinite(moments).all()  # the fp16 forward itself really fails
    reference = encode_pixels(load_vae(overflow, "fp32", "cpu"), pixels)  # a separate fp32-only VAE
    assert np.isfinite(reference[0]).all() and np.isfinite(reference[1]).all()

    before, loads = fp32_retry_count(), vae_load_count()
    with caplog.at_level(logging.WARNING, logger="pipeline.core.vae"):
        mean, std = encode_pixels(vae16, pixels)
    assert fp32_retry_count() == before + 1
    assert vae_load_count() == loads + 1  # the fp32 twin, loaded on first need ...
    assert np.array_equal(mean, reference[0]) and np.array_equal(std, reference[1])
    assert mean.dtype == np.float32 and mean.shape == (3, 2, 4, 4, 4)
    assert f"{before + 1} batch(es) retried in fp32" in caplog.text and "float16" in caplog.text

    assert encode_pixels_checked(vae16, pixels)[2] is True
    assert fp32_retry_count() == before + 2 and vae_load_count() == loads + 1  # ... and cached next to the fp16 one
    assert get_vae(overflow, "fp32", "cpu") is vae_module.fp32_twin(vae16)


def test_finite_fp16_batch_is_not_retried(vae_dirs, pixels):
    normal, _ = vae_dirs
    vae16 = get_vae(normal, "fp16", "cpu")
    before, loads = fp32_retry_count(), vae_load_count()
    mean, std, retried = encode_pixels_checked(vae16, pixels)
    assert not retried and fp32_retry_count() == before and vae_load_count() == loads  # no retry, no fp32 VAE loaded
    mean32, std32 = encode_pixels(load_vae(normal, "fp32", "cpu"), pixels)
    assert not np.array_equal(mean, mean32)  # it is the fp16 result ...
    np.testing.assert_allclose(mean, mean32, atol=2e-2)  # ... and a close one
    np.testing.assert_allclose(std, std32, rtol=2e-2)


def _spoil_quant_conv(vae, how: str):
    """Make the low-precision forward of `vae` bad after quant_conv: inf in one value, or everything x 1e6
    (finite in bf16 but beyond the float16 range the latents are stored in)."""

    def hook(module, inputs, output):
        if output.dtype == torch.float32:
            return output
        if how == "inf":
            output = output.clone()
            output[0, 0, 0, 0] = float("inf")
            return output
        return output * 1e6

    return vae.quant_conv.register_forward_hook(hook)


@pytest.mark.parametrize("how", ["inf", "overflow"])
def test_bf16_bad_batch_is_retried_in_fp32_exactly(vae_dirs, pixels, how):
    normal, _ = vae_dirs
    vae_bf16 = load_vae(normal, "bf16", "cpu")  # not the cached one: the hook must not leak into other tests
    handle = _spoil_quant_conv(vae_bf16, how)
    try:
        before = fp32_retry_count()
        mean, std = encode_pixels(vae_bf16, pixels)
    finally:
        handle.remove()
    assert fp32_retry_count() == before + 1
    reference = encode_pixels(load_vae(normal, "fp32", "cpu"), pixels)
    assert np.array_equal(mean, reference[0]) and np.array_equal(std, reference[1])


def test_in_memory_vae_retries_with_an_fp32_copy_of_its_weights(pixels):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    model = AutoencoderKL(**TINY_VAE_CONFIG).eval().requires_grad_(False).to(torch.bfloat16)
    expected = encode_pixels(copy.deepcopy(model).float(), pixels)
    handle = _spoil_quant_conv(model, "inf")
    try:
        before = fp32_retry_count()
        mean, std = encode_pixels(model, pixels)
    finally:
        handle.remove()
    assert fp32_retry_count() == before + 1
    assert np.array_equal(mean, expected[0]) and np.array_equal(std, expected[1])
