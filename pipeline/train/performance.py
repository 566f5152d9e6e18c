"""The fast path of the training step, chosen by device: everything here is a no-op or off on CPU.

On CUDA: bf16 autocast (Accelerate's `mixed_precision`, "auto" = bf16 there), TF32 for the fp32 matmuls and
convolutions left (`train.tf32`), fused AdamW (`optim.fused`, on by default when every parameter is on a CUDA
device), `torch.compile` of the training network (`model.compile`, off until measured faster), channels-last
(`model.channels_last`, off: see its comment), pinned-memory batches copied without blocking (the loader), and no
host synchronisation inside a step: the loss and gradient norm stay on the device until a log, sample,
checkpoint or stop step reads them (`pipeline.train.progress`), and the diffusion schedule tables live on the
device (`device_tables`) so that indexing them copies nothing from the host.

What the logs report on top, per record: seconds per thousand images everywhere; on CUDA the peak memory
allocated since the previous record, and the model FLOPs utilisation (MFU) -- training FLOPs per image
(3 x the forward's multiply-adds counted by `diffit.models.count_flops`, x 2 FLOPs each) x images/s, over the
GPUs' dense bf16 peak from `PEAK_BF16_TFLOPS` (not reported for a GPU not in the table).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a piece of `torch.cuda.get_device_name()`; the first
# match wins, so the specific names come before the general ones.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, None when it is not in the table."""
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece in device_name:
            return tflops
    return None


def configure_cuda(tf32: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (the parts of a bf16-autocast step left in fp32)."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def use_fused(setting: bool | None, parameters: list) -> bool:
    """Fused AdamW: the setting when given, else on exactly when every parameter is on a CUDA device."""
    if setting is not None:
        return setting
    return bool(parameters) and all(p.is_cuda for p in parameters)


def device_tables(diffusion, device) -> Any:
    """The diffusion's schedule tables (float64 tensors) moved to `device`, so that looking up a timestep is a
    device-side gather rather than a host-to-device copy of the table (which blocks) at every step."""
    import torch

    for name, value in vars(diffusion).items():
        if isinstance(value, torch.Tensor):
            setattr(diffusion, name, value.to(device))
    return diffusion


def training_flops_per_image(model_name: str, kwargs: dict[str, Any]) -> float:
    """FLOPs of one training image: 3 forwards' worth (forward + backward) x 2 FLOPs per multiply-add, from the
    model built on the meta device (no memory, no weights)."""
    import torch

    from diffit.models import count_flops, create_model

    with torch.device("meta"):
        model = create_model(model_name, **kwargs)
    return 3 * 2 * count_flops(model)["total"]


class DeviceStats:
    """Peak memory and MFU for the metrics records, on CUDA; nothing elsewhere."""

    def __init__(self, device, flops_per_image: float | None, world_size: int):
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self.peak_flops = None
        if self.cuda and flops_per_image is not None:
            name = torch.cuda.get_device_name(device)
            peak = peak_bf16_tflops(name)
            if peak is None:
                logger.info("MFU not reported: %s is not in the table of GPU peaks", name)
            else:
                self.peak_flops = peak * 1e12 * world_size
        self.flops_per_image = flops_per_image

    def record(self, images_per_s: float) -> dict[str, float]:
        """`peak_gpu_mem_gib` (since the previous record) and `mfu`, where known; starts the next peak window."""
        if not self.cuda:
            return {}
        import torch

        values = {"peak_gpu_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
        torch.cuda.reset_peak_memory_stats(self.device)
        if self.peak_flops is not None:
            values["mfu"] = model_flops_utilisation(images_per_s, self.flops_per_image, self.peak_flops)
        return values


def model_flops_utilisation(images_per_s: float, flops_per_image: float, peak_flops: float) -> float:
    """MFU: the model's training FLOP/s at this rate over the peak FLOP/s of all the GPUs."""
    return images_per_s * flops_per_image / peak_flops
