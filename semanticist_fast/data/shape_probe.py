"""Which type of large shape a built-in picture shows, read from its pixels by template matching.

The built-in class fixes the type of its two large shapes (procedural.py: class mod 5). This probe fits, for each
type, the best pair of that type's shapes (a bank of their anti-aliased masks, drawn by the generator's own signed
distance functions over a grid of centres, radii and rotations) to the picture, after removing its mean and linear
colour gradient (the background), and names the type whose pair explains most of the picture's variance. It trains
nothing and needs no positions, so it scores originals, reconstructions and samples alike; blur lowers every type's
fit together.

Squares and diamonds are one polygon 45 degrees apart; the generator turns each by at most 10 degrees (`_turn`), and
the bank holds each at its own turns, so the probe names all five types (chance: 20 %).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from .procedural import LARGE_CENTRE, LARGE_RADIUS, _SHAPE_NAMES, _SQUARE_TURN, CROSS, DISC, NUM_SHAPE_TYPES, RING, _shape_sdf

SHAPE_TYPES = _SHAPE_NAMES  # indexed by DISC .. CROSS, as the generator's class mod 5
_PROBE_SIZE = 32  # the large shapes span 12 px or more here; larger pictures are averaged down to it


def shape_type(labels: torch.Tensor) -> torch.Tensor:
    """(B,) class labels -> (B,) the type of their large shapes (index into SHAPE_TYPES)."""
    return labels % NUM_SHAPE_TYPES


def _background_basis(size: int) -> torch.Tensor:
    """(size*size, 3) orthonormal basis of constant + linear gradients: what the background can be."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5
    planes = torch.stack([torch.ones(size, size, dtype=torch.float64), c[None, :].expand(size, size),
                          c[:, None].expand(size, size)]).flatten(1)
    return torch.linalg.qr(planes.T)[0].float()


def _without_background(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return v - (v @ basis) @ basis.T


def _turns(kind: int, rotations: int) -> list[float]:
    """The rotations the bank holds for a kind: the generator's range for it (`procedural._turn`), up to symmetry."""
    if kind in (DISC, RING):
        return [0.0]
    if kind == CROSS:  # repeats every quarter turn
        return [k * (math.pi / 2) / rotations for k in range(rotations)]
    return np.linspace(-_SQUARE_TURN, _SQUARE_TURN, max(2, rotations // 2)).tolist()


@functools.lru_cache(maxsize=2)
def _template_bank(size: int = _PROBE_SIZE, positions: int = 13, radii: int = 5, rotations: int = 6):
    """(N, size*size) unit templates with the background removed, (N,) their type, and the background basis.
    The generator's large shapes: centre in LARGE_CENTRE^2, radius in LARGE_RADIUS."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :], coords[:, None]
    masks, types = [], []
    for kind in range(NUM_SHAPE_TYPES):
        for cx in np.linspace(*LARGE_CENTRE, positions):
            for cy in np.linspace(*LARGE_CENTRE, positions):
                for r in np.linspace(*LARGE_RADIUS, radii):
                    for rot in _turns(kind, rotations):
                        masks.append(np.clip(0.5 - _shape_sdf(x, y, cx, cy, r, rot, kind) * size, 0.0, 1.0))
                        types.append(kind)
    basis = _background_basis(size)
    bank = _without_background(torch.from_numpy(np.stack(masks)).float().flatten(1), basis)
    return bank / bank.norm(dim=1, keepdim=True), torch.tensor(types), basis


@torch.no_grad()
def shape_scores(images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(B, 3, H, W) images (any affine range: [0, 1] or [-1, 1]) -> (B, 5) the fraction of each picture's
    non-background variance that the best pair of each type's shapes explains (greedy: the best one, then the best
    second given the first, colour amplitudes free per channel), one column per type. argmax is `classify_shape`."""
    bank, types, basis = _template_bank()
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
        for kind in range(NUM_SHAPE_TYPES):
            idx = (types == kind).nonzero().squeeze(1)
            first = idx[fit[:, idx].argmax(1)]  # (B,)
            overlap = bank[first] @ bank[idx].T  # (B, Ng): cosine of each candidate second with the first
            rest = proj[:, :, idx] - proj[:, rows, first][:, :, None] * overlap[None]  # residual's projections
            second = rest.pow(2).sum(0) / (1.0 - overlap.pow(2)).clamp_min(1e-3)
            second = second.masked_fill(overlap.abs() > 0.95, 0.0)  # the same shape again explains nothing new
            scores.append(fit[rows, first] + second.max(1).values)
        out.append(torch.stack(scores, 1) / variance[:, None])
    return torch.cat(out) if out else torch.empty(0, NUM_SHAPE_TYPES)


def classify_shape(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B,) int64 predicted shape type (compare with `shape_type(labels)`)."""
    return shape_scores(images).argmax(dim=-1)


def shape_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of pictures whose large shapes' type is their class's (chance: 20 %)."""
    if len(images) == 0:
        raise ValueError("shape_accuracy needs at least one image")
    return (classify_shape(images) == shape_type(labels.cpu())).float().mean().item()
