"""The built-in data's shape probe: it names the large shapes' type on held-out originals, and only from the shapes."""
import math

import numpy as np
import pytest
import torch

from semanticist_fast.data import procedural
from semanticist_fast.data.procedural import DIAMOND, NUM_SHAPE_TYPES, SQUARE, ProceduralImages, _shape_sdf, _turn
from semanticist_fast.data.shape_probe import SHAPE_TYPES, classify_shape, shape_accuracy, shape_scores, shape_type

HELD_OUT = 150  # 15 of each class, from the val split (the probe has seen no split: it trains nothing)


def held_out(size=32):
    return ProceduralImages(size, HELD_OUT, split="val").get_batch(range(HELD_OUT))


def test_squares_and_diamonds_are_told_apart_by_their_turn():
    # one polygon 45 degrees apart: the generator keeps each near its own orientation, so no drawn square is a diamond
    c = (np.arange(128) + 0.5) / 128

    def drawn(kind, u):
        return _shape_sdf(c[None], c[:, None], 0.5, 0.5, 0.2, _turn(kind, u), kind) < 0

    closest = min((drawn(SQUARE, a) != drawn(DIAMOND, b)).mean() for a in (0.0, 0.5, 0.999) for b in (0.0, 0.5, 0.999))
    assert closest > 0.02
    # and turned by 45 degrees the square would be the diamond, which is why the turn is limited
    square_45 = _shape_sdf(c[None], c[:, None], 0.5, 0.5, 0.2, math.pi / 4, SQUARE) < 0
    assert (square_45 != drawn(DIAMOND, 0.5)).mean() < 0.005
    assert SHAPE_TYPES[SQUARE] == "squares" and shape_type(torch.tensor([SQUARE + 5, DIAMOND])).tolist() == [1, 2]


def test_probe_names_the_shape_type_of_originals():
    x, y = held_out()
    scores = shape_scores(x)
    assert scores.shape == (HELD_OUT, NUM_SHAPE_TYPES) and (scores >= 0).all() and (scores <= 1 + 1e-5).all()
    predicted = classify_shape(x)
    for kind in range(NUM_SHAPE_TYPES):  # every type, not only on average (97 % of 500 held-out images)
        assert (predicted[shape_type(y) == kind] == kind).float().mean() >= 0.85, SHAPE_TYPES[kind]
    assert shape_accuracy(x, y) >= 0.9
    assert shape_accuracy(x * 2 - 1, y) == shape_accuracy(x, y)  # any affine range reads the same
    assert shape_accuracy(ProceduralImages(64, HELD_OUT, split="val").get_batch(range(HELD_OUT))[0], y) >= 0.9


def test_probe_is_near_chance_without_the_shapes():
    x, y = held_out()
    wrong = y[torch.randperm(HELD_OUT, generator=torch.Generator().manual_seed(0))]
    assert shape_accuracy(x, wrong) < 0.35
    # the large shapes blurred away (coarse background and colours kept): the probe can no longer tell
    coarse = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 8), size=32, mode="bilinear")
    assert shape_accuracy(coarse, y) < 0.35


def test_probe_fails_on_free_turns(monkeypatch):
    # The generator's squares and diamonds turned freely (as before this probe) are one shape again: the probe,
    # which holds each at its own turns, must then miss about half of them. A probe that read anything but the
    # shapes, or a generator that ignored its turn limit, would not.
    monkeypatch.setattr(procedural, "_turn", lambda kind, u: math.pi * u)
    x, y = ProceduralImages(32, 100, split="val").get_batch(range(100))
    squarish = (shape_type(y) == SQUARE) | (shape_type(y) == DIAMOND)
    assert (classify_shape(x[squarish]) == shape_type(y[squarish])).float().mean() < 0.7


@pytest.mark.parametrize("kind", range(NUM_SHAPE_TYPES))
def test_probe_names_a_lone_shape(kind):
    # one large shape of each type alone on grey, at the generator's turns: the cleanest case
    size = 32
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    images = []
    for u in (0.1, 0.6):
        mask = np.clip(0.5 - _shape_sdf(c[None], c[:, None], 0.4 + 0.2 * u, 0.45, 0.2, _turn(kind, u), kind) * size, 0, 1)
        images.append(torch.from_numpy(0.3 + 0.5 * mask).float().expand(3, size, size))
    assert classify_shape(torch.stack(images)).tolist() == [kind, kind]
