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
3. :func:`lab_histogram`: a soft (trilinear) L*a*b* histogram of the foreground, :data:`L_BINS` x
   :data:`AB_BINS` x :data:`AB_BINS` cells, square-rooted (Hellinger: small shares still count), and
   the foreground's mean and standard deviation of L*, a*, b* and its share of the photo;
4. :func:`lch_histogram`: the same foreground in lightness, chroma and hue, where colour names live.
   Low-chroma pixels (black, greys, white, beige, khaki) count in a lightness-only histogram along
   the grey axis, the others in a lightness x chroma x hue one, finer in lightness than the first
   (bin centres :data:`LCH_L`, :data:`LCH_C`, :data:`HUE_BINS` hues); then the foreground's
   weighted percentiles of L*, a*, b* and chroma and its chroma-weighted mean hue.

Pure tensor functions, no parameters: the same pixels give the same features in training and
serving, on any device. Input is uint8 pixels or floats in [0, 1], ``(B, 3, H, W)``. The features
are versioned (:data:`COLOR_VERSION`): a model bundle records the version it was trained on, and a
bundle of another version is refused with a line that says to retrain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "AB_BINS",
    "BACKGROUND_DELTA_E",
    "COLOR_FEATURES",
    "COLOR_VERSION",
    "HUE_BINS",
    "LAB_FEATURES",
    "LCH_C",
    "LCH_FEATURES",
    "LCH_HIST",
    "LCH_L",
    "L_BINS",
    "PERCENTILES",
    "WORK_SIZE",
    "color_features",
    "lab_histogram",
    "lch_histogram",
    "rgb_to_lab",
]

WORK_SIZE = 64
L_BINS, AB_BINS = 5, 8
# a* and b* of garment colours lie well inside +-AB_RANGE; beyond it they count in the edge cells
AB_RANGE = 80.0
BACKGROUND_DELTA_E = 12.0
# below this share of foreground the photo is taken whole (the product has the background's colour)
MIN_FOREGROUND = 0.03
LAB_FEATURES = L_BINS * AB_BINS * AB_BINS + 7
# lightness and chroma bin centres (soft: linear between centres) and circular hue bins of the
# lightness x chroma x hue histogram; chroma's first centre (0) is the grey axis, which has no hue
LCH_L = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0, 100.0)
LCH_C = (0.0, 8.0, 16.0, 30.0, 50.0, 80.0)
HUE_BINS = 12
PERCENTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SHARE_FLOOR = 1e-4
LCH_HIST = len(LCH_L) * (1 + (len(LCH_C) - 1) * HUE_BINS)  # the square-rooted shares, first
LCH_FEATURES = LCH_HIST + 4 * len(PERCENTILES) + 2
COLOR_FEATURES = LAB_FEATURES + LCH_FEATURES
# what the features are: a bundle trained on another version is refused (inference/bundle.py)
COLOR_VERSION = 3

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
    # the square root of a sum, not .norm(dim=1): PyTorch's CPU norm across channels is ~50x slower
    distance = (lab - background[:, :, None, None]).square().sum(dim=1).sqrt()
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


def _work_lab(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The photo at the work size in L*a*b* ``(B, 3, h, w)`` and its foreground weights ``(B, h, w)``."""
    rgb = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float().clamp(0.0, 1.0)
    if max(rgb.shape[-2:]) > WORK_SIZE:
        rgb = F.adaptive_avg_pool2d(rgb, (min(rgb.shape[-2], WORK_SIZE), min(rgb.shape[-1], WORK_SIZE)))
    lab = rgb_to_lab(rgb)
    return lab, _foreground(lab)


def _lab_part(lab: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    hist = _histogram(lab, weight)
    total = weight.sum(dim=(1, 2)).clamp(min=1e-12)
    mean = (lab * weight[:, None]).sum(dim=(2, 3)) / total[:, None]
    var = (((lab - mean[:, :, None, None]) ** 2) * weight[:, None]).sum(dim=(2, 3)) / total[:, None]
    scale = torch.tensor([100.0, AB_RANGE, AB_RANGE], device=lab.device)
    stats = torch.cat([mean / scale, var.sqrt() / scale, weight.mean(dim=(1, 2))[:, None]], dim=1)
    return torch.cat([hist.sqrt(), stats], dim=1)


def _shared(x: torch.Tensor, centres: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each value shared linearly between its two nearest bin centres (clamped to the outer ones):
    the lower centre's index and the upper one's share."""
    c = torch.tensor(centres, dtype=x.dtype, device=x.device)
    x = x.clamp(float(c[0]), float(c[-1]))
    upper = torch.bucketize(x, c).clamp(1, c.numel() - 1)
    low, high = c[upper - 1], c[upper]
    return upper - 1, ((x - low) / (high - low)).clamp(0.0, 1.0)


def _weighted_quantiles(values: torch.Tensor, weight: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """``(B, len(qs))``: the quantiles of each row of ``values`` ``(B, P)`` weighted by ``weight``,
    interpolated linearly between the two pixels whose cumulative weights bracket each quantile: a
    continuous function of the weights, so float rounding that differs between two machines or
    batch sizes moves a quantile by as little, not by the gap between neighbouring pixels."""
    v, order = values.sort(dim=1)
    w = weight.gather(1, order)
    cum = w.cumsum(dim=1)
    cum = cum / cum[:, -1:].clamp(min=1e-12)
    at = torch.tensor(qs, dtype=cum.dtype, device=cum.device).expand(values.shape[0], -1).contiguous()
    upper = torch.searchsorted(cum, at).clamp(max=values.shape[1] - 1)
    lower = (upper - 1).clamp(min=0)
    c_low, c_high = cum.gather(1, lower), cum.gather(1, upper)
    frac = ((at - c_low) / (c_high - c_low).clamp(min=1e-12)).clamp(0.0, 1.0)
    v_low, v_high = v.gather(1, lower), v.gather(1, upper)
    return v_low + frac * (v_high - v_low)


def _lch_part(lab: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b = lab.shape[0]
    lightness, a, bb = (lab[:, i].reshape(b, -1) for i in range(3))
    w = weight.reshape(b, -1)
    chroma = (a.square() + bb.square()).sqrt()
    hue = torch.atan2(bb, a)
    turn = (hue / (2 * torch.pi) * HUE_BINS) % HUE_BINS  # circular: shared between two hue bins
    hue_bin = turn.floor().long() % HUE_BINS
    hue_share = turn - turn.floor()
    l_bin, l_share = _shared(lightness, LCH_L)
    c_bin, c_share = _shared(chroma, LCH_C)
    # each pixel's weight goes to the (up to) 2 x 2 x 2 cells around it, as in _histogram; the
    # chroma centre 0 is the grey axis, whose cells have lightness only
    chromas = len(LCH_C) - 1
    grey = torch.zeros(b, len(LCH_L), dtype=lab.dtype, device=lab.device)
    coloured = torch.zeros(b, len(LCH_L) * chromas * HUE_BINS, dtype=lab.dtype, device=lab.device)
    for l_up in (0, 1):
        by_l = w * (l_share if l_up else 1 - l_share)
        for c_up in (0, 1):
            by_lc = by_l * (c_share if c_up else 1 - c_share)
            c_at = c_bin + c_up
            if not c_up:  # only the lower chroma centre can be the grey axis
                grey.scatter_add_(1, l_bin + l_up, torch.where(c_at == 0, by_lc, 0.0))
                by_lc = torch.where(c_at > 0, by_lc, 0.0)
            cell = ((l_bin + l_up) * chromas + (c_at - 1).clamp(min=0)) * HUE_BINS
            for h_up in (0, 1):
                share = by_lc * (hue_share if h_up else 1 - hue_share)
                coloured.scatter_add_(1, cell + (hue_bin + h_up) % HUE_BINS, share)
    hist = torch.cat([grey, coloured], dim=1)
    hist = hist / hist.sum(dim=1, keepdim=True).clamp(min=1e-12)
    scaled = ((lightness, 100.0), (a, AB_RANGE), (bb, AB_RANGE), (chroma, AB_RANGE))
    percentiles = torch.cat([_weighted_quantiles(x, w, PERCENTILES) / s for x, s in scaled], dim=1)
    # the hue of the coloured pixels, weighted by how coloured they are: mean (a*, b*) over mean
    # chroma, which a pseudo-chroma of 1 takes smoothly to 0 for a grey product (whose hue is noise)
    total = (w * (chroma + 1.0)).sum(dim=1).clamp(min=1e-12)
    mean_hue = torch.stack([(w * a).sum(dim=1) / total, (w * bb).sum(dim=1) / total], dim=1)
    # square-rooted like the L*a*b* histogram, but smooth at 0: a share near 0 (a grey pixel's
    # hue is noise) moves the feature by at most 1 / (2 sqrt(SHARE_FLOOR)) times as much
    rooted = (hist + SHARE_FLOOR).sqrt() - SHARE_FLOOR**0.5
    return torch.cat([rooted, percentiles, mean_hue], dim=1)


def lab_histogram(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 or [0, 1] float RGB -> ``(B, LAB_FEATURES)``: the foreground's soft
    L*a*b* histogram and its moments (module docstring, 3)."""
    return _lab_part(*_work_lab(pixels))


def lch_histogram(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 or [0, 1] float RGB -> ``(B, LCH_FEATURES)``: the foreground in
    lightness, chroma and hue (module docstring, 4)."""
    return _lch_part(*_work_lab(pixels))


def color_features(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 or [0, 1] float RGB -> ``(B, COLOR_FEATURES)`` float32:
    :func:`lab_histogram` then :func:`lch_histogram` of the same foreground, in float32 whatever the
    autocast around it (under bf16 the colour conversion's products would move pixels across
    histogram bins and the foreground's edge: features of one photo would differ by device)."""
    with torch.autocast(pixels.device.type, enabled=False):
        lab, weight = _work_lab(pixels)
        return torch.cat([_lab_part(lab, weight), _lch_part(lab, weight)], dim=1)
