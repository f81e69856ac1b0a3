"""The synthetic products' pictures: a shape per product type in its colours, with a pattern, a
material texture, lighting, a crop and sometimes a decoy colour (``data.synthetic`` draws what each
shows).

The renderer works on NumPy arrays with masks and textures precomputed once per image size, so a
96 px picture costs well under a millisecond before encoding (:func:`~.images.encode_image`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw

__all__ = [
    "COLOR_RGB",
    "LONG_TAIL_COLOR_RGB",
    "MATERIALS",
    "PATTERNS",
    "SUBTYPES",
    "ImageParts",
    "render_product",
]

# The default taxonomy's colors, as the products are painted.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28),
    "white": (246, 246, 244),
    "grey": (128, 128, 132),
    "red": (200, 32, 36),
    "blue": (36, 70, 200),
    "green": (44, 150, 64),
    "yellow": (240, 212, 44),
    "orange": (238, 132, 26),
    "pink": (240, 140, 186),
    "purple": (120, 52, 160),
    "brown": (112, 72, 34),
    "beige": (222, 202, 160),
}

# The long-tailed taxonomy's further colors (schemas/taxonomy-longtail.yaml); some sit close to a
# default one on purpose (navy / blue, charcoal / grey), as on a real catalog.
LONG_TAIL_COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "navy": (24, 34, 96),
    "maroon": (112, 22, 38),
    "teal": (0, 128, 128),
    "olive": (110, 112, 34),
    "khaki": (190, 176, 122),
    "gold": (212, 172, 52),
    "silver": (192, 194, 200),
    "turquoise": (64, 212, 200),
    "coral": (250, 122, 98),
    "lavender": (186, 160, 226),
    "mint": (160, 230, 190),
    "magenta": (214, 32, 160),
    "charcoal": (62, 64, 70),
    "cream": (250, 240, 206),
    "mustard": (206, 164, 30),
    "tan": (196, 150, 100),
    "sky blue": (120, 186, 236),
    "lime": (170, 220, 40),
}
_PALETTE = {**COLOR_RGB, **LONG_TAIL_COLOR_RGB}

_BACKGROUNDS = ((236, 236, 240), (226, 232, 226), (232, 226, 236), (214, 218, 222))

# Product silhouettes in unit coordinates: polygons plus (kind, box) primitives.
_SHAPES: dict[str, list[tuple[str, tuple[float, ...]]]] = {
    "t-shirt": [
        (
            "poly",
            (
                0.3,
                0.2,
                0.42,
                0.15,
                0.58,
                0.15,
                0.7,
                0.2,
                0.86,
                0.36,
                0.76,
                0.44,
                0.7,
                0.38,
                0.7,
                0.86,
                0.3,
                0.86,
                0.3,
                0.38,
                0.24,
                0.44,
                0.14,
                0.36,
            ),
        )
    ],
    "shirt": [
        (
            "poly",
            (
                0.3,
                0.18,
                0.45,
                0.12,
                0.5,
                0.22,
                0.55,
                0.12,
                0.7,
                0.18,
                0.88,
                0.76,
                0.8,
                0.79,
                0.7,
                0.46,
                0.7,
                0.88,
                0.3,
                0.88,
                0.3,
                0.46,
                0.2,
                0.79,
                0.12,
                0.76,
            ),
        )
    ],
    "dress": [("poly", (0.4, 0.12, 0.6, 0.12, 0.62, 0.4, 0.8, 0.9, 0.2, 0.9, 0.38, 0.4))],
    "jeans": [("poly", (0.3, 0.1, 0.7, 0.1, 0.75, 0.92, 0.56, 0.92, 0.5, 0.36, 0.44, 0.92, 0.25, 0.92))],
    "jacket": [
        (
            "poly",
            (
                0.25,
                0.15,
                0.75,
                0.15,
                0.93,
                0.8,
                0.8,
                0.83,
                0.72,
                0.46,
                0.74,
                0.9,
                0.26,
                0.9,
                0.28,
                0.46,
                0.2,
                0.83,
                0.07,
                0.8,
            ),
        )
    ],
    "sweater": [
        (
            "poly",
            (
                0.28,
                0.22,
                0.72,
                0.22,
                0.9,
                0.7,
                0.82,
                0.74,
                0.7,
                0.44,
                0.7,
                0.8,
                0.3,
                0.8,
                0.3,
                0.44,
                0.18,
                0.74,
                0.1,
                0.7,
            ),
        )
    ],
    "skirt": [("poly", (0.38, 0.3, 0.62, 0.3, 0.78, 0.76, 0.22, 0.76))],
    "shorts": [("poly", (0.28, 0.3, 0.72, 0.3, 0.76, 0.66, 0.55, 0.66, 0.5, 0.46, 0.45, 0.66, 0.24, 0.66))],
    "sneakers": [("poly", (0.14, 0.56, 0.45, 0.5, 0.6, 0.4, 0.76, 0.45, 0.86, 0.6, 0.88, 0.71, 0.12, 0.71))],
    "boots": [("poly", (0.35, 0.14, 0.6, 0.14, 0.6, 0.6, 0.86, 0.68, 0.86, 0.83, 0.3, 0.83, 0.32, 0.5))],
    "handbag": [("poly", (0.25, 0.45, 0.75, 0.45, 0.8, 0.83, 0.2, 0.83)), ("arc", (0.34, 0.22, 0.66, 0.62))],
    "backpack": [("rrect", (0.28, 0.18, 0.72, 0.88)), ("rrect", (0.36, 0.56, 0.64, 0.84))],
    "hat": [("ellipse", (0.12, 0.56, 0.88, 0.72)), ("ellipse", (0.3, 0.3, 0.7, 0.66))],
    "scarf": [("poly", (0.2, 0.14, 0.36, 0.14, 0.8, 0.78, 0.8, 0.9, 0.64, 0.9, 0.2, 0.3))],
    "lamp": [
        ("poly", (0.35, 0.14, 0.65, 0.14, 0.76, 0.4, 0.24, 0.4)),
        ("rect", (0.47, 0.4, 0.53, 0.8)),
        ("ellipse", (0.3, 0.78, 0.7, 0.88)),
    ],
}

# The long-tailed taxonomy's sub-types: a base silhouette and how it varies (see _variant).
SUBTYPES: dict[str, tuple[str, str]] = {
    "crop top": ("t-shirt", "cropped"),
    "tank top": ("t-shirt", "narrow"),
    "polo shirt": ("shirt", "notch"),
    "blouse": ("shirt", "small"),
    "mini dress": ("dress", "cropped"),
    "slip dress": ("dress", "narrow"),
    "skinny jeans": ("jeans", "narrow"),
    "wide-leg jeans": ("jeans", "wide"),
    "bomber jacket": ("jacket", "cropped"),
    "parka": ("jacket", "wide"),
    "blazer": ("jacket", "notch"),
    "cardigan": ("sweater", "notch"),
    "hoodie": ("sweater", "wide"),
    "mini skirt": ("skirt", "cropped"),
    "pleated skirt": ("skirt", "wide"),
    "bermuda shorts": ("shorts", "narrow"),
    "slip-ons": ("sneakers", "small"),
    "ankle boots": ("boots", "cropped"),
    "clutch": ("handbag", "cropped"),
    "tote bag": ("handbag", "wide"),
    "beanie": ("hat", "narrow"),
    "cap": ("hat", "cropped"),
    "shawl": ("scarf", "wide"),
    "desk lamp": ("lamp", "small"),
    "floor lamp": ("lamp", "narrow"),
}

PATTERNS = ("solid", "striped", "checked", "dotted", "floral", "camouflage")
MATERIALS = ("cotton", "polyester", "wool", "leather", "denim", "silk", "linen", "nylon", "metal", "wood")


@cache
def _shape_mask(product_type: str, size: int) -> np.ndarray:
    """Silhouette on a canvas padded by ``size // 12`` on every side (windows give the shifts)."""
    if product_type in SUBTYPES:
        base, variant = SUBTYPES[product_type]
        return _variant(_shape_mask(base, size), variant)
    pad = size // 12
    canvas = Image.new("L", (size + 2 * pad, size + 2 * pad), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, coords in _SHAPES[product_type]:
        pts = [pad + c * (size - 1) for c in coords]
        if kind == "poly":
            draw.polygon(list(zip(pts[0::2], pts[1::2], strict=True)), fill=255)
        elif kind == "rect":
            draw.rectangle(pts, fill=255)
        elif kind == "rrect":
            draw.rounded_rectangle(pts, radius=max(1, size // 12), fill=255)
        elif kind == "ellipse":
            draw.ellipse(pts, fill=255)
        elif kind == "arc":
            draw.arc(pts, 180, 360, fill=255, width=max(1, size // 24))
    return np.asarray(canvas) > 0


def _variant(mask: np.ndarray, variant: str) -> np.ndarray:
    """A base silhouette varied into a sub-type's: cropped (bottom third cut), narrow / wide
    (squeezed / stretched sideways), small (shrunk about the centre) or notch (a band cut across)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    out = np.zeros_like(mask)
    if variant == "cropped":
        cut = top + (bottom - top) * 2 // 3
        out[:cut] = mask[:cut]
        return out
    if variant == "notch":
        out[:] = mask
        band = top + (bottom - top) * 11 // 20
        out[band : band + max(1, (bottom - top) // 10)] = False
        return out
    scale_x, scale_y = {"narrow": (0.65, 1.0), "wide": (1.3, 1.0), "small": (0.7, 0.7)}[variant]
    height, width = mask.shape
    cy, cx = (top + bottom) / 2, (left + right) / 2
    yy, xx = np.mgrid[0:height, 0:width]
    src_y = np.clip(np.round(cy + (yy - cy) / scale_y).astype(int), 0, height - 1)
    src_x = np.clip(np.round(cx + (xx - cx) / scale_x).astype(int), 0, width - 1)
    return mask[src_y, src_x]


def _blur(field: np.ndarray, radius: int) -> np.ndarray:
    kernel = np.ones(2 * radius + 1) / (2 * radius + 1)
    for axis in (0, 1):
        field = np.apply_along_axis(
            lambda v: np.convolve(np.pad(v, radius, mode="wrap"), kernel, "valid"), axis, field
        )
    return field


def _normalise(field: np.ndarray) -> np.ndarray:
    field = field - field.mean()
    return (field / (np.abs(field).max() + 1e-9)).astype(np.float32)


def _tile(field: np.ndarray) -> np.ndarray:
    """A periodic field tiled to twice its size, so any ``size``-window is a random shift of it."""
    return np.tile(field, (2, 2))


@cache
def _pattern_mask(pattern: str, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / max(2, round(size / max(4.0, size / 12)))  # divides size: the tile is periodic
    if pattern == "solid":
        field = np.zeros((size, size), bool)
    elif pattern == "striped":
        field = (y // (period / 2)) % 2 == 0
    elif pattern == "checked":
        field = ((y // (period / 2)) + (x // (period / 2))) % 2 == 0
    elif pattern == "dotted":
        field = ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) < (period / 4) ** 2
    elif pattern == "floral":
        big = period * 2
        cx, cy = x % big - big / 2, y % big - big / 2
        field = np.zeros((size, size), bool)
        for k in range(5):
            angle = 2 * np.pi * k / 5
            px, py = np.cos(angle) * big / 5, np.sin(angle) * big / 5
            field |= ((cx - px) ** 2 + (cy - py) ** 2) < (big / 8) ** 2
    elif pattern == "camouflage":
        rng = np.random.default_rng(7)
        blobs = _blur(rng.normal(size=(size, size)), max(2, size // 16))
        field = blobs > np.quantile(blobs, 0.55)
    else:
        raise KeyError(pattern)
    return _tile(field)


@cache
def _texture(material: str, size: int) -> np.ndarray:
    rng = np.random.default_rng(11 + MATERIALS.index(material))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size / 96
    if material == "cotton":
        field = rng.normal(size=(size, size))
    elif material == "polyester":
        field = np.sin(x * 2 * np.pi / 3) * np.sin(y * 2 * np.pi / 3)
    elif material == "wool":
        field = _blur(rng.normal(size=(size, size)), max(1, int(2 * scale)))
    elif material == "leather":
        field = np.abs(_blur(rng.normal(size=(size, size)), max(1, int(3 * scale))))
    elif material == "denim":
        field = np.sin((x + y) * 2 * np.pi / (4 * scale))
    elif material == "silk":
        field = np.sin(x * 2 * np.pi / size * 1.5)
    elif material == "linen":
        field = np.sin(x * 2 * np.pi / (5 * scale)) + np.sin(y * 2 * np.pi / (5 * scale))
    elif material == "nylon":
        field = y / size
    elif material == "metal":
        field = -np.hypot(x - size * 0.35, y - size * 0.35)
    elif material == "wood":
        field = np.sin((y + 3 * scale * np.sin(x / (7 * scale))) * 2 * np.pi / (9 * scale))
    else:
        raise KeyError(material)
    return _tile(_normalise(field))


@cache
def _mask_image(kind: str, name: str, size: int) -> Image.Image:
    """Shape or pattern mask as a PIL ``L`` image (padded/tiled, so crops give random shifts)."""
    field = _shape_mask(name, size) if kind == "shape" else _pattern_mask(name, size)
    return Image.fromarray(field.astype(np.uint8) * 255, "L")


@cache
def _texture_image(material: str, size: int, strength: float) -> Image.Image:
    """Material texture as a gray ``RGB`` image centred on 128 (added with offset -128)."""
    gray = np.clip(128 + strength * _texture(material, size), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


@dataclass(frozen=True)
class ImageParts:
    """What one synthetic picture shows (the ground truth of the image side)."""

    product_type: str
    colors: tuple[str, ...]
    pattern: str
    materials: tuple[str, ...]
    decoy_color: str | None = None


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 90:
        return (int(rgb[0] * 0.62), int(rgb[1] * 0.62), int(rgb[2] * 0.62))
    return (min(rgb[0] + 75, 255), min(rgb[1] + 75, 255), min(rgb[2] + 75, 255))


def _crop(image: Image.Image, size: int, u: float, v: float) -> Image.Image:
    """A ``size`` x ``size`` crop of a padded/tiled image at the offset given by ``u, v`` in [0, 1)."""
    span = image.size[0] - size + 1
    dx, dy = int(u * span), int(v * span)
    return image.crop((dx, dy, dx + size, dy + size))


def _lit(rgb: tuple[int, int, int], gain: float) -> tuple[int, int, int]:
    return (min(int(rgb[0] * gain), 255), min(int(rgb[1] * gain), 255), min(int(rgb[2] * gain), 255))


def render_product(
    parts: ImageParts,
    rng: np.random.Generator,
    *,
    size: int = 96,
    texture_strength: float = 12.0,
) -> Image.Image:
    """Paint one product as a ``size`` x ``size`` RGB image.

    The silhouette shows the product type; the fill shows the colors (two colors: top and bottom);
    a darker/lighter shade inside the pattern mask shows the pattern; a faint texture shows the
    material (weak on purpose, as in paper 004); a decoy box of another color sits behind the
    product when ``decoy_color`` is set. Position, mirroring, lighting (a gain on every color) and
    the texture's phase vary per product. Everything is PIL compositing of precomputed masks.
    """
    u = rng.random(16)
    gain = 0.85 + 0.3 * u[14]
    mask = _crop(_mask_image("shape", parts.product_type, size), size, u[0], u[1])
    if u[2] < 0.5:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    canvas = Image.new("RGB", (size, size), _lit(_BACKGROUNDS[int(u[3] * len(_BACKGROUNDS))], gain))
    if parts.decoy_color is not None:
        w, h = int((0.45 + 0.25 * u[4]) * size), int((0.45 + 0.25 * u[5]) * size)
        x0, y0 = int(u[6] * (size - w + 1)), int(u[7] * (size - h + 1))
        canvas.paste(_lit(_PALETTE[parts.decoy_color], gain), (x0, y0, x0 + w, y0 + h))
    # Colors (two-color products: top half / bottom half of the silhouette) and their pattern shade.
    fill = Image.new("RGB", (size, size), _lit(_PALETTE[parts.colors[0]], gain))
    regions = [(parts.colors[0], (0, 0, size, size))]
    if len(parts.colors) > 1:
        box = mask.getbbox() or (0, 0, size, size)
        mid = (box[1] + box[3]) // 2
        fill.paste(_lit(_PALETTE[parts.colors[1]], gain), (0, mid, size, size))
        regions = [(parts.colors[0], (0, 0, size, mid)), (parts.colors[1], (0, mid, size, size))]
    if parts.pattern != "solid":
        pmask = _crop(_mask_image("pattern", parts.pattern, size), size, u[12], u[13])
        for color, box in regions:
            if box[3] > box[1]:
                shade = _lit(_shade(_PALETTE[color]), gain)
                fill.paste(shade, box, pmask if len(regions) == 1 else pmask.crop(box))
    texture = _crop(_texture_image(parts.materials[0], size, texture_strength), size, u[8], u[9])
    if len(parts.materials) > 1:
        other = _crop(_texture_image(parts.materials[1], size, texture_strength), size, u[10], u[11])
        texture = Image.blend(texture, other, 0.5)
    canvas.paste(ImageChops.add(fill, texture, 1.0, -128), (0, 0), mask)
    return canvas
