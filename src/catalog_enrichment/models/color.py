"""Colour statistics of a product photo's foreground: the image features that keep colour.

Globally pooled features of an ImageNet backbone keep little of a garment's colour (ImageNet training
augments colour away), and a small CNN trained on a few thousand photos learns it slowly. This
module summarises the colour of the product itself, as a person would name it, in a fixed vector
that the image encoder appends to its pooled features (``model.image.color_features``):

1. the pixels (shrunk to at most :data:`WORK_SIZE` px a side) go to CIE L*a*b* (D65), a perceptual
   space in which a distance means the same difference of colour everywhere;
2. the **background** is the median colour of the photo's border; a pixel's foreground weight rises
   from 0 to 1 as its distance from that colour grows from :data:`BACKGROUND_DELTA_E` to twice it
   (a white shirt on a white background has no foreground: then every pixel counts);
3. the features are a soft (trilinear) L*a*b* histogram of the foreground, :data:`L_BINS` x
   :data:`AB_BINS` x :data:`AB_BINS` cells, square-rooted (Hellinger: small shares still count), and
   the foreground's mean and standard deviation of L*, a*, b* and its share of the photo.

Pure tensor functions, no parameters: the same pixels give the same features in training and
serving, on any device. Input is uint8 pixels or floats in [0, 1], ``(B, 3, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "AB_BINS",
    "BACKGROUND_DELTA_E",
    "COLOR_FEATURES",
    "L_BINS",
    "WORK_SIZE",
    "color_features",
    "rgb_to_lab",
]

WORK_SIZE = 64
L_BINS, AB_BINS = 5, 8
# a* and b* of garment colours lie well inside +-AB_RANGE; beyond it they count in the edge cells
AB_RANGE = 80.0
BACKGROUND_DELTA_E = 12.0
# below this share of foreground the photo is taken whole (the product has the background's colour)
MIN_FOREGROUND = 0.03
COLOR_FEATURES = L_BINS * AB_BINS * AB_BINS + 7

# sRGB (D65) -> XYZ, and the D65 white point
_RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` sRGB in [0, 1] -> CIE L*a*b* (L* in [0, 100], a*/b* about [-128, 127])."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb), linear) / _WHITE.to(rgb).view(1, 3, 1, 1)
    eps = 216 / 24389
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1 / 3), (24389 / 27 * xyz + 16) / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def _foreground(lab: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` weights in [0, 1]: how far each pixel is from the border's median colour."""
    border = torch.cat(
        [lab[:, :, 0, :], lab[:, :, -1, :], lab[:, :, 1:-1, 0], lab[:, :, 1:-1, -1]], dim=2
    )  # (B, 3, P)
    background = border.median(dim=2).values  # (B, 3)
    distance = (lab - background[:, :, None, None]).norm(dim=1)
    weight = ((distance - BACKGROUND_DELTA_E) / BACKGROUND_DELTA_E).clamp(0.0, 1.0)
    too_little = weight.mean(dim=(1, 2)) < MIN_FOREGROUND
    return torch.where(too_little[:, None, None], torch.ones_like(weight), weight)


def _soft_bins(x: torch.Tensor, low: float, high: float, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation between bin centres: (lower bin index, weight of the upper bin)."""
    pos = ((x - low) / (high - low) * bins - 0.5).clamp(0.0, bins - 1.0)
    lower = pos.floor().clamp(max=bins - 2) if bins > 1 else pos.floor()
    return lower.long(), pos - lower


def _histogram(lab: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(B, L_BINS * AB_BINS * AB_BINS)`` soft histogram of the weighted pixels, summing to 1."""
    b = lab.shape[0]
    axes = [
        _soft_bins(lab[:, 0], 0.0, 100.0, L_BINS),
        _soft_bins(lab[:, 1], -AB_RANGE, AB_RANGE, AB_BINS),
        _soft_bins(lab[:, 2], -AB_RANGE, AB_RANGE, AB_BINS),
    ]
    sizes = (L_BINS, AB_BINS, AB_BINS)
    hist = torch.zeros(b, L_BINS * AB_BINS * AB_BINS, dtype=lab.dtype, device=lab.device)
    flat_w = weight.reshape(b, -1)
    for corner in range(8):  # the 8 corners of the cell each pixel falls in
        index = torch.zeros_like(flat_w, dtype=torch.long)
        share = flat_w
        for axis, ((lower, upper), size) in enumerate(zip(axes, sizes, strict=True)):
            up = (corner >> axis) & 1
            index = index * size + (lower + up).reshape(b, -1)
            frac = upper.reshape(b, -1)
            share = share * (frac if up else 1 - frac)
        hist.scatter_add_(1, index, share)
    return hist / hist.sum(dim=1, keepdim=True).clamp(min=1e-12)


def color_features(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 or [0, 1] float RGB -> ``(B, COLOR_FEATURES)`` float32 (module docstring)."""
    rgb = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float().clamp(0.0, 1.0)
    if max(rgb.shape[-2:]) > WORK_SIZE:
        rgb = F.adaptive_avg_pool2d(rgb, (min(rgb.shape[-2], WORK_SIZE), min(rgb.shape[-1], WORK_SIZE)))
    lab = rgb_to_lab(rgb)
    weight = _foreground(lab)
    hist = _histogram(lab, weight)
    total = weight.sum(dim=(1, 2)).clamp(min=1e-12)
    mean = (lab * weight[:, None]).sum(dim=(2, 3)) / total[:, None]
    var = (((lab - mean[:, :, None, None]) ** 2) * weight[:, None]).sum(dim=(2, 3)) / total[:, None]
    scale = torch.tensor([100.0, AB_RANGE, AB_RANGE], device=lab.device)
    stats = torch.cat([mean / scale, var.sqrt() / scale, weight.mean(dim=(1, 2))[:, None]], dim=1)
    return torch.cat([hist.sqrt(), stats], dim=1)
