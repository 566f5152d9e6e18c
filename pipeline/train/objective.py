"""What one optimizer step computes: the training loss, the learning-rate schedule and the EMA update.

`Objective` is the loss of one micro-batch: the ADM hybrid loss with learned Sigma for latent models (DiT),
the EDM loss with EDM preconditioning for image-space models. `learning_rate` ramps up and decays the base lr
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


class Objective:
    """The training loss of one micro-batch: ADM hybrid loss (latent), EDM loss (image space), or the flow-matching
    velocity loss (either; per-sample mean squared error, averaged over the batch as SiT / REPA)."""

    def __init__(self, config: Config, null_class: int | None, device=None):
        self.config = config
        self.null_class = null_class
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
            from diffit.edm import EDMLoss

            self.edm_loss = EDMLoss(
                P_mean=config.diffusion.P_mean, P_std=config.diffusion.P_std, sigma_data=config.diffusion.sigma_data
            )

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
        from diffit.edm import EDMPrecond

        precond = EDMPrecond(network, sigma_data=self.config.diffusion.sigma_data)
        # EDM's reduction: sum over pixels, mean over the batch (training/training_loop.py).
        return self.edm_loss(precond, x, labels).sum() / x.shape[0]
