"""What one optimizer step computes: the training loss, the learning-rate schedule and the EMA update.

`Objective` is the loss of one micro-batch: the ADM hybrid loss with learned Sigma for latent models (DiT),
EDM's loss with its EDM / VP / VE preconditioning (`diffusion.precond`) and optional augmentation
(`data.augment`) for image-space models, or the flow-matching loss. `learning_rate` ramps up and decays the base lr
by images seen (EDM's lr_rampup), `ema_decay` is DiT's fixed decay or EDM's half-life in images, and
`update_ema` moves the fp32 EMA copy towards the model.
"""

from __future__ import annotations

from pipeline.train.config import Config


def learning_rate(config: Config, images_seen: int) -> float:
    """Base lr, linearly ramped over `optim.warmup_kimg` thousand images (EDM's lr_rampup) and linearly decayed to 0
    over the last `optim.decay_fraction` of the run."""
    lr = config.optim.lr
    warmup = config.optim.warmup_kimg * 1000
    if warmup > 0:
        lr *= min(images_seen / warmup, 1.0)
    if config.optim.decay_fraction > 0:
        total = config.train.max_steps * config.train.global_batch_size
        decay_start = total * (1.0 - config.optim.decay_fraction)
        if images_seen > decay_start:
            lr *= max(total - images_seen, 0) / (total - decay_start)
    return lr


def ema_decay(config: Config, images_seen: int, batch_size: int) -> float:
    """EMA decay of this step: fixed (DiT) or from a half-life in images with optional ramp-up (EDM)."""
    if config.ema.halflife_kimg is None:
        return config.ema.decay
    halflife = config.ema.halflife_kimg * 1000
    if config.ema.rampup_ratio is not None:
        halflife = min(halflife, images_seen * config.ema.rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


def update_ema(ema_model, model, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model on fp32 copies, outside autocast and autograd (one foreach lerp:
    on CUDA a handful of kernels instead of one per parameter; on CPU the same per-tensor lerp as before)."""
    import torch

    with torch.no_grad():
        model_params = dict(model.named_parameters())
        ema_params = [param for _, param in ema_model.named_parameters()]
        targets = [model_params[name].detach().to(param.dtype) for name, param in ema_model.named_parameters()]
        if ema_params:
            torch._foreach_lerp_(ema_params, targets, 1.0 - decay)
        model_buffers = dict(model.named_buffers())
        for name, ema_buffer in ema_model.named_buffers():
            ema_buffer.copy_(model_buffers[name])


def augment_outside_autocast(pipe):
    """`pipe(images)` with autocast off: the step runs under bf16 autocast on GPUs, which would resample the images
    (convolutions, grid_sample) in bf16; EDM augments in float32."""
    import torch

    def augment(images):
        with torch.autocast(images.device.type, enabled=False):
            return pipe(images)

    return augment


class Objective:
    """The training loss of one micro-batch: ADM hybrid loss (latent), EDM's loss (image space; the preconditioning
    and loss of `diffusion.precond`, the images augmented as EDM's train.py does when `data.augment` > 0, the
    network told which augmentation by its augment labels), or the flow-matching velocity loss (either;
    per-sample mean squared error, averaged over the batch as SiT / REPA)."""

    def __init__(self, config: Config, null_class: int | None, device=None):
        self.config = config
        self.null_class = null_class
        self.augment_pipe = None  # EDM's augmentation (edm only, `data.augment` > 0)
        if config.diffusion.type == "adm":
            from diffit.diffusion import create_diffusion

            self.diffusion = create_diffusion(
                None,
                noise_schedule=config.diffusion.noise_schedule,
                learn_sigma=config.diffusion.learn_sigma,
                diffusion_steps=config.diffusion.diffusion_steps,
            )
            if device is not None and device.type == "cuda":
                from pipeline.train.performance import device_tables

                device_tables(self.diffusion, device)  # no host-to-device copy of a table at every step
        elif config.diffusion.type == "edm":
            from diffit.augment import edm_augment_pipe
            from diffit.edm import make_loss

            d = config.diffusion
            self.edm_loss = make_loss(d.precond, P_mean=d.P_mean, P_std=d.P_std, sigma_data=d.sigma_data)
            if config.data.augment > 0:
                self.augment_pipe = augment_outside_autocast(edm_augment_pipe(config.data.augment))

    def labels(self, class_labels):
        """Class labels for the network: None (unconditional) or with CFG label dropout to the null class."""
        from diffit.layers import drop_labels

        if self.null_class is None:
            return None
        return drop_labels(class_labels, self.null_class, self.config.data.label_dropout)

    def __call__(self, network, x, class_labels):
        import torch

        labels = self.labels(class_labels)
        if self.config.diffusion.type == "adm":
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
            kwargs = {"class_labels": labels} if labels is not None else None
            return self.diffusion.training_losses(network, x, t, model_kwargs=kwargs)["loss"].mean()
        if self.config.diffusion.type == "flow":
            from diffit.flow import sample_times, velocity_loss

            d = self.config.diffusion
            t = sample_times(x.shape[0], d.time_sampling, d.logit_mean, d.logit_std, d.time_shift, device=x.device)
            return velocity_loss(network, x, t.to(x.dtype), torch.randn_like(x), class_labels=labels).mean()
        from diffit.edm import make_precond

        precond = make_precond(self.config.diffusion.precond, network, sigma_data=self.config.diffusion.sigma_data)
        # EDM's reduction: sum over pixels, mean over the batch (training/training_loop.py).
        return self.edm_loss(precond, x, labels, augment_pipe=self.augment_pipe).sum() / x.shape[0]
