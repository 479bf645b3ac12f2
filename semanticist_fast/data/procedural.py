"""Procedural class-labelled images: the built-in dataset (no download, any resolution).

Item i is a pure function of (seed, split, i): its 64 random parameters come from a torch.Generator
seeded with derive_seed(seed, split_stream, i), and the picture is drawn from them in normalised
coordinates with one-pixel anti-aliased edges, so the same item at 32 and 64 px shows the same scene.

Each image mixes coarse and fine content so that an ordered tokenizer has something to put in its
first and in its later tokens:
  coarse: a two-colour linear background gradient and two large shapes,
  fine:   stripes inside the first large shape and up to six small shapes.

Class c fixes the dominant hue (c / num_classes, jittered by at most a quarter of the spacing) and
the type of the large shapes (disc, square, diamond, ring, cross; c mod 5). Squares stand on a side and diamonds on a
corner (each turned by at most 10 degrees; `_turn`): a square turned by 45 degrees is the diamond, so with free turns
no picture could tell the two types apart. Crosses turn freely (a cross at 45 degrees is still no other type). Every colour in the
picture is either that hue, its complement (hue + 1/2), or a grey. In HSV every colour of hue h is
grey + v*s*pure(h) and pure(h + 1/2) = 1 - pure(h), so the chroma (the colour minus its grey part) of
every pixel, and hence of the mean colour, lies on the line through pure(h)'s chroma; the dominant hue
outweighs its small complementary accents, so the mean colour's chroma angle is the class hue's. That
is `class_signature`: linear in the pixels, robust to blur and noise, and exact on clean images.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..common.seeds import seeded_generator

NUM_SHAPE_TYPES = 5
DISC, SQUARE, DIAMOND, RING, CROSS = range(NUM_SHAPE_TYPES)
_SPLIT_STREAMS = {"train": 0, "val": 1}
_HUE_JITTER = 0.25  # fraction of the class hue spacing, each side
_NUM_SMALL = 6
_NUM_PARAMS = 64  # hue jitter, gradient direction, 2 x 2 gradient colours, 2 x 6 large shapes, 4 stripes, 6 x 7 small


def _chroma(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 2) opponent-colour chroma; greys map to 0."""
    r, g, b = rgb.unbind(-1)
    return torch.stack([r - 0.5 * (g + b), (math.sqrt(3.0) / 2.0) * (g - b)], dim=-1)


_HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta",
              "pink")  # one every 30 degrees of hue, from red
_SHAPE_NAMES = ("discs", "squares", "diamonds", "rings", "crosses")  # indexed like DISC .. CROSS


def class_name(label: int, num_classes: int = 10) -> str:
    """What class `label` looks like: its hue's nearest colour name and its large shapes, e.g. 'orange squares'."""
    if not 0 <= label < num_classes:
        raise ValueError(f"class {label} is outside 0..{num_classes - 1}")
    hue = _HUE_NAMES[round(label / num_classes * len(_HUE_NAMES)) % len(_HUE_NAMES)]
    return f"{hue} {_SHAPE_NAMES[label % NUM_SHAPE_TYPES]}"


def class_prototypes(num_classes: int = 10) -> torch.Tensor:
    """(num_classes, 2) unit chroma directions of the class hues."""
    pure = torch.tensor([colorsys.hsv_to_rgb(c / num_classes, 1.0, 1.0) for c in range(num_classes)])
    c = _chroma(pure.float())
    return c / c.norm(dim=-1, keepdim=True)


def class_signature(images: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, num_classes) scores: cosine between the mean colour's
    chroma and each class hue's chroma. Higher is more like that class; argmax is `classify`.
    Adding a grey or scaling leaves the chroma's direction alone, so [-1, 1] images score the same."""
    c = _chroma(images.float().mean(dim=(2, 3)))
    c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return c @ class_prototypes(num_classes).to(c.device).T


def classify(images: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(B, 3, H, W) -> (B,) int64 predicted class labels."""
    return class_signature(images, num_classes).argmax(dim=-1)


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)[:, None, None]


_SQUARE_TURN = math.pi / 18  # squares and diamonds turn by at most this either way: 25 degrees apart at the closest


def _turn(kind: int, u: float) -> float:
    """The rotation (radians) of a shape of this kind from a uniform u in [0, 1): squares and diamonds (the same
    polygon, 45 degrees apart) stay near their own orientation, the others turn freely."""
    if kind in (SQUARE, DIAMOND):
        return (2.0 * u - 1.0) * _SQUARE_TURN
    return math.pi * u


def _shape_sdf(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, rot: float, kind: int) -> np.ndarray:
    """Signed distance (H, W), in image-side units, to a shape of radius r rotated by rot.
    x is (1, W) and y (H, 1) pixel-centre coordinates in [0, 1]."""
    dx, dy = x - cx, y - cy
    cos, sin = math.cos(rot), math.sin(rot)
    lx, ly = np.abs(dx * cos + dy * sin), np.abs(dy * cos - dx * sin)
    if kind == DISC:
        return np.hypot(lx, ly) - r
    if kind == SQUARE:
        return np.maximum(lx, ly) - 0.85 * r  # about the disc's area
    if kind == DIAMOND:
        return (lx + ly - 1.2 * r) / math.sqrt(2.0)
    if kind == RING:
        return np.abs(np.hypot(lx, ly) - 0.7 * r) - 0.3 * r
    arm = r / 3.0
    return np.minimum(np.maximum(lx - r, ly - arm), np.maximum(lx - arm, ly - r))  # CROSS


LARGE_RADIUS = (0.16, 0.24)  # the large shapes' radius range, in image sides
LARGE_CENTRE = (0.24, 0.76)  # the range of their centres' coordinates (each side of the centre by 0.20 to 0.26)


def _large_radius(u: float) -> float:
    return LARGE_RADIUS[0] + (LARGE_RADIUS[1] - LARGE_RADIUS[0]) * u


def _large_centres(u_angle: float, u_offset: float, u_jx: float, u_jy: float):
    """The two large shapes' centres: mirror images through the picture's centre (0.40 to 0.52 apart, against at most
    0.48 for two discs' radii), the second nudged by up to 0.02 each way."""
    a, d = 2.0 * math.pi * u_angle, 0.20 + 0.06 * u_offset
    dx, dy = d * math.cos(a), d * math.sin(a)
    return (0.5 + dx, 0.5 + dy), (0.5 - dx + 0.04 * (u_jx - 0.5), 0.5 - dy + 0.04 * (u_jy - 0.5))


def render(u: Sequence[float], label: int, size: int, num_classes: int) -> np.ndarray:
    """One image, float32 (3, size, size) in [0, 1], from _NUM_PARAMS uniforms in [0, 1) and its label."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :], coords[:, None]
    hue = (label + (u[0] - 0.5) * 2.0 * _HUE_JITTER) / num_classes

    def coverage(sdf: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - sdf * size, 0.0, 1.0)  # a one-pixel anti-aliased edge at any resolution

    def over(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        return img + alpha * (rgb - img)

    # Background: gradient between a lighter and a darker shade of the class hue, random direction.
    phi = 2.0 * math.pi * u[1]
    t = np.clip(0.5 + (x - 0.5) * math.cos(phi) + (y - 0.5) * math.sin(phi), 0.0, 1.0)
    img = over(_rgb(hue, 0.55 + 0.35 * u[2], 0.55 + 0.3 * u[3]), _rgb(hue, 0.45 + 0.3 * u[4], 0.25 + 0.25 * u[5]), t)

    # Two large shapes of the class type, on opposite sides of the centre so that neither hides the other: a bright
    # one overlaid with white stripes, then one darker than any background.
    kind = label % NUM_SHAPE_TYPES
    (cx1, cy1), (cx2, cy2) = _large_centres(u[6], u[7], u[12], u[13])
    r, rot, s, v = u[8:12]
    mask = coverage(_shape_sdf(x, y, cx1, cy1, _large_radius(r), _turn(kind, rot), kind))
    img = over(img, _rgb(hue, 0.7 + 0.3 * s, 0.8 + 0.2 * v), mask)
    freq, angle, phase, strength = u[18:22]
    freq = 4.0 + 4.0 * freq  # cycles per image side
    angle = math.pi * angle
    wave = np.sin(2.0 * math.pi * (freq * math.cos(angle) * x + (freq * math.sin(angle) * y + phase)))
    # The wave's slope at a zero crossing is 2*pi*freq per image side: this edge is one pixel wide too.
    stripes = np.clip(0.5 + wave * (size / (2.0 * math.pi * freq)), 0.0, 1.0)
    img = over(img, _rgb(0.0, 0.0, 1.0), stripes * mask * (0.35 + 0.35 * strength))
    r, rot, s, v = u[14:18]
    mask = coverage(_shape_sdf(x, y, cx2, cy2, _large_radius(r), _turn(kind, rot), kind))
    img = over(img, _rgb(hue, 0.6 + 0.4 * s, 0.08 + 0.12 * v), mask)

    # Small shapes of any type: absent, complementary accents (hue + 1/2), near-whites, near-blacks.
    for j in range(_NUM_SMALL):
        which, cx, cy, r, rot, kind_u, shade = u[22 + 7 * j : 29 + 7 * j]
        which = int(which * 4.0)
        if which == 0:
            continue
        if which == 1:
            rgb = _rgb(hue + 0.5, 0.4 + 0.3 * shade, 0.6 + 0.4 * shade)
        else:
            rgb = _rgb(0.0, 0.0, 0.85 + 0.15 * shade if which == 2 else 0.05 + 0.15 * shade)
        kind_j = min(int(kind_u * NUM_SHAPE_TYPES), NUM_SHAPE_TYPES - 1)
        sdf = _shape_sdf(x, y, 0.05 + 0.9 * cx, 0.05 + 0.9 * cy, 0.035 + 0.045 * r, _turn(kind_j, rot), kind_j)
        img = over(img, rgb, coverage(sdf))
    return np.clip(img, 0.0, 1.0)


class ProceduralImages(Dataset):
    """Deterministic synthetic (image, label) pairs; image float32 (3, size, size) in [0, 1].

    Labels cycle through the classes (label = i mod num_classes) so every split is balanced.
    Train and val draw from different seed streams, so they share no item.
    """

    def __init__(self, size: int, num_items: int, split: str = "train", num_classes: int = 10, seed: int = 0):
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        if size < 1 or num_items < 0 or num_classes < 1:
            raise ValueError(f"bad ProceduralImages(size={size}, num_items={num_items}, num_classes={num_classes})")
        self.size = size
        self.num_items = num_items
        self.split = split
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.num_items

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += self.num_items
        if not 0 <= index < self.num_items:
            raise IndexError(f"index {index} out of range for {self.num_items} items")
        return index

    def label(self, index: int) -> int:
        return self._check_index(index) % self.num_classes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        g = seeded_generator(self.seed, _SPLIT_STREAMS[self.split], index)
        u = torch.rand(_NUM_PARAMS, generator=g, dtype=torch.float64).tolist()
        label = self.label(index)
        return torch.from_numpy(render(u, label, self.size, self.num_classes)), label

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, size, size) images and (B,) int64 labels of the given items."""
        items = [self[int(i)] for i in indices]
        if not items:
            return torch.empty(0, 3, self.size, self.size), torch.empty(0, dtype=torch.long)
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    def class_signature(self, images: torch.Tensor) -> torch.Tensor:
        return class_signature(images, self.num_classes)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return classify(images, self.num_classes)
