"""benchmarks/photo_tiles.py's training tiles in colour rotations: each tile as cut, then with its channels cycled."""
import torch
from PIL import Image

from benchmarks.photo_tiles import TILE, cut_tiles
from semanticist_fast.data.transforms import to_tensor


def test_colour_rotations_cycle_each_tiles_channels(tmp_path):
    photo = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(0))
    Image.fromarray((photo.permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / "photo.png")
    plain, turned = tmp_path / "plain", tmp_path / "turned"
    plain.mkdir(), turned.mkdir()
    n = cut_tiles(tmp_path / "photo.png", plain, (60,), 16)
    assert cut_tiles(tmp_path / "photo.png", turned, (60,), 16, colour_rotations=3) == 3 * n
    for tile in plain.iterdir():
        x = to_tensor(Image.open(tile))
        assert x.shape == (3, TILE, TILE)
        assert torch.equal(to_tensor(Image.open(turned / tile.name)), x)
        assert torch.equal(to_tensor(Image.open(turned / f"{tile.stem}-c1.png")), x[[1, 2, 0]])  # GBR
        assert torch.equal(to_tensor(Image.open(turned / f"{tile.stem}-c2.png")), x[[2, 0, 1]])  # BRG
