"""Image transforms from the params' ``transforms`` list, with PIL and torch (no torchvision).

Names and arguments as torchvision's: ``expand_to_square`` (LLaVA's pad to a square with
``background_color``), ``resize`` (shorter side to ``size``, or to ``[h, w]``; ``interpolation``),
``center_crop``, ``random_crop``, ``random_horizontal_flip`` (``p``), ``to_tensor`` (C x H x W
floats in [0, 1]), ``normalize`` (``mean``, ``std``), ``to_dtype``.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def max_pixels() -> int:
    """The most pixels an image (or the square it is padded to) may have: PIL's bomb limit."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def square_fits(width: int, height: int) -> Optional[str]:
    """Why an image of this size cannot be padded to a square (``expand_to_square``), or None."""
    side = max(width, height)
    if side * side > max_pixels():
        return (f"{width}x{height} pads to a {side}x{side} square, {side * side:,} pixels "
                f"(at most {max_pixels():,})")
    return None


def expand_to_square(img: Image.Image, background_color=(0, 0, 0)) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    too_big = square_fits(w, h)            # bounded before the canvas is allocated
    if too_big:
        raise ValueError(too_big)
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(background_color))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def resize(img: Image.Image, size, interpolation: str = "bilinear") -> Image.Image:
    if isinstance(size, int):
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        target = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        target = (int(size[1]), int(size[0]))
    return img.resize(target, _RESAMPLE[interpolation])


def center_crop(img: Image.Image, size) -> Image.Image:
    th, tw = _pair(size)
    w, h = img.size
    left, top = int(round((w - tw) / 2.0)), int(round((h - th) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)     # (C, H, W)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x - m) / s


def build_transforms(specs, rng: random.Random | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Compose the params' transform list into one callable PIL image -> tensor. Random steps
    draw from the ``rng`` given to the call (per sample: deterministic resume), else ``rng``."""
    current = [rng or random.Random(0)]
    steps: list[Callable] = []
    for t in specs:
        name = t.name
        if name == "expand_to_square":
            steps.append(lambda im, c=tuple(t.background_color or (0, 0, 0)): expand_to_square(im, c))
        elif name == "resize":
            steps.append(lambda im, s=t.size, i=t.interpolation or "bilinear": resize(im, s, i))
        elif name == "center_crop":
            steps.append(lambda im, s=t.size: center_crop(im, s))
        elif name == "random_crop":
            def crop(im, s=t.size):
                th, tw = _pair(s)
                w, h = im.size
                left, top = current[0].randint(0, max(w - tw, 0)), current[0].randint(0, max(h - th, 0))
                return im.crop((left, top, left + tw, top + th))
            steps.append(crop)
        elif name == "random_horizontal_flip":
            steps.append(lambda im, p=(t.p if t.p is not None else 0.5):
                         im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if current[0].random() < p else im)
        elif name == "to_tensor":
            steps.append(to_tensor)
        elif name == "normalize":
            steps.append(lambda x, m=t.mean, s=t.std: normalize(x, m, s))
        elif name == "to_dtype":
            steps.append(lambda x, d=getattr(torch, t.dtype or "float32"): x.to(d))

    def apply(img: Image.Image, sample_rng: random.Random | None = None):
        if sample_rng is not None:
            current[0] = sample_rng
        x = img.convert("RGB")
        for step in steps:
            x = step(x)
        return x if isinstance(x, torch.Tensor) else to_tensor(x)
    return apply
