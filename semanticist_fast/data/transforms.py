"""Image transforms: PIL image in, float32 (3, H, W) tensor in [0, 1] out.

The crops follow ADM (guided-diffusion) semantics because the published tokenizer numbers were
measured on ADM centre crops: halve with a BOX filter while the short side is at least twice the
target (better anti-aliasing than one big bicubic step), then one BICUBIC resize to the exact short
side, then crop. All randomness comes from an explicit torch.Generator (common/seeds.py) so that a resumed
run can replay the same augmentations. Every crop is a CropBox computed from the image's size alone (no pixels),
which is how the DALI pipeline (data/dali.py) cuts exactly the same windows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..common.seeds import seeded_generator

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


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [0, 1] as 8-bit RGB (exact for what to_tensor made)."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def to_tensor(pil: Image.Image) -> torch.Tensor:
    arr = np.asarray(to_rgb(pil), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def adm_resize_plan(width: int, height: int, short_side: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The sizes (w, h) the ADM resize of a width x height image passes through: the BOX halvings, then the size of
    the one BICUBIC step. Other decoders (data/dali.py) resize straight to that final size."""
    halvings = []
    w, h = width, height
    while min(w, h) >= 2 * short_side:
        w, h = w // 2, h // 2
        halvings.append((w, h))
    scale = short_side / min(w, h)
    return halvings, (round(w * scale), round(h * scale))


def _adm_resize_short_side(pil: Image.Image, short_side: int) -> Image.Image:
    halvings, final = adm_resize_plan(*pil.size, short_side)
    for size in halvings:
        pil = pil.resize(size, resample=Image.BOX)
    return pil.resize(final, resample=Image.BICUBIC)


@dataclass(frozen=True)
class CropBox:
    """One view of an image: ADM-resize its short side to `short_side`, take the size x size window at (top, left)
    of the resized image, mirror it when `flip`. The PIL transforms here and the DALI pipeline (data/dali.py) cut
    the same boxes, so they differ only in the resampling filter."""

    short_side: int
    top: int
    left: int
    size: int
    flip: bool = False

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) of the resized image the window is cut from."""
        return adm_resize_plan(width, height, self.short_side)[1]


def crop_views(pil: Image.Image, boxes: Sequence[CropBox]) -> list[torch.Tensor]:
    """The (3, size, size) view of each box, resizing once per distinct short side."""
    rgb = to_rgb(pil)
    uses = Counter(box.short_side for box in boxes)
    resized: dict[int, Image.Image | torch.Tensor] = {}
    views = []
    for box in boxes:
        if box.short_side not in resized:
            image = _adm_resize_short_side(rgb, box.short_side)
            # Several windows of one resize: convert it once and slice; a single one: convert only the window.
            resized[box.short_side] = to_tensor(image) if uses[box.short_side] > 1 else image
        image = resized[box.short_side]
        if isinstance(image, torch.Tensor):
            x = image[:, box.top:box.top + box.size, box.left:box.left + box.size]
        else:
            x = to_tensor(image.crop((box.left, box.top, box.left + box.size, box.top + box.size)))
        views.append(x.flip(-1) if box.flip else x.contiguous())
    return views


def center_crop_box(width: int, height: int, size: int, flip: bool = False) -> CropBox:
    """The ADM centre crop: short side to `size`, the middle window."""
    w, h = adm_resize_plan(width, height, size)[1]
    return CropBox(size, (h - size) // 2, (w - size) // 2, size, flip)


def center_crop_arr(pil: Image.Image, size: int) -> torch.Tensor:
    """ADM centre crop to size x size."""
    return crop_views(pil, [center_crop_box(*pil.size, size)])[0]


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def random_crop_box(width: int, height: int, size: int, min_crop_frac: float = 0.8, max_crop_frac: float = 1.0,
                    generator: torch.Generator | None = None) -> CropBox:
    """ADM random crop of a width x height image. Draws, in order: the short side, the top, the left."""
    lo = math.ceil(size / max_crop_frac)
    hi = math.ceil(size / min_crop_frac)
    short_side = _randint(lo, hi + 1, generator)
    w, h = adm_resize_plan(width, height, short_side)[1]
    top = _randint(0, h - size + 1, generator)
    left = _randint(0, w - size + 1, generator)
    return CropBox(short_side, top, left, size)


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
    return crop_views(pil, [random_crop_box(*pil.size, size, min_crop_frac, max_crop_frac, generator)])[0]


def draw_flip(generator: torch.Generator | None = None, p: float = 0.5) -> bool:
    """Whether to mirror: always draws one number, so the generator advances alike either way."""
    return torch.rand((), generator=generator).item() < p


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip the last (width) axis with probability p (one draw, see draw_flip)."""
    return x.flip(-1) if draw_flip(generator, p) else x


def ten_crop_sizes(size: int) -> tuple[int, ...]:
    """Side lengths of the enlarged ADM centre crops the ten-crop views are cut from (268, 281 for 256)."""
    return tuple(int(size * s) for s in TEN_CROP_SCALES)


def ten_crop_boxes(width: int, height: int, size: int = 256) -> list[CropBox]:
    """The 20 boxes of ten_crop_views, in its order."""
    boxes = []
    for big in ten_crop_sizes(size):
        square = center_crop_box(width, height, big)
        far = big - size
        mid = far // 2
        offsets = ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))  # (top, left) per position
        for flip in (False, True):
            boxes.extend(CropBox(big, square.top + t, square.left + l, size, flip) for t, l in offsets)
    return boxes


def ten_crop_views(pil: Image.Image, size: int = 256) -> list[torch.Tensor]:
    """The 20 cached-training views of one image, each (3, size, size).

    For each scale s in TEN_CROP_SCALES an ADM centre crop of side int(size * s) is cut into the five
    size x size windows of TEN_CROP_POSITIONS; every window also appears mirrored. Order:
        views[10 * scale_idx + 5 * flipped + position_idx]
    so views[0:5] are the unflipped 1.05x windows, views[5:10] their mirrors (views[5 + p] ==
    views[p].flip(-1)), views[10:20] the same for 1.10x.
    """
    return crop_views(pil, ten_crop_boxes(*pil.size, size))


# The views a cache (AR token cache, stage-1 latent cache) stores of every image.
ViewSet = Literal["ten_crop", "center_flip", "center"]
_NUM_VIEWS = {"ten_crop": 20, "center_flip": 2, "center": 1}


def num_views(views: str) -> int:
    if views not in _NUM_VIEWS:
        raise ValueError(f"unknown views {views!r}; expected one of {', '.join(map(repr, _NUM_VIEWS))}")
    return _NUM_VIEWS[views]


def view_boxes(views: str, width: int, height: int, size: int) -> list[CropBox]:
    """The boxes of a cache's views of a width x height image: ten_crop (20, ten_crop_views' order), center_flip
    (the centre crop, then its mirror) or center."""
    num_views(views)
    if views == "ten_crop":
        return ten_crop_boxes(width, height, size)
    center = center_crop_box(width, height, size)
    return [center, center_crop_box(width, height, size, flip=True)] if views == "center_flip" else [center]


def view_for_epoch(seed: int, index: int, epoch: int, num_views: int) -> int:
    """Which cached view of item `index` epoch `epoch` shows: all views of an item before any repeats
    (a seeded permutation per cycle of num_views epochs)."""
    cycle, position = divmod(epoch, num_views)
    order = torch.randperm(num_views, generator=seeded_generator(seed, index, cycle))
    return int(order[position])


@dataclass(frozen=True)
class ImageTransform:
    """Picklable (DataLoader workers) train/eval transform: callable(pil, generator) -> tensor."""

    kind: Literal["random_crop", "center_crop"]
    size: int
    hflip: bool

    def __post_init__(self) -> None:
        if self.kind not in ("random_crop", "center_crop"):
            raise ValueError(f"unknown transform kind {self.kind!r}; expected 'random_crop' or 'center_crop'")

    def box(self, width: int, height: int, generator: torch.Generator | None = None) -> CropBox:
        """The view of a width x height image this transform takes: its draws, in order, are the crop's (random
        crops: short side, top, left), then one for the flip when hflip."""
        if self.kind == "random_crop":
            box = random_crop_box(width, height, self.size, generator=generator)
        else:
            box = center_crop_box(width, height, self.size)
        if self.hflip:
            box = replace(box, flip=draw_flip(generator))
        return box

    def __call__(self, pil: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return crop_views(pil, [self.box(*pil.size, generator)])[0]


def build_transform(kind: Literal["random_crop", "center_crop"], size: int, hflip: bool) -> ImageTransform:
    return ImageTransform(kind, size, hflip)
