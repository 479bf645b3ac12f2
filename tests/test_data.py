import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from semanticist_fast.common.seeds import derive_seed, seeded_generator
from semanticist_fast.data.folder import ImageFolderDataset
from semanticist_fast.data.procedural import ProceduralImages, class_signature, classify
from semanticist_fast.data.transforms import (
    build_transform,
    center_crop_arr,
    random_crop_arr,
    random_hflip,
    ten_crop_sizes,
    ten_crop_views,
    to_tensor,
)


def _u8_image(h: int, w: int, seed: int) -> tuple[np.ndarray, Image.Image]:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return arr, Image.fromarray(arr)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)


# ---------------------------------------------------------------- procedural


@pytest.mark.parametrize("size", [17, 32, 64])
def test_procedural_shape_range_dtype(size):
    ds = ProceduralImages(size, 30, num_classes=10)
    for i in (0, 7, 29):
        x, y = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert isinstance(y, int) and 0 <= y < 10
    assert len(ds) == 30
    with pytest.raises(IndexError):
        ds[30]


def test_procedural_determinism_and_streams():
    a = ProceduralImages(32, 100, split="train", seed=3)
    b = ProceduralImages(32, 100, split="train", seed=3)
    x1, y1 = a[41]
    x2, y2 = a[41]
    x3, y3 = b[41]
    assert torch.equal(x1, x2) and torch.equal(x1, x3) and y1 == y2 == y3
    other_seed = ProceduralImages(32, 100, split="train", seed=4)[41][0]
    assert (x1 - other_seed).abs().mean() > 0.01
    train, _ = a.get_batch(range(100))
    val, _ = ProceduralImages(32, 100, split="val", seed=3).get_batch(range(100))
    # Train and val share no image: every cross pair differs clearly.
    dist = torch.cdist(train.flatten(1), val.flatten(1))
    assert dist.min() > 1.0
    # Items within a split differ too.
    within = torch.cdist(train.flatten(1), train.flatten(1)) + torch.eye(100) * 1e9
    assert within.min() > 1.0
    with pytest.raises(ValueError):
        ProceduralImages(32, 10, split="test")


def test_procedural_get_batch_matches_items_and_balanced_labels():
    ds = ProceduralImages(24, 50, num_classes=7)
    idx = [3, 0, 49, 12]
    xs, ys = ds.get_batch(idx)
    for k, i in enumerate(idx):
        x, y = ds[i]
        assert torch.equal(xs[k], x) and ys[k].item() == y
    labels = torch.tensor([ds[i][1] for i in range(49)])
    assert torch.equal(torch.bincount(labels, minlength=7), torch.full((7,), 7))


def test_procedural_resolution_independent():
    hi, _ = ProceduralImages(64, 16, seed=1).get_batch(range(16))
    lo, _ = ProceduralImages(32, 16, seed=1).get_batch(range(16))
    # Drawn in normalised coordinates: the 64px item box-filtered to 32px is the 32px item.
    assert (F.avg_pool2d(hi, 2) - lo).abs().mean() < 0.01
    assert (lo - lo.mean(dim=(2, 3), keepdim=True)).abs().mean() > 0.05  # not trivially flat


@pytest.mark.parametrize("size", [32, 64])
def test_procedural_has_coarse_and_fine_content(size):
    x, _ = ProceduralImages(size, 64).get_batch(range(64))
    var = x.var()

    def residual(factor):
        low = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)
        return ((x - low) ** 2).mean() / var

    # A 4x4 thumbnail keeps most of the variance (coarse part) but not all of it (detail left over).
    assert residual(size // 4) < 0.5
    assert residual(size // 4) > 0.1
    assert residual(2) > 0.01  # edges and stripes at the pixel scale


@pytest.mark.parametrize("size", [32, 64])
def test_class_signature_accuracy(size):
    ds = ProceduralImages(size, 200, split="val", num_classes=10)
    x, y = ds.get_batch(range(200))
    sig = class_signature(x)
    assert sig.shape == (200, 10)
    assert torch.equal(sig.argmax(-1), classify(x))
    assert (classify(x) == y).float().mean() > 0.9
    assert torch.equal(ds.classify(x), classify(x, 10))


def test_class_signature_robust_and_other_class_counts():
    ds = ProceduralImages(32, 140, split="val", num_classes=7, seed=5)
    x, y = ds.get_batch(range(140))
    assert (classify(x, 7) == y).float().mean() > 0.9
    # Blurry, noisy renditions (what a weak generator produces) keep their class.
    g = torch.Generator().manual_seed(0)
    degraded = F.avg_pool2d(x, 4) + 0.1 * torch.randn(140, 3, 8, 8, generator=g)
    assert (classify(degraded, 7) == y).float().mean() > 0.9
    torch.testing.assert_close(class_signature(x * 2 - 1, 7), class_signature(x, 7), atol=1e-5, rtol=0)
    # Grey images carry no class evidence: all scores are equal.
    grey = torch.full((2, 3, 8, 8), 0.5)
    sig = class_signature(grey, 7)
    assert torch.allclose(sig, torch.zeros_like(sig))


def test_procedural_in_dataloader():
    loader = DataLoader(ProceduralImages(16, 10), batch_size=4)
    shapes = [(x.shape, y.shape) for x, y in loader]
    assert shapes[0] == (torch.Size([4, 3, 16, 16]), torch.Size([4]))
    assert len(shapes) == 3


def test_derive_seed_distinguishes_key_order():
    seeds = {derive_seed(0, 0, 1), derive_seed(0, 1, 0), derive_seed(1, 0, 0), derive_seed(0, 0, 0)}
    assert len(seeds) == 4
    assert derive_seed(3, 4) == derive_seed(3, 4)


# ---------------------------------------------------------------- transforms


def test_center_crop_box_downsample_hand_computed():
    # 6x8 image with values that are multiples of 4, so each 2x2 box mean is an exact integer.
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 64, size=(6, 8, 3)) * 4).astype(np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 3)
    # Short side 6 >= 2*3: one BOX halving to 3x4; bicubic to short side 3 is the identity;
    # centre crop offsets ((4-3)//2, (3-3)//2) = (0, 0).
    halved = arr.astype(np.float64).reshape(3, 2, 4, 2, 3).mean(axis=(1, 3))
    expected = halved[0:3, 0:3]
    assert out.shape == (3, 3, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, _as_tensor(expected.astype(np.uint8)), rtol=0, atol=1e-6)


def test_center_crop_without_resize_landscape_and_portrait():
    arr, pil = _u8_image(3, 5, seed=1)  # H=3, W=5: short side already 3
    torch.testing.assert_close(center_crop_arr(pil, 3), _as_tensor(arr[:, 1:4]))
    arr, pil = _u8_image(7, 3, seed=2)  # portrait: rows (7-3)//2 = 2 .. 4
    torch.testing.assert_close(center_crop_arr(pil, 3), _as_tensor(arr[2:5, :]))


def test_center_crop_bicubic_step_and_mode_conversion():
    arr, pil = _u8_image(45, 70, seed=3)
    out = center_crop_arr(pil, 30)
    # 45 < 60, so no halving: one bicubic resize to short side 30 (70 * 30/45 = 46.67 -> 47), crop x 8.
    ref = to_tensor(pil.resize((47, 30), resample=Image.BICUBIC))[:, :, 8:38]
    torch.testing.assert_close(out, ref)
    grey = Image.fromarray(arr[..., 0])  # mode "L" becomes 3 equal channels
    g = center_crop_arr(grey, 16)
    assert g.shape == (3, 16, 16) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


def test_random_crop_determinism_and_windows():
    arr, pil = _u8_image(20, 29, seed=4)
    a = random_crop_arr(pil, 20, 1.0, 1.0, generator=seeded_generator(7))
    b = random_crop_arr(pil, 20, 1.0, 1.0, generator=seeded_generator(7))
    assert torch.equal(a, b)
    # With crop fraction exactly 1 and short side == size there is no resize: every crop is a window
    # of the original, and over many seeds all 10 horizontal offsets appear.
    full = _as_tensor(arr)
    seen = set()
    for s in range(200):
        c = random_crop_arr(pil, 20, 1.0, 1.0, generator=seeded_generator(s))
        matches = [x0 for x0 in range(10) if torch.equal(c, full[:, :, x0 : x0 + 20])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(10))
    big = random_crop_arr(_u8_image(90, 130, seed=5)[1], 32, generator=seeded_generator(0))
    assert big.shape == (3, 32, 32) and 0 <= big.min() and big.max() <= 1


def test_random_crop_scale_range():
    # On a horizontal ramp the crop's slope reveals the short side d the image was resized to:
    # ADM draws d uniformly from [ceil(size / max_frac), ceil(size / min_frac)] = [16, 32] here.
    ramp = np.repeat(np.round(np.arange(64) * 255 / 63).astype(np.uint8)[None, :, None], 64, axis=0)
    pil = Image.fromarray(np.repeat(ramp, 3, axis=2))
    estimates = []
    for s in range(100):
        c = random_crop_arr(pil, 16, min_crop_frac=0.5, max_crop_frac=1.0, generator=seeded_generator(s))
        row = c[0, 8] * 255
        slope = (row[13] - row[2]).item() / 11  # interior columns: resampling keeps a ramp linear
        estimates.append(64 * 255 / (63 * slope))
    assert min(estimates) > 15 and max(estimates) < 33.5
    assert min(estimates) < 18 and max(estimates) > 29


def test_random_hflip():
    x = torch.rand(3, 5, 7)
    flips = 0
    for s in range(200):
        y = random_hflip(x, seeded_generator(s))
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
        assert torch.equal(y, random_hflip(x, seeded_generator(s)))
        flips += int(torch.equal(y, x.flip(-1)))
    assert 60 < flips < 140


def test_ten_crop_views_order_and_flips():
    assert ten_crop_sizes(256) == (268, 281)
    arr, pil = _u8_image(50, 61, seed=6)
    size = 32
    views = ten_crop_views(pil, size)
    assert len(views) == 20
    assert all(v.shape == (3, size, size) and v.dtype == torch.float32 for v in views)
    for s, big in enumerate(ten_crop_sizes(size)):  # 33 and 35
        square = center_crop_arr(pil, big)
        far, mid = big - size, (big - size) // 2
        offsets = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
        for p, (t, l) in enumerate(offsets):
            torch.testing.assert_close(views[10 * s + p], square[:, t : t + size, l : l + size], rtol=0, atol=0)
            torch.testing.assert_close(views[10 * s + 5 + p], views[10 * s + p].flip(-1), rtol=0, atol=0)
    # The two scales see different framings.
    assert not torch.equal(views[4], views[14])


def test_ten_crop_views_full_size():
    _, pil = _u8_image(300, 400, seed=7)
    views = ten_crop_views(pil)
    assert len(views) == 20 and all(v.shape == (3, 256, 256) for v in views)


def test_build_transform():
    _, pil = _u8_image(40, 50, seed=8)
    center = build_transform("center_crop", 24, hflip=False)
    assert torch.equal(center(pil, seeded_generator(0)), center_crop_arr(pil, 24))
    train = build_transform("random_crop", 24, hflip=True)
    a = train(pil, seeded_generator(1))
    assert a.shape == (3, 24, 24)
    assert torch.equal(a, train(pil, seeded_generator(1)))
    outs = {train(pil, seeded_generator(s)).sum().item() for s in range(10)}
    assert len(outs) > 1
    restored = pickle.loads(pickle.dumps(train))  # DataLoader workers need this
    assert torch.equal(restored(pil, seeded_generator(1)), a)
    with pytest.raises(ValueError):
        build_transform("resize", 24, hflip=False)


# ---------------------------------------------------------------- image folder


def _solid(path, rgb, size=(12, 10)):
    Image.new("RGB", size, rgb).save(path, lossless=True)  # lossless only matters for webp


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    (root / "dog").mkdir(parents=True)
    (root / "cat" / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    _solid(root / "cat" / "a.png", (255, 0, 0))
    (root / "cat" / "b.jpg").write_bytes(b"this is not a jpeg")  # corrupt: replaced by c.png
    _solid(root / "cat" / "c.png", (0, 255, 0))
    _solid(root / "cat" / "sub" / "d.webp", (0, 0, 255), size=(9, 14))
    (root / "cat" / "notes.txt").write_text("ignored")
    _solid(root / ".cache" / "x.png", (1, 2, 3))  # hidden folder: not a class
    Image.new("L", (16, 16), 200).save(root / "dog" / "e.png")  # greyscale: converted to RGB
    _u8_image(64, 64, seed=0)[1].save(root / "dog" / "f.png")
    png = (root / "dog" / "f.png").read_bytes()
    # Truncated: the header parses, the decode fails; replaced by the next item (wraps to a.png).
    (root / "dog" / "f.png").write_bytes(png[: len(png) // 2])
    return root


def test_image_folder_layout_labels_and_skips(folder, caplog):
    ds = ImageFolderDataset(folder)
    assert ds.classes == ["cat", "dog"]
    names = [p.split("/")[-1] for p, _ in ds.samples]
    assert names == ["a.png", "b.jpg", "c.png", "d.webp", "e.png", "f.png"]
    assert ds.targets == [0, 0, 0, 0, 1, 1]
    with caplog.at_level(logging.WARNING, logger="semanticist_fast.data.folder"):
        items = [ds[i] for i in range(len(ds))]
    colours = [tuple((x[:, 0, 0] * 255).round().int().tolist()) for x, _ in items]
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 255, 0), (0, 0, 255), (200, 200, 200), (255, 0, 0)]
    # Labels belong to the image actually returned (f.png wraps around to a.png, a cat).
    assert [y for _, y in items] == [0, 0, 0, 0, 1, 0]
    assert items[3][0].shape == (3, 14, 9)
    assert ds.num_skipped == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "b.jpg" in logged and "f.png" in logged and "truncated" in logged
    ds[1]  # a known-bad file is neither re-read, re-counted nor re-logged
    assert ds.num_skipped == 2
    assert len(caplog.records) == 2


def test_image_folder_transform_seeding(tmp_path):
    (tmp_path / "c").mkdir()
    for k in range(3):
        _u8_image(20, 27, seed=10 + k)[1].save(tmp_path / "c" / f"{k}.png")
    ds = ImageFolderDataset(tmp_path, transform=build_transform("random_crop", 8, hflip=True), seed=3)
    a, _ = ds[1]
    assert a.shape == (3, 8, 8)
    assert torch.equal(ds[1][0], a)  # the same item in the same epoch: the same augmentation
    assert not torch.equal(ImageFolderDataset(tmp_path, ds.transform, seed=4)[1][0], a)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        seen.add(ds[1][0].sum().item())
    assert len(seen) > 4


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_in_dataloader(folder, workers):
    ds = ImageFolderDataset(folder, transform=build_transform("center_crop", 8, hflip=False))
    loader = DataLoader(ds, batch_size=3, num_workers=workers)
    xs, ys = zip(*loader)
    assert torch.cat(xs).shape == (6, 3, 8, 8)
    assert torch.cat(ys).tolist() == [0, 0, 0, 0, 1, 0]


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist.*class_name"):
        ImageFolderDataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found under .*empty"):
        ImageFolderDataset(empty)
    # One class folder without images among good ones: it would silently become a class (and shift labels).
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    _solid(mixed / "a" / "img.png", (0, 0, 0))
    (mixed / "b").mkdir()
    (mixed / "b" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="class folder .*mixed/b.* holds no images"):
        ImageFolderDataset(mixed)
    flat = tmp_path / "flat"
    flat.mkdir()
    _solid(flat / "img.png", (0, 0, 0))  # images directly under root, no class folders
    with pytest.raises(FileNotFoundError, match="class folders found: 0"):
        ImageFolderDataset(flat)
    allbad = tmp_path / "allbad"
    (allbad / "c").mkdir(parents=True)
    (allbad / "c" / "x.png").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="no readable image"):
        ImageFolderDataset(allbad)[0]
