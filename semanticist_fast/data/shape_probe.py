"""Which type of large shape a built-in picture shows, read from its pixels by template matching.

The built-in class fixes the type of its two large shapes (procedural.py: class mod 5). This probe fits, for each
type, the best pair of that type's shapes (a bank of their anti-aliased masks, drawn by the generator's own signed
distance functions over a grid of centres, radii and rotations) to the picture, after removing its mean and linear
colour gradient (the background), and names the type whose pair explains most of the picture's variance. It trains
nothing and needs no positions, so it scores originals, reconstructions and samples alike; blur lowers every type's
fit together.

Squares and diamonds are the same shape: the generator rotates both uniformly, and a square turned by 45 degrees is
a diamond (their areas differ by 0.2 %). No picture can tell classes 1 and 2 (or 6 and 7) apart by shape, so the
probe names one of four shape groups (disc, square-or-diamond, ring, cross) and the 5-type score of any probe is at
most 80 %.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from .procedural import CROSS, DIAMOND, DISC, NUM_SHAPE_TYPES, RING, SQUARE, _shape_sdf

SHAPE_GROUPS = ("disc", "square/diamond", "ring", "cross")
_GROUP_OF_TYPE = torch.tensor([0, 1, 1, 2, 3])  # indexed by DISC .. CROSS
_GROUP_KINDS = (DISC, SQUARE, RING, CROSS)  # the shape drawn for each group's templates
assert _GROUP_OF_TYPE[DIAMOND] == _GROUP_OF_TYPE[SQUARE] and len(_GROUP_OF_TYPE) == NUM_SHAPE_TYPES
_PROBE_SIZE = 32  # the large shapes span 12 px or more here; larger pictures are averaged down to it


def shape_group(labels: torch.Tensor) -> torch.Tensor:
    """(B,) class labels -> (B,) their shape group (index into SHAPE_GROUPS)."""
    return _GROUP_OF_TYPE.to(labels.device)[labels % NUM_SHAPE_TYPES]


def _background_basis(size: int) -> torch.Tensor:
    """(size*size, 3) orthonormal basis of constant + linear gradients: what the background can be."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5
    planes = torch.stack([torch.ones(size, size, dtype=torch.float64), c[None, :].expand(size, size),
                          c[:, None].expand(size, size)]).flatten(1)
    return torch.linalg.qr(planes.T)[0].float()


def _without_background(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return v - (v @ basis) @ basis.T


@functools.lru_cache(maxsize=2)
def _template_bank(size: int = _PROBE_SIZE, positions: int = 13, radii: int = 5, rotations: int = 6):
    """(N, size*size) unit templates with the background removed, (N,) their group, and the background basis.
    The generator's large shapes: centre in [0.25, 0.75]^2, radius in [0.18, 0.30]; squares and crosses repeat
    every quarter turn, discs and rings not at all."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :], coords[:, None]
    masks, groups = [], []
    for group, kind in enumerate(_GROUP_KINDS):
        turns = [0.0] if kind in (DISC, RING) else [k * (math.pi / 2) / rotations for k in range(rotations)]
        for cx in np.linspace(0.25, 0.75, positions):
            for cy in np.linspace(0.25, 0.75, positions):
                for r in np.linspace(0.18, 0.30, radii):
                    for rot in turns:
                        masks.append(np.clip(0.5 - _shape_sdf(x, y, cx, cy, r, rot, kind) * size, 0.0, 1.0))
                        groups.append(group)
    basis = _background_basis(size)
    bank = _without_background(torch.from_numpy(np.stack(masks)).float().flatten(1), basis)
    return bank / bank.norm(dim=1, keepdim=True), torch.tensor(groups), basis


@torch.no_grad()
def shape_scores(images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(B, 3, H, W) images (any affine range: [0, 1] or [-1, 1]) -> (B, 4) the fraction of each picture's
    non-background variance that the best pair of each group's shapes explains (greedy: the best one, then the best
    second given the first, colour amplitudes free per channel). argmax is `classify_shape`."""
    bank, groups, basis = _template_bank()
    out = []
    for batch in images.float().cpu().split(batch_size):
        if batch.shape[-1] != _PROBE_SIZE or batch.shape[-2] != _PROBE_SIZE:
            batch = F.interpolate(batch, size=(_PROBE_SIZE, _PROBE_SIZE), mode="area")
        channels = _without_background(batch.flatten(2), basis)  # (B, C, HW)
        variance = channels.pow(2).sum((1, 2)).clamp_min(1e-12)
        proj = torch.einsum("bcp,np->cbn", channels, bank)  # (C, B, N)
        fit = proj.pow(2).sum(0)  # (B, N): variance one template explains
        rows = torch.arange(len(batch))
        scores = []
        for group in range(len(SHAPE_GROUPS)):
            idx = (groups == group).nonzero().squeeze(1)
            first = idx[fit[:, idx].argmax(1)]  # (B,)
            overlap = bank[first] @ bank[idx].T  # (B, Ng): cosine of each candidate second with the first
            rest = proj[:, :, idx] - proj[:, rows, first][:, :, None] * overlap[None]  # residual's projections
            second = rest.pow(2).sum(0) / (1.0 - overlap.pow(2)).clamp_min(1e-3)
            second = second.masked_fill(overlap.abs() > 0.95, 0.0)  # the same shape again explains nothing new
            scores.append(fit[rows, first] + second.max(1).values)
        out.append(torch.stack(scores, 1) / variance[:, None])
    return torch.cat(out) if out else torch.empty(0, len(SHAPE_GROUPS))


def classify_shape(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B,) int64 predicted shape group (compare with `shape_group(labels)`)."""
    return shape_scores(images).argmax(dim=-1)


def shape_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of pictures whose shape group is their class's (chance: 40 % for always 'square/diamond')."""
    if len(images) == 0:
        raise ValueError("shape_accuracy needs at least one image")
    return (classify_shape(images) == shape_group(labels.cpu())).float().mean().item()
