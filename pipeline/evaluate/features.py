"""Inception-v3 features for the metrics: torch-fidelity's port of the TensorFlow graph the ADM evaluator uses,
plus the spatial features of sFID, extracted through a DataLoader (workers, pinned memory) on the GPU when there
is one, with a progress bar.

sFID (Nash et al. 2021, as the ADM evaluator computes it) uses the output of `mixed_6/conv` of the 2015-12-05
TensorFlow Inception graph, first 7 channels, flattened: 7 x 17 x 17 = 2023 values per image. In torch-fidelity's
port that output is `Mixed_6d.branch1x1` (its `util_convert_inception_weights.py` maps the TensorFlow tensors
`mixed_6/conv/conv2d_params` and `mixed_6/conv/batchnorm` onto `Mixed_6d.branch1x1.conv` / `.bn`; the TensorFlow
op `mixed_6/conv` is that block's ReLU, as `BasicConv2d.forward` ends with it). TensorFlow is channels-last: the
evaluator slices `[..., :7]` of an NHWC tensor and reshapes, so the 2023 values are ordered (row, column,
channel); `spatial_features` permutes the NCHW output to match, so that statistics stored by the evaluator
(`mu_s`, `sigma_s` of a reference batch) line up element by element.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

SFID_LAYER = "mixed_6_conv"  # the name of the sFID features in layer lists, caches and metrics.json
SFID_TENSORFLOW_NAME = "mixed_6/conv"
SFID_CHANNELS = 7
SFID_DIM = SFID_CHANNELS * 17 * 17
# torch-fidelity's forward returns as soon as its requested layers are computed: one of these (all computed after
# Mixed_6d) keeps it running through the sFID layer.
_LAYERS_AFTER_MIXED_6D = ("768", "2048", "logits_unbiased", "logits")


def spatial_features(branch_output: torch.Tensor) -> torch.Tensor:
    """`mixed_6/conv` output [N, 192, 17, 17] (NCHW) -> the evaluator's sFID vector [N, 2023] in NHWC order."""
    return branch_output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(branch_output.shape[0], -1).float()


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's Inception-v3 extractor, returning {layer: features}, with the sFID layer available.

    `layers` may name any of torch-fidelity's layers and `SFID_LAYER`; the spatial features are taken by a
    forward hook on `Mixed_6d.branch1x1` during the same forward pass as the others.
    """

    def __init__(self, base: torch.nn.Module, layers: Sequence[str]):
        super().__init__()
        self.base = base
        self.layers = list(dict.fromkeys(layers))
        self._spatial: torch.Tensor | None = None
        if SFID_LAYER in self.layers:
            base.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = spatial_features(output)

    def get_requested_features_list(self) -> list[str]:
        return list(self.layers)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = dict(zip(self.base.get_requested_features_list(), self.base(images)))
        features = {layer: outputs[layer] for layer in self.layers if layer != SFID_LAYER}
        if SFID_LAYER in self.layers:
            features[SFID_LAYER], self._spatial = self._spatial, None
        return features


def base_layers(layers: Sequence[str]) -> list[str]:
    """torch-fidelity layers to request for `layers` (one that runs past Mixed_6d added when only sFID needs it)."""
    chosen = sorted({layer for layer in layers if layer != SFID_LAYER})
    if SFID_LAYER in layers and not set(chosen) & set(_LAYERS_AFTER_MIXED_6D):
        chosen.append("768")
    return chosen


def run_extractor(extractor: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: features} of one batch, from an `InceptionFeatures` or any torch-fidelity extractor (tuples)."""
    outputs = extractor(images)
    if isinstance(outputs, dict):
        return outputs
    return dict(zip(extractor.get_requested_features_list(), outputs))


def extractor_device(extractor: torch.nn.Module) -> torch.device:
    parameter = next(extractor.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def iterate_features(
    dataset: Dataset,
    extractor: torch.nn.Module,
    batch_size: int,
    workers: int = 0,
    description: str = "features",
    progress: bool = True,
    bar=None,
) -> Iterator[dict[str, torch.Tensor]]:
    """{layer: features on the extractor's device} batch by batch, in dataset order, with a progress bar (its
    own, or `bar` when the caller shows one over several datasets)."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    device = extractor_device(extractor)
    loader = DataLoader(
        dataset,
        batch_size=max(1, min(batch_size, len(dataset))),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    own = bar is None
    context = tqdm(total=len(dataset), desc=description, unit="img", disable=not progress) if own else nullcontext(bar)
    with context as shown:
        for batch in loader:
            # no_grad around the forward only: grad mode is thread state, a generator suspended inside a
            # no_grad block would leave it off for its caller.
            with torch.no_grad():
                features = run_extractor(extractor, batch.to(device, non_blocking=True))
            yield features
            shown.update(int(batch.shape[0]))


def extract_all(
    dataset: Dataset,
    extractor: torch.nn.Module,
    batch_size: int,
    workers: int = 0,
    description: str = "features",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Every image's features, concatenated on the CPU (float32)."""
    if len(dataset) == 0:
        raise ValueError("cannot extract features of an empty set of images")
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in iterate_features(dataset, extractor, batch_size, workers, description, progress):
        for layer, values in batch.items():
            parts.setdefault(layer, []).append(values.float().cpu())
    return {layer: torch.cat(values) for layer, values in parts.items()}
