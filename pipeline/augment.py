"""Per-view image augmentation of the reference (ReCon ``utils/transforms.py``), made deterministic.

Reference train transform: resize to 256 x 256 -> RandomHorizontalFlip -> RandomResizedCrop(224,
scale=(0.64, 1.0), bicubic) -> RandAugmentMC(n=2, m=10) (the FixMatch RandAugment: two ops drawn with
replacement from a 14-op pool, each applied with probability 0.5 at a magnitude drawn from 1..9)
-> 16 x 16 cutout. Here every random draw comes from a local ``numpy.random.Generator`` seeded per
call, so results depend only on the seed and never touch (or read) the global numpy/torch/random RNG.

Cutout fill: grey (127, 127, 127), as the reference's ``CutoutAbs`` (about the mid-grey / data mean);
the patch is exactly 16 x 16 (clipped at the border), centred at a uniformly drawn point.

The embed stage (stages/embed.py ``ViewVariants``) stores A variants per view: variant 0 is the render
itself (the teacher resizes it as a direct forward would), variant a >= 1 is
``augment_view(render, variant_seed(seed, shape_id, view, a), teacher input size)``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

CROP_SCALE = (0.64, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RANDAUG_N = 2
RANDAUG_M = 10
CUTOUT = 16
CUTOUT_FILL = (127, 127, 127)
_PARAMETER_MAX = 10

# --------------------------------------------------------------------------- RandAugmentMC ops


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() < 0.5 else v


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs)


def _float_param(v: int, max_v: float) -> float:
    return float(v) * max_v / _PARAMETER_MAX


def _int_param(v: int, max_v: float) -> int:
    return int(v * max_v / _PARAMETER_MAX)


def _pool() -> list[tuple[str, Callable[[Image.Image, int, np.random.Generator], Image.Image]]]:
    """The FixMatch RandAugment pool: (name, op(img, v, rng)) with the reference's max_v/bias."""
    f, i = _float_param, _int_param
    return [
        ("AutoContrast", lambda im, v, r: ImageOps.autocontrast(im)),
        ("Brightness", lambda im, v, r: ImageEnhance.Brightness(im).enhance(f(v, 0.9) + 0.05)),
        ("Color", lambda im, v, r: ImageEnhance.Color(im).enhance(f(v, 0.9) + 0.05)),
        ("Contrast", lambda im, v, r: ImageEnhance.Contrast(im).enhance(f(v, 0.9) + 0.05)),
        ("Equalize", lambda im, v, r: ImageOps.equalize(im)),
        ("Identity", lambda im, v, r: im),
        ("Posterize", lambda im, v, r: ImageOps.posterize(im, i(v, 4) + 4)),
        ("Rotate", lambda im, v, r: im.rotate(_signed(i(v, 30), r))),
        ("Sharpness", lambda im, v, r: ImageEnhance.Sharpness(im).enhance(f(v, 0.9) + 0.05)),
        ("ShearX", lambda im, v, r: _affine(im, (1, _signed(f(v, 0.3), r), 0, 0, 1, 0))),
        ("ShearY", lambda im, v, r: _affine(im, (1, 0, 0, _signed(f(v, 0.3), r), 1, 0))),
        ("Solarize", lambda im, v, r: ImageOps.solarize(im, 256 - i(v, 256))),
        ("TranslateX", lambda im, v, r: _affine(im, (1, 0, int(_signed(f(v, 0.3), r) * im.size[0]), 0, 1, 0))),
        ("TranslateY", lambda im, v, r: _affine(im, (1, 0, 0, 0, 1, int(_signed(f(v, 0.3), r) * im.size[1])))),
    ]


_POOL = _pool()


def rand_augment(img: Image.Image, rng: np.random.Generator, n: int = RANDAUG_N,
                 m: int = RANDAUG_M) -> Image.Image:
    """RandAugmentMC without its cutout: n ops (with replacement), each applied with p = 0.5."""
    for k in rng.integers(0, len(_POOL), size=n):
        v = int(rng.integers(1, m))  # 1 .. m-1, as np.random.randint(1, m)
        if rng.random() < 0.5:
            img = _POOL[int(k)][1](img, v, rng)
    return img


def cutout(img: Image.Image, rng: np.random.Generator, size: int = CUTOUT,
           fill: tuple[int, int, int] = CUTOUT_FILL) -> Image.Image:
    """Fill a size x size square (clipped at the border) centred at a uniform random point."""
    w, h = img.size
    x0 = int(max(0.0, rng.uniform(0, w) - size / 2.0))
    y0 = int(max(0.0, rng.uniform(0, h) - size / 2.0))
    a = np.array(img)
    a[y0:min(h, y0 + size), x0:min(w, x0 + size)] = fill
    return Image.fromarray(a)


# --------------------------------------------------------------------------- geometry


def crop_params(height: int, width: int, rng: np.random.Generator,
                scale: tuple[float, float] = CROP_SCALE,
                ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with a local generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _check(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[-1] == 3):
        raise ValueError("expected a uint8 ndarray [H, W, 3] RGB")


def _to_pil(image: np.ndarray) -> Image.Image:
    _check(image)
    return Image.fromarray(np.ascontiguousarray(image))  # uint8 HxWx3 -> RGB


def augment_view(image: np.ndarray, seed: int, size: int = 224) -> np.ndarray:
    """One reference augmentation of a uint8 [H, W, 3] RGB image -> uint8 [size, size, 3].

    Deterministic in seed; the global RNGs are neither read nor advanced.
    """
    rng = np.random.default_rng(int(seed))
    pre = round(size * 256 / 224)  # the reference resizes to 256 before cropping 224
    img = _to_pil(image).resize((pre, pre), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left, h, w = crop_params(pre, pre, rng)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    img = cutout(rand_augment(img, rng), rng)
    return np.asarray(img, dtype=np.uint8)


def variant_seed(base_seed: int, shape_id: str, view: int, variant: int) -> int:
    """Stable 63-bit seed for (base_seed, shape, view, variant), independent of PYTHONHASHSEED."""
    key = f"{int(base_seed)}|{shape_id}|{int(view)}|{int(variant)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
