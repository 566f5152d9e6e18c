"""The Stable Diffusion VAE of the encode stage: resolving `--vae`, loading it once per worker, encoding crops.

`resolve_vae(spec)` runs in the driver before any work: a local directory (with `config.json` and
`diffusion_pytorch_model.safetensors`, or a full pipeline directory with a `vae/` folder) is checked and hashed;
a value that looks like a path but does not exist is refused without asking the hub; a hub id is looked up
through `huggingface_hub.snapshot_download` (cache first, offline aware) and an error explains how to pass a
local directory instead. Workers then load the resolved local directory with `get_vae`, a cached getter in this
importable module, so each worker process builds the VAE once (not once per task).

Devices: `pick_device("auto")` is this process's own GPU when CUDA is available (`process_gpu`: the GPU a
pinned worker was started with, or one claimed through a host-local lock file, so that N worker processes on one
host use N different GPUs), else the CPU; `set_torch_threads` limits the CPU threads of a worker.

Latents are stored unscaled: `encode_pixels` returns the posterior mean and std as the VAE computes them; the
trainer maps them to what the diffusion model sees with `diffit.latent_norm.LatentNorm` (the VAE's
`scaling_factor` and `shift_factor`, or the dataset's per-channel statistics), from the manifest.

Precision: with `--dtype fp16|bf16` the VAE runs in that dtype (on CUDA also in the channels-last memory format,
which the tensor-core convolution kernels want). The SD VAE is known to overflow fp16 on some images, which gives
NaN/inf latents; `encode_pixels` checks every batch and encodes a batch whose low-precision moments are not finite
or do not fit the fp16 range (latents are stored as float16) again with an fp32 copy of the same VAE, loaded only
when first needed and cached next to the low-precision one in this process (`fp32_retry_count` counts them).
On CPU nothing changes: contiguous (NCHW) tensors, and a fp32 VAE is never checked or retried.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import multiprocessing
import os
import re
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DTYPE_NAMES = ("fp32", "fp16", "bf16")

_VAE_CACHE: dict[tuple[str, str, str], Any] = {}
_VAE_CACHE_LOCK = threading.Lock()
_VAE_LOADS = 0  # how many times this process built a VAE (1 per worker when the cache works)
# Where each loaded VAE came from, (local_path, device), so that a low-precision one can find its fp32 twin.
_VAE_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FP32_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # twins of VAEs not built by `load_vae`
_FP32_RETRIES = 0  # batches this process encoded again in fp32 after a non-finite low-precision result
_FP32_RETRY_LOCK = threading.Lock()
FP16_MAX = 65504.0  # largest finite float16: latents are stored as float16, so larger values are overflows
PINNED_GPU_ENV = "DIFFIT_PIPE_PINNED_GPU"  # set (to 1) in a worker started with its own GPU listed first
_GPU_CLAIM: list[Any] = []  # [index, lock file] of the GPU this process uses, once chosen (`process_gpu`)
_GPU_CLAIM_LOCK = threading.Lock()  # a worker with several Dask threads chooses once
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


class VAEError(InputError):
    """`--vae` cannot be used: missing directory, not an AutoencoderKL, no safetensors weights, or hub unreachable."""


@dataclass(frozen=True)
class VAESpec:
    """A resolved VAE: where its files are and what identifies them."""

    id: str  # what the user passed: a hub id or a path
    local_path: str  # directory holding config.json + diffusion_pytorch_model.safetensors
    source: str  # "hub" or "local"
    revision: str | None  # hub commit hash (None for a local directory)
    path_hash: str  # sha256 over config.json and the weights file
    config: dict[str, Any]

    @property
    def scaling_factor(self) -> float:
        """Factor the diffusion model multiplies latents by (0.18215 for the SD VAE)."""
        return float(self.config.get("scaling_factor", 0.18215))

    @property
    def shift_factor(self) -> float:
        """What the VAE's latents are shifted by before scaling (SD3 / FLUX VAEs; 0 for the SD VAE, whose config
        holds None or nothing)."""
        return float(self.config.get("shift_factor") or 0.0)

    @property
    def latent_channels(self) -> int:
        """Channels of a latent (4 for the SD VAE)."""
        return int(self.config.get("latent_channels", 4))

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the encoder: 2 per down block after the first (8 for the SD VAE)."""
        return 2 ** (len(self.config.get("block_out_channels", (64,))) - 1)

    def manifest_entry(self, dtype: str) -> dict[str, Any]:
        """The `vae` entry of a latent manifest."""
        return {
            "id": self.id,
            "source": self.source,
            "revision": self.revision,
            "path": self.local_path,
            "path_hash": self.path_hash,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "dtype": dtype,
            "convention": "unscaled",
        }


def _looks_like_path(spec: str) -> bool:
    """True for values that are meant as a local path (so they are never sent to the hub as a repo id)."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..") or "\\" in spec or spec.endswith("/"):
        return True
    parts = spec.split("/")
    if len(parts) > 2:  # hub ids are "name" or "owner/name"
        return True
    # "models/vae" where ./models exists is a path that lacks its last part, not a hub repo called models/vae.
    return len(parts) == 2 and Path(parts[0]).is_dir()


def _hash_files(directory: Path) -> str:
    """sha256 over the names and bytes of the files that define a VAE (`diffit.vae_loading.vae_path_hash`)."""
    from diffit.vae_loading import vae_path_hash

    return vae_path_hash(directory)


def _check_local_dir(directory: Path, spec: str) -> tuple[Path, dict[str, Any]]:
    """Find and check the AutoencoderKL files in `directory` (or `directory/vae`); returns (dir, config)."""
    if not (directory / "config.json").is_file() and (directory / "vae" / "config.json").is_file():
        directory = directory / "vae"  # a full Stable Diffusion pipeline directory
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise VAEError(
            f"--vae {spec}: {directory} has no config.json; pass the directory written by "
            "AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise VAEError(f"--vae {spec}: cannot read {config_path}: {error}") from error
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise VAEError(f"--vae {spec}: {config_path} describes a {class_name}, not an AutoencoderKL")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        found = sorted(p.name for p in directory.iterdir() if p.is_file())
        raise VAEError(
            f"--vae {spec}: {weights} is missing (found: {', '.join(found) or 'nothing'}); the VAE must be stored "
            "as safetensors (load it once and save_pretrained(dir, safe_serialization=True))"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="numpy") as handle:  # header only; numpy avoids importing torch
            if not list(handle.keys()):
                raise VAEError(f"--vae {spec}: {weights} holds no tensors")
    except VAEError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise VAEError(f"--vae {spec}: {weights} is not a readable safetensors file ({error})") from error
    return directory, config


def resolve_vae(spec: str, revision: str | None = None) -> VAESpec:
    """Turn `--vae` (hub id or local directory) into a checked VAESpec, before any work starts."""
    expanded = Path(os.path.expanduser(spec))
    if expanded.exists():
        if not expanded.is_dir():
            raise VAEError(
                f"--vae {spec}: {expanded} is a file; pass the directory that holds config.json and {WEIGHTS_NAME}"
            )
        directory, config = _check_local_dir(expanded.resolve(), spec)
        return VAESpec(
            id=spec,
            local_path=str(directory),
            source="local",
            revision=None,
            path_hash=_hash_files(directory),
            config=config,
        )
    if _looks_like_path(spec):
        raise VAEError(
            f"--vae {spec}: no such directory. Pass an existing local directory with config.json and {WEIGHTS_NAME} "
            "(e.g. the output of `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`), "
            "or a Hugging Face hub id such as stabilityai/sd-vae-ft-ema"
        )
    return _resolve_hub(spec, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> VAESpec:
    """Fetch (or find in the cache) the config and safetensors weights of a hub VAE."""
    from huggingface_hub import snapshot_download

    how_to = (
        f"To work without network access, download it once elsewhere "
        f"(`huggingface-cli download {repo_id} config.json {WEIGHTS_NAME} --local-dir DIR`), copy DIR here and pass "
        f"--vae DIR (a local path)."
    )
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", WEIGHTS_NAME])
    except Exception as error:  # offline, no cache, unknown repo, invalid id, network failures
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        where = (
            "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
            if offline
            else "the hub could not be reached or has no such repository"
        )
        raise VAEError(
            f"--vae {repo_id}: cannot load this VAE from the Hugging Face hub: {where} "
            f"({type(error).__name__}: {error}). {how_to}"
        ) from error
    directory, config = _check_local_dir(Path(snapshot), repo_id)
    return VAESpec(
        id=repo_id,
        local_path=str(directory),
        source="hub",
        revision=Path(snapshot).name,  # snapshot folders are named by commit hash
        path_hash=_hash_files(directory),
        config=config,
    )


def torch_dtype(name: str):
    """torch dtype for a `--dtype` name (fp32, fp16, bf16)."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise VAEError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return dtypes[name]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` entries (indices or UUIDs; [] without CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [entry.strip() for entry in listed.split(",") if entry.strip()] if listed is not None else []
    return entries[:count] if listed is not None else [str(index) for index in range(count)]


def claim_gpu(devices: list[str], lock_dir: str | os.PathLike | None = None) -> tuple[int, IO]:
    """Claim one of `devices` (this process's GPUs, in its order of preference) for the life of this process.

    The worker processes of one host choose among the same GPUs without knowing of each other, so each takes an
    exclusive lock on a host-local file per (GPU, round): round 0 of each GPU first, in order, then round 1
    (more processes than GPUs: they share evenly). The lock lasts as long as the returned open file, which the
    caller keeps; it is released when the process ends, however it ends. Returns (position in `devices`, file).
    """
    import fcntl

    directory = (
        Path(lock_dir) if lock_dir is not None else Path(tempfile.gettempdir()) / f"diffit-pipe-gpus-{os.getuid()}"
    )
    directory.mkdir(parents=True, exist_ok=True)
    for round_number in itertools.count():
        for position, device in enumerate(devices):
            handle = open(directory / f"gpu-{_UNSAFE_NAME_CHARS.sub('_', device)}-{round_number}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            return position, handle


def _device_ids(count: int) -> list[str]:
    """Stable names of the `count` visible GPUs for `claim_gpu`: their UUIDs, else the CUDA_VISIBLE_DEVICES entries."""
    import torch

    try:
        return [str(torch.cuda.get_device_properties(index).uuid) for index in range(count)]
    except (AttributeError, RuntimeError):
        ids = visible_gpus()
        return ids if len(ids) == count else [str(index) for index in range(count)]


def process_gpu() -> int:
    """The index of the visible GPU this process uses, chosen once per process.

    A worker started pinned (`DIFFIT_PIPE_PINNED_GPU`, by `PinnedGPUCluster`) or seeing a single GPU (dask-cuda
    workers, `CUDA_VISIBLE_DEVICES=i`) uses GPU 0 of what it sees. Otherwise several worker processes on one host
    see the same GPUs (`dask worker --nworkers 8`, or every task of a SLURM job given all the node's GPUs), and
    each claims its own with `claim_gpu`, its first visible GPU first (which, with dask-cuda's rotated lists, is
    its own).
    """
    import torch

    with _GPU_CLAIM_LOCK:
        if not _GPU_CLAIM:
            count = torch.cuda.device_count()
            if count <= 1 or os.environ.get(PINNED_GPU_ENV):
                _GPU_CLAIM.append(0)
            else:
                position, handle = claim_gpu(_device_ids(count))
                _GPU_CLAIM.extend([position, handle])
                logger.info("process %d uses GPU %d of %d", os.getpid(), position, count)
        return _GPU_CLAIM[0]


def pick_device(name: str = "auto") -> str:
    """The torch device: `auto` means this process's GPU when CUDA is available, else CPU; `cuda` without an
    index is this process's GPU (`process_gpu`), so the workers of one host spread over its GPUs."""
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        name = "cuda"
    if name == "cuda":
        index = process_gpu()
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return name


def _is_cuda(device) -> bool:
    """True for a CUDA device (a torch.device or a name such as "cuda:1")."""
    return str(device).startswith("cuda")


def check_vae_files(local_path: str) -> None:
    """Refuse, before diffusers builds a model from it, a VAE directory whose config.json is not a plausible
    AutoencoderKL (sizes bounded: a 1 KB file must not ask for millions of layers) or whose weights file is not
    well-formed safetensors of floating-point tensors (the header read, not the data): the pure check lives in
    `diffit.pipeline_check.check_vae_files` (so `diffit`'s pipeline applies it too), its refusal becomes a VAEError."""
    from diffit.config_check import InvalidModelFileError
    from diffit.pipeline_check import check_vae_files as check_files

    try:
        check_files(local_path)
    except InvalidModelFileError as error:
        raise VAEError(str(error)) from None


def load_vae(local_path: str, dtype: str = "fp32", device: str = "cpu"):
    """Load an AutoencoderKL from a resolved local directory (safetensors only), in eval mode, no gradients: the
    one VAE loader, `diffit.vae_loading.load_vae_folder` (config.json and the weights' header checked before
    diffusers builds anything; a refusal becomes a VAEError), plus this stage's dtype and device.

    On CUDA its weights use the channels-last memory format (cuDNN's fast layout for fp16/bf16 convolutions);
    on CPU they stay contiguous, so CPU latents are the same bytes as before.
    """
    import torch

    from diffit.config_check import InvalidModelFileError
    from diffit.vae_loading import load_vae_folder

    try:
        vae = load_vae_folder(local_path, torch_dtype(dtype))
    except InvalidModelFileError as error:
        raise VAEError(str(error)) from None
    vae = vae.to(device)
    if _is_cuda(device):
        vae = vae.to(memory_format=torch.channels_last)
    _VAE_SOURCES[vae] = (local_path, device)
    return vae


def get_vae(local_path: str, dtype: str = "fp32", device: str = "cpu"):
    """The VAE for (path, dtype, device), loaded at most once per process (the per-worker cache)."""
    global _VAE_LOADS
    key = (local_path, dtype, device)
    with _VAE_CACHE_LOCK:
        if key not in _VAE_CACHE:
            logger.info("loading VAE %s (%s, %s) in process %d", local_path, dtype, device, os.getpid())
            _VAE_CACHE[key] = load_vae(local_path, dtype, device)
            _VAE_LOADS += 1
            if multiprocessing.parent_process() is not None:
                # In a worker process: move the many objects torch/diffusers created at import into the permanent
                # generation. Later collections skip them, and the worker exits in ~0.5 s instead of ~3 s.
                gc.freeze()
        return _VAE_CACHE[key]


def vae_load_count() -> int:
    """How many times this process loaded a VAE (the tests check it is once per worker, not once per task)."""
    return _VAE_LOADS


def set_torch_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads in this process (so N workers do not oversubscribe the cores)."""
    if threads is None:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pixels_to_tensor(pixels: np.ndarray):
    """uint8 [N, H, W, 3] → float32 [N, 3, H, W] in [-1, 1] (the VAE's input range)."""
    import torch

    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    return images / 127.5 - 1.0


def _encoder_input(vae, pixels: np.ndarray):
    """The batch of crops and their horizontal flips (2N) on the VAE's device, in its dtype and memory format.

    On CUDA the uint8 pixels are copied (a quarter of the float bytes, from pinned memory) and converted on the
    GPU, in channels-last; the arithmetic is the same fp32 `x / 127.5 - 1` as on the CPU.
    """
    import torch

    parameter = next(vae.parameters())
    if not _is_cuda(parameter.device):
        images = pixels_to_tensor(pixels)
        both = torch.cat([images, images.flip(-1)])
        return both.to(device=parameter.device, dtype=parameter.dtype)
    host = torch.from_numpy(np.ascontiguousarray(pixels)).pin_memory()
    images = host.to(parameter.device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    both = torch.cat([images, images.flip(-1)]).to(parameter.dtype)
    return both.contiguous(memory_format=torch.channels_last)


def _encode_moments(vae, pixels: np.ndarray):
    """The encoder's posterior for crops + flips: (posterior, moments) on the VAE's device, in its dtype."""
    import torch

    with torch.inference_mode():
        posterior = vae.encode(_encoder_input(vae, pixels)).latent_dist
    return posterior, posterior.parameters


def _fits_float16(moments) -> bool:
    """True when every raw moment (mean and log-variance, before diffusers clamps the log-variance) is finite and
    within the float16 range: NaN and ±inf compare False, so one reduction catches NaN, inf and overflow."""
    import torch

    with torch.inference_mode():
        return bool((moments.float().abs() <= FP16_MAX).all())


def fp32_twin(vae):
    """An fp32 copy of a low-precision VAE on the same device, loaded only when first needed.

    A VAE from `load_vae`/`get_vae` gets the fp32 VAE of the same files through the per-process cache (so the
    retried batch is exactly what an fp32 encode gives); any other module gets an fp32 copy of its own weights.
    """
    source = _VAE_SOURCES.get(vae)
    if source is not None:
        local_path, device = source
        return get_vae(local_path, "fp32", device)
    with _FP32_RETRY_LOCK:
        if vae not in _FP32_COPIES:
            import copy

            _FP32_COPIES[vae] = copy.deepcopy(vae).float()
        return _FP32_COPIES[vae]


def fp32_retry_count() -> int:
    """How many batches this process encoded again in fp32 because the low-precision result was not finite."""
    return _FP32_RETRIES


def _count_retry(dtype, batch: int) -> int:
    """Count one fp32 retry and say so (with the running count, which the job may also record)."""
    global _FP32_RETRIES
    with _FP32_RETRY_LOCK:
        _FP32_RETRIES += 1
        retries = _FP32_RETRIES
    logger.warning(
        "VAE encode in %s gave NaN/inf or values outside the float16 range for a batch of %d crops; encoded it "
        "again in fp32 (%d batch(es) retried in fp32 in process %d so far)",
        str(dtype).removeprefix("torch."),
        batch,
        retries,
        os.getpid(),
    )
    return retries


def encode_pixels(vae, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and std of crops and their horizontal flips: float32 [N, 2, C, h, w] each (unscaled).

    The N crops and their N flips go through the encoder as one batch of 2N. A low-precision (fp16/bf16) VAE's
    batch whose moments are not finite or overflow float16 is encoded again by its fp32 twin (`fp32_twin`), so a
    retried batch is exactly the fp32 result; `fp32_retry_count` counts these batches (per process).
    """
    mean, std, _ = encode_pixels_checked(vae, pixels)
    return mean, std


def encode_pixels_checked(vae, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """`encode_pixels`, plus whether this batch was retried in fp32 (for a caller that counts per task: the
    process-wide `fp32_retry_count` mixes the tasks that a worker's threads run at the same time)."""
    import torch

    posterior, moments = _encode_moments(vae, pixels)
    retried = moments.dtype != torch.float32 and not _fits_float16(moments)
    if retried:
        _count_retry(moments.dtype, len(pixels))
        posterior, moments = _encode_moments(fp32_twin(vae), pixels)
    with torch.inference_mode():
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    count = len(pixels)
    shape = (2, count) + tuple(mean.shape[1:])
    mean = mean.reshape(shape).transpose(0, 1).contiguous().numpy()
    std = std.reshape(shape).transpose(0, 1).contiguous().numpy()
    return mean, std, retried


def decode_latents(vae, latents: np.ndarray) -> np.ndarray:
    """Decode unscaled latents [N, C, h, w] to uint8 images [N, H, W, 3] (for previews)."""
    import torch

    parameter = next(vae.parameters())
    with torch.inference_mode():
        z = torch.from_numpy(np.asarray(latents, dtype=np.float32)).to(device=parameter.device, dtype=parameter.dtype)
        images = vae.decode(z).sample.float().clamp(-1, 1)
    images = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return images
