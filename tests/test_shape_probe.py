"""The built-in data's shape probe: it names the large shapes' group on held-out originals, and only from the shapes."""
import math

import numpy as np
import torch

from semanticist_fast.data.procedural import DIAMOND, SQUARE, ProceduralImages, _shape_sdf
from semanticist_fast.data.shape_probe import SHAPE_GROUPS, shape_accuracy, shape_group, shape_scores

HELD_OUT = 120  # 12 of each class, from the val split (the probe has seen no split: it trains nothing)


def held_out(size=32):
    return ProceduralImages(size, HELD_OUT, split="val").get_batch(range(HELD_OUT))


def test_square_and_diamond_are_one_shape():
    # why the probe names four groups: a square turned by 45 degrees covers the diamond's pixels
    c = (np.arange(128) + 0.5) / 128
    square = _shape_sdf(c[None], c[:, None], 0.5, 0.5, 0.25, 0.3, SQUARE) < 0
    diamond = _shape_sdf(c[None], c[:, None], 0.5, 0.5, 0.25, 0.3 + math.pi / 4, DIAMOND) < 0
    assert (square != diamond).mean() < 0.005
    assert shape_group(torch.tensor([SQUARE, DIAMOND, SQUARE + 5])).unique().tolist() == [1]


def test_probe_names_the_shape_group_of_originals():
    x, y = held_out()
    scores = shape_scores(x)
    assert scores.shape == (HELD_OUT, len(SHAPE_GROUPS)) and (scores >= 0).all() and (scores <= 1 + 1e-5).all()
    assert shape_accuracy(x, y) >= 0.75  # 82 % on 300 held-out images; always one group would score at most 40 %
    assert shape_accuracy(x * 2 - 1, y) == shape_accuracy(x, y)  # any affine range reads the same
    assert shape_accuracy(ProceduralImages(64, HELD_OUT, split="val").get_batch(range(HELD_OUT))[0], y) >= 0.7


def test_probe_is_near_chance_without_the_shapes():
    x, y = held_out()
    wrong = y[torch.randperm(HELD_OUT, generator=torch.Generator().manual_seed(0))]
    assert shape_accuracy(x, wrong) < 0.45
    # the large shapes blurred away (coarse background and colours kept): the probe can no longer tell
    coarse = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 8), size=32, mode="bilinear")
    assert shape_accuracy(coarse, y) < 0.45
