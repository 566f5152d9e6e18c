"""EDM's augmentation pipeline (Karras et al. 2022, Sec. 5 / App. F.2), as NVlabs/edm `training/augment.py`.

`AugmentPipe(p, ...)` takes EDM's arguments (names, defaults, meaning) and `pipe(images)` returns
`(augmented images, augment_labels)`; under one `torch.manual_seed` it makes the same random draws, in the same
order, as EDM's pipe, so it gives EDM's outputs. The labels are what a `diffit.songunet.SongUNet` with
`augment_dim` reads (EDM's "augmentation regularisation": the network is told which augmentation was applied,
and is sampled with zero labels, i.e. no augmentation, so that augmentations do not leak into samples).

EDM's CIFAR-10 setting (train.py `--augment=0.12`, augment_dim 9; `edm_augment_pipe(0.12)`):

    AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

which draws an x-flip for every image (probability 1e8 * 0.12, clipped by the comparison) and each of the other
operations with probability 0.12; the 9 labels are [xflip, yflip, log2-scale, cos(rot) - 1, sin(rot),
aniso * cos, aniso * sin, tx, ty] (zero where an operation was not drawn).

Every operation is off by default (probability multiplier 0) and its probability is `multiplier * p`:

* pixel blitting: `xflip`, `yflip`, `rotate_int` (multiples of 90 degrees), `translate_int` (integer shifts up to
  `translate_int_max` of the size, reflected at the border);
* geometric: `scale` (isotropic, log2 std `scale_std`), `rotate_frac` (uniform up to `rotate_frac_max` of a full
  turn), `aniso` (anisotropic scale, log2 std `aniso_std`, in a frame rotated with probability
  `aniso_rotate_prob`), `translate_frac` (std `translate_frac_std` of the size); composed into one inverse
  transform and executed once: reflect-pad, 2x upsample with the sym6 wavelet filter, bilinear `grid_sample`,
  filtered 2x downsample;
* colour (RGB or single-channel images): `brightness`, `contrast`, `lumaflip`, `hue`, `saturation` (std /
  range parameters as named), composed into one 4x4 colour matrix.

With p = 0 every operation is drawn as "not applied" (the random stream is still consumed): the images come back
unchanged and the labels are zero.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Low-pass taps of the sym6 wavelet: the resampling filter of the geometric transformations.
SYM6 = [
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
]


# The operations EDM's train.py enables for `--augment=P` (every dataset; CIFAR-10 trains with P = 0.12).
EDM_AUGMENT_OPERATIONS = {"xflip": 1e8, "yflip": 1, "scale": 1, "rotate_frac": 1, "aniso": 1, "translate_frac": 1}


def constant(value, shape=None, dtype=None, device=None) -> torch.Tensor:
    """A tensor of `value` (default dtype), broadcast to `shape` when given."""
    tensor = torch.as_tensor(np.asarray(value).copy(), dtype=dtype or torch.get_default_dtype(), device=device)
    if shape is not None:
        tensor = torch.broadcast_tensors(tensor, torch.empty(shape, device=device))[0].contiguous()
    return tensor


def matrix(*rows, device=None) -> torch.Tensor:
    """A [..., rows, columns] matrix from rows of numbers and tensors (all tensors of one shape: a batch of
    matrices); numbers are broadcast to the tensors' shape."""
    if any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("matrix rows of different lengths")
    elements = [x for row in rows for x in row]
    tensors = [x for x in elements if isinstance(x, torch.Tensor)]
    if not tensors:
        return constant(np.asarray(rows), device=device)
    like = tensors[0]
    elements = [
        x if isinstance(x, torch.Tensor) else constant(x, shape=like.shape, device=like.device) for x in elements
    ]
    return torch.stack(elements, dim=-1).reshape(like.shape + (len(rows), -1))


def translate2d(tx, ty, **kwargs) -> torch.Tensor:
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kwargs)


def translate3d(tx, ty, tz, **kwargs) -> torch.Tensor:
    return matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], **kwargs)


def scale2d(sx, sy, **kwargs) -> torch.Tensor:
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kwargs)


def scale3d(sx, sy, sz, **kwargs) -> torch.Tensor:
    return matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], **kwargs)


def rotate2d(theta, **kwargs) -> torch.Tensor:
    cos, sin = torch.cos(theta), torch.sin(theta)
    return matrix([cos, torch.sin(-theta), 0], [sin, cos, 0], [0, 0, 1], **kwargs)


def rotate3d(axis, theta, **kwargs) -> torch.Tensor:
    """Rotation by `theta` about the unit vector `axis` (Rodrigues)."""
    vx, vy, vz = axis[..., 0], axis[..., 1], axis[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return matrix(
        [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
        [0, 0, 0, 1],
        **kwargs,
    )


def translate2d_inv(tx, ty, **kwargs) -> torch.Tensor:
    return translate2d(-tx, -ty, **kwargs)


def scale2d_inv(sx, sy, **kwargs) -> torch.Tensor:
    return scale2d(1 / sx, 1 / sy, **kwargs)


def rotate2d_inv(theta, **kwargs) -> torch.Tensor:
    return rotate2d(-theta, **kwargs)


def _where_drawn(probability: float, shape: list[int], device, values: torch.Tensor) -> torch.Tensor:
    """`values` where a uniform draw of `shape` falls below `probability`, else zero (one `torch.rand`)."""
    return torch.where(torch.rand(shape, device=device) < probability, values, torch.zeros_like(values))


class AugmentPipe:
    """EDM's augmentation pipeline (module doc): `pipe(images [N, C, H, W]) -> (images, labels [N, L])`."""

    def __init__(
        self,
        p: float = 1,
        xflip: float = 0,
        yflip: float = 0,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale: float = 0,
        rotate_frac: float = 0,
        aniso: float = 0,
        translate_frac: float = 0,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
        brightness: float = 0,
        contrast: float = 0,
        lumaflip: float = 0,
        hue: float = 0,
        saturation: float = 0,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        hue_max: float = 1,
        saturation_std: float = 1,
    ):
        self.p = float(p)  # overall multiplier of every probability
        # Pixel blitting.
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.rotate_int = float(rotate_int)
        self.translate_int = float(translate_int)
        self.translate_int_max = float(translate_int_max)
        # Geometric transformations.
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)
        # Colour transformations.
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.hue_max = float(hue_max)
        self.saturation_std = float(saturation_std)

    @property
    def label_dim(self) -> int:
        """Length of the label vector (the `augment_dim` of a SongUNet trained with this pipe)."""
        sizes = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1, "rotate_frac": 2}
        sizes.update({"aniso": 2, "translate_frac": 2, "brightness": 1, "contrast": 1, "lumaflip": 1, "hue": 2})
        sizes["saturation"] = 1
        return sum(size for name, size in sizes.items() if getattr(self, name) > 0)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]
        images, labels = self._blit(images, labels)
        G_inv = self._geometric_transform(N, H, W, device, labels)
        if G_inv is not None:
            images = self._resample(images, G_inv)
        M = self._color_transform(N, device, labels)
        if M is not None:
            images = self._apply_color(images, M)
        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    # ------------------------------------------------------------------------------------------------------------
    # Pixel blitting

    def _blit(self, images: torch.Tensor, labels: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        N, C, H, W = images.shape
        device = images.device
        if self.xflip > 0:
            w = _where_drawn(self.xflip * self.p, [N, 1, 1, 1], device, torch.randint(2, [N, 1, 1, 1], device=device))
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = _where_drawn(self.yflip * self.p, [N, 1, 1, 1], device, torch.randint(2, [N, 1, 1, 1], device=device))
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)
        if self.rotate_int > 0:
            w = torch.randint(4, [N, 1, 1, 1], device=device)
            w = _where_drawn(self.rotate_int * self.p, [N, 1, 1, 1], device, w)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1
            w = _where_drawn(self.translate_int * self.p, [1, N, 1, 1, 1], device, w)
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in images.shape), indexing="ij")
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()  # reflected at the borders
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]
        return images, labels

    # ------------------------------------------------------------------------------------------------------------
    # Geometric transformations

    def _geometric_transform(self, N: int, H: int, W: int, device, labels: list[torch.Tensor]) -> torch.Tensor | None:
        """The inverse transform G^-1 [N, 3, 3] of the drawn geometric operations, or None when none is enabled."""
        G_inv = None

        def compose(*factors: torch.Tensor) -> None:  # G^-1 = G^-1 @ factors[0] @ factors[1] ..., left to right
            nonlocal G_inv
            for factor in factors:
                G_inv = (torch.eye(3, device=device) if G_inv is None else G_inv) @ factor

        if self.scale > 0:
            w = _where_drawn(self.scale * self.p, [N], device, torch.randn([N], device=device))
            s = w.mul(self.scale_std).exp2()
            compose(scale2d_inv(s, s))
            labels.append(w)
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = _where_drawn(self.rotate_frac * self.p, [N], device, w)
            compose(rotate2d_inv(-w))
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = _where_drawn(self.aniso * self.p, [N], device, w)
            r = _where_drawn(self.aniso_rotate_prob, [N], device, r)
            s = w.mul(self.aniso_std).exp2()
            compose(rotate2d_inv(r), scale2d_inv(s, 1 / s), rotate2d_inv(-r))
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = _where_drawn(self.translate_frac * self.p, [1, N], device, torch.randn([2, N], device=device))
            compose(translate2d_inv(w[0].mul(W * self.translate_frac_std), w[1].mul(H * self.translate_frac_std)))
            labels += [w[0], w[1]]
        return G_inv

    @staticmethod
    def _resample(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
        """Execute G^-1: reflect-pad by the margin the transformed corners need, upsample 2x (sym6), sample
        bilinearly, downsample 2x (sym6) and crop."""
        N, C, H, W = images.shape
        device = images.device
        cx, cy = (W - 1) / 2, (H - 1) / 2
        corners = matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device)  # [idx, xyz]
        corners = G_inv @ corners.t()  # [batch, xyz, idx]
        taps = np.asarray(SYM6, dtype=np.float32)
        taps_pad = len(taps) // 4
        margin = corners[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, batch * idx]
        margin = torch.cat([-margin, margin]).max(dim=1).values  # [x0, y0, x1, y1]
        margin = margin + constant([taps_pad * 2 - cx, taps_pad * 2 - cy] * 2, device=device)
        margin = margin.max(constant([0, 0] * 2, device=device))
        margin = margin.min(constant([W - 1, H - 1] * 2, device=device))
        mx0, my0, mx1, my1 = margin.ceil().to(torch.int32)

        # Pad and move the origin to the padded image's centre.
        images = F.pad(input=images, pad=[mx0, mx1, my0, my1], mode="reflect")
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv

        # Upsample 2x: zero-interleave, then the filter along x and along y.
        weight = constant(taps[None, None, ::-1], dtype=images.dtype, device=device).tile([images.shape[1], 1, 1])
        pad = (len(taps) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[..., :-1]
        images = F.conv2d(images, weight.unsqueeze(2), groups=images.shape[1], padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = F.conv2d(images, weight.unsqueeze(3), groups=images.shape[1], padding=[pad, 0])
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Sample.
        shape = [N, C, (H + taps_pad * 2) * 2, (W + taps_pad * 2) * 2]
        to_unit = scale2d(2 / images.shape[3], 2 / images.shape[2], device=device)
        G_inv = to_unit @ G_inv @ scale2d_inv(2 / shape[3], 2 / shape[2], device=device)
        grid = F.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        # Downsample 2x and crop.
        weight = constant(taps[None, None, :], dtype=images.dtype, device=device).tile([images.shape[1], 1, 1])
        pad = (len(taps) - 1) // 2
        images = F.conv2d(images, weight.unsqueeze(2), groups=images.shape[1], stride=[1, 2], padding=[0, pad])
        images = images[:, :, :, taps_pad:-taps_pad]
        images = F.conv2d(images, weight.unsqueeze(3), groups=images.shape[1], stride=[2, 1], padding=[pad, 0])
        return images[:, :, taps_pad:-taps_pad, :]

    # ------------------------------------------------------------------------------------------------------------
    # Colour transformations

    def _color_transform(self, N: int, device, labels: list[torch.Tensor]) -> torch.Tensor | None:
        """The colour matrix M [N, 4, 4] of the drawn colour operations, or None when none is enabled."""
        I_4 = torch.eye(4, device=device)
        M = None
        luma_axis = constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)

        def compose(transform: torch.Tensor) -> None:
            nonlocal M
            M = transform @ (I_4 if M is None else M)

        if self.brightness > 0:
            w = _where_drawn(self.brightness * self.p, [N], device, torch.randn([N], device=device))
            b = w * self.brightness_std
            compose(translate3d(b, b, b))
            labels.append(w)
        if self.contrast > 0:
            w = _where_drawn(self.contrast * self.p, [N], device, torch.randn([N], device=device))
            c = w.mul(self.contrast_std).exp2()
            compose(scale3d(c, c, c))
            labels.append(w)
        if self.lumaflip > 0:
            w = _where_drawn(self.lumaflip * self.p, [N, 1, 1], device, torch.randint(2, [N, 1, 1], device=device))
            compose(I_4 - 2 * luma_axis.ger(luma_axis) * w)
            labels.append(w)
        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = _where_drawn(self.hue * self.p, [N], device, w)
            compose(rotate3d(luma_axis, w))
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = _where_drawn(self.saturation * self.p, [N, 1, 1], device, torch.randn([N, 1, 1], device=device))
            luma = luma_axis.ger(luma_axis)
            compose(luma + (I_4 - luma) * w.mul(self.saturation_std).exp2())
            labels.append(w)
        return M

    @staticmethod
    def _apply_color(images: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        N, C, H, W = images.shape
        images = images.reshape([N, C, H * W])
        if C == 3:
            images = M[:, :3, :3] @ images + M[:, :3, 3:]
        elif C == 1:
            M = M[:, :3, :].mean(dim=1, keepdims=True)
            images = images * M[:, :, :3].sum(dim=2, keepdims=True) + M[:, :, 3:]
        else:
            raise ValueError(f"colour augmentation needs RGB (3 channels) or L (1 channel) images, got {C} channels")
        return images.reshape([N, C, H, W])


def edm_augment_pipe(p: float) -> AugmentPipe:
    """EDM's train.py augmentation at probability `p` (`--augment=p`): `EDM_AUGMENT_OPERATIONS`, 9 labels."""
    return AugmentPipe(p=p, **EDM_AUGMENT_OPERATIONS)
