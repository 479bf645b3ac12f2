"""The one seed scheme: every random stream is a pure function of integer keys (seed, stream, epoch, index)."""
import torch

_MASK64 = (1 << 64) - 1

# The streams of a training run, so that the data order, each item's augmentation, the loader and the losses'
# per-sample draws (common/noise.py) never share a seed.
ORDER_STREAM, ITEM_STREAM, LOADER_STREAM, NOISE_STREAM = 1, 2, 3, 4


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed that is a pure function of the integer keys (e.g. seed, stream, index).

    Chained splitmix64 rather than arithmetic like `seed * 1000 + index`, which collides across keys.
    """
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h


def seeded_generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g
