"""Image transforms: PIL image in, float32 (3, H, W) tensor in [0, 1] out.

The crops follow ADM (guided-diffusion) semantics because the published tokenizer numbers were
measured on ADM centre crops: halve with a BOX filter while the short side is at least twice the
target (better anti-aliasing than one big bicubic step), then one BICUBIC resize to the exact short
side, then crop. All randomness comes from an explicit torch.Generator (common/seeds.py) so that a resumed
run can replay the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

TEN_CROP_SCALES = (1.05, 1.10)
TEN_CROP_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(pil: Image.Image) -> Image.Image:
    """Any image PIL opens, as 8-bit RGB with its real values: 16- and 32-bit greyscale scaled from the 16-bit range
    (PIL's own convert clips them, so a mid-grey 16-bit PNG turns white), float greyscale from [0, 1] (or [0, 255]
    when its values exceed 1), and transparency (RGBA, LA, P with a transparent colour) composited onto white."""
    if pil.mode in _WIDE_GREY:
        values = np.asarray(pil, dtype=np.float64)
        if pil.mode != "I" or values.max(initial=0) > 255:
            values = values / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if pil.mode == "F":
        values = np.asarray(pil, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip((values * scale).round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if pil.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in pil.info:
        rgba = pil.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return pil.convert("RGB")


def to_tensor(pil: Image.Image) -> torch.Tensor:
    arr = np.asarray(to_rgb(pil), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _adm_resize_short_side(pil: Image.Image, short_side: int) -> Image.Image:
    while min(pil.size) >= 2 * short_side:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = short_side / min(pil.size)
    return pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)


def _center_crop_pil(pil: Image.Image, size: int) -> Image.Image:
    pil = _adm_resize_short_side(to_rgb(pil), size)
    w, h = pil.size
    left, top = (w - size) // 2, (h - size) // 2
    return pil.crop((left, top, left + size, top + size))


def center_crop_arr(pil: Image.Image, size: int) -> torch.Tensor:
    """ADM centre crop to size x size."""
    return to_tensor(_center_crop_pil(pil, size))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def random_crop_arr(
    pil: Image.Image,
    size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ADM random crop: resize the short side to a random length in
    [ceil(size / max_crop_frac), ceil(size / min_crop_frac)] (inclusive), then take a uniformly placed
    size x size window. The crop thus covers between min_crop_frac and max_crop_frac of the short side."""
    lo = math.ceil(size / max_crop_frac)
    hi = math.ceil(size / min_crop_frac)
    short_side = _randint(lo, hi + 1, generator)
    pil = _adm_resize_short_side(to_rgb(pil), short_side)
    w, h = pil.size
    top = _randint(0, h - size + 1, generator)
    left = _randint(0, w - size + 1, generator)
    return to_tensor(pil.crop((left, top, left + size, top + size)))


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip the last (width) axis with probability p. Always draws one number, so the generator
    advances identically whether or not the flip happens."""
    flip = torch.rand((), generator=generator).item() < p
    return x.flip(-1) if flip else x


def ten_crop_sizes(size: int) -> tuple[int, ...]:
    """Side lengths of the enlarged ADM centre crops the ten-crop views are cut from (268, 281 for 256)."""
    return tuple(int(size * s) for s in TEN_CROP_SCALES)


def ten_crop_views(pil: Image.Image, size: int = 256) -> list[torch.Tensor]:
    """The 20 cached-training views of one image, each (3, size, size).

    For each scale s in TEN_CROP_SCALES an ADM centre crop of side int(size * s) is cut into the five
    size x size windows of TEN_CROP_POSITIONS; every window also appears mirrored. Order:
        views[10 * scale_idx + 5 * flipped + position_idx]
    so views[0:5] are the unflipped 1.05x windows, views[5:10] their mirrors (views[5 + p] ==
    views[p].flip(-1)), views[10:20] the same for 1.10x.
    """
    views: list[torch.Tensor] = []
    for big in ten_crop_sizes(size):
        square = to_tensor(_center_crop_pil(pil, big))
        far = big - size
        mid = far // 2
        offsets = ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))  # (top, left) per position
        windows = [square[:, t : t + size, l : l + size] for t, l in offsets]
        views.extend(w.contiguous() for w in windows)
        views.extend(w.flip(-1) for w in windows)
    return views


@dataclass(frozen=True)
class ImageTransform:
    """Picklable (DataLoader workers) train/eval transform: callable(pil, generator) -> tensor."""

    kind: Literal["random_crop", "center_crop"]
    size: int
    hflip: bool

    def __post_init__(self) -> None:
        if self.kind not in ("random_crop", "center_crop"):
            raise ValueError(f"unknown transform kind {self.kind!r}; expected 'random_crop' or 'center_crop'")

    def __call__(self, pil: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "random_crop":
            x = random_crop_arr(pil, self.size, generator=generator)
        else:
            x = center_crop_arr(pil, self.size)
        if self.hflip:
            x = random_hflip(x, generator)
        return x


def build_transform(kind: Literal["random_crop", "center_crop"], size: int, hflip: bool) -> ImageTransform:
    return ImageTransform(kind, size, hflip)
