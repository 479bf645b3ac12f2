"""data.loader=dali on the CPU: the PIL crops within the stated tolerance (exactly, where nothing is resampled), the
torch loader's order, an exact resume after a kill, and bad or unusual files skipped, counted or decoded right."""
import io
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import MICRO_TOKENIZER, OneRank, photo_folder
from test_trainer import _cli, read_losses

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install -e .[dali])")

from semanticist_fast.common.runs import list_checkpoints  # noqa: E402
from semanticist_fast.data.dali import DaliImages, view_resizes_of  # noqa: E402
from semanticist_fast.data.folder import ImageFolderDataset  # noqa: E402
from semanticist_fast.data.loader import epoch_loader  # noqa: E402
from semanticist_fast.data.scan import DIRECT, REENCODE, UNREADABLE, Scan, build_scan, scan_folder  # noqa: E402
from semanticist_fast.data.shards import CacheError  # noqa: E402
from semanticist_fast.data.transforms import (  # noqa: E402
    adm_resize_plan, build_transform, center_crop_box, crop_views, ten_crop_boxes)

SIZE = 32
# Per pixel, 0-255 scale (the tolerance data/dali.py and the README state): where the PIL path resizes in one bicubic
# step, DALI's antialiased bicubic matches it closely; where PIL first halves with a BOX filter (the source's short
# side at least twice the target's), DALI's single step differs more, on fine texture most.
NO_HALVING_MEAN, NO_HALVING_MAX = 0.5, 16
HALVING_MEAN, HALVING_AVERAGE = 10.0, 4.0


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = photo_folder(tmp_path_factory.mktemp("photos"))
    folder = ImageFolderDataset(root, build_transform("random_crop", SIZE, True))
    scan = scan_folder(folder.samples, folder.root, tmp_path_factory.mktemp("scan"), OneRank, progress=False)
    return folder, DaliImages(folder, scan, folder.transform, torch.device("cpu"))


def dali_views(images: DaliImages, batches, boxes_for, view_resizes=(0,)) -> torch.Tensor:
    return torch.cat([x for x, _ in images.loader(batches, SIZE, boxes_for, view_resizes, squeeze=False)])


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs() * 255
    return d.mean().item(), d.max().item()


@pytest.mark.parametrize("kind", ["random_crop_flip", "center_crop", "ten_crop"])
def test_dali_crops_equal_pil_within_tolerance(photos, kind):
    folder, images = photos
    transform = folder.transform

    def boxes_for(index, w, h, generator):
        if kind == "random_crop_flip":
            return [transform.box(w, h, generator)]
        return [center_crop_box(w, h, SIZE)] if kind == "center_crop" else ten_crop_boxes(w, h, SIZE)

    n = len(folder)
    batches = [[(i, 1000 + i) for i in range(k, min(n, k + 8))] for k in range(0, n, 8)]
    got = dali_views(images, batches, boxes_for, view_resizes_of("ten_crop") if kind == "ten_crop" else (0,))
    halving = []
    regimes = set()
    for i in range(n):
        _, pil = folder.load(i)
        boxes = boxes_for(i, *pil.size, torch.Generator().manual_seed(1000 + i))
        want = crop_views(pil, boxes)  # the PIL path: ADM resize (BOX halvings, then bicubic), crop, flip
        if kind == "random_crop_flip":
            assert torch.equal(want[0], transform(pil, torch.Generator().manual_seed(1000 + i)))
        for v, box in enumerate(boxes):
            mean, peak = pixel_difference(got[i, v], want[v])
            halves = bool(adm_resize_plan(*pil.size, box.short_side)[0])
            regimes.add(halves)
            if halves:
                assert mean <= HALVING_MEAN, (folder.samples[i][0], v, mean)
                halving.append(mean)
            else:
                assert mean <= NO_HALVING_MEAN and peak <= NO_HALVING_MAX, (folder.samples[i][0], v, mean, peak)
    assert regimes == {False, True}  # both regimes were measured
    assert np.mean(halving) <= HALVING_AVERAGE


def test_without_resampling_dali_equals_pil_exactly(tmp_path):
    """Where no resize happens (the box's short side is the image's), DALI and PIL cut the same pixels: the crop
    geometry (offsets, flips, the ten-crop windows) is identical, only the filter ever differs."""
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    shapes = {"r": (SIZE, 45), "t33": (33, 40), "t35": (47, 35)}  # (h, w): short sides 32, 33 and 35
    for name, (h, w) in shapes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{name}.png")
    folder = ImageFolderDataset(tmp_path, build_transform("random_crop", SIZE, True))
    images = DaliImages(folder, scan_folder(folder.samples, folder.root, tmp_path / "scan", OneRank, progress=False),
                        folder.transform, torch.device("cpu"))
    names = [p.split("/")[-1].split(".")[0] for p, _ in folder.samples]
    r = names.index("r")
    unscaled = [s for s in range(200) if folder.transform.box(45, SIZE, torch.Generator().manual_seed(s)).short_side
                == SIZE]
    got = dali_views(images, [[(r, s) for s in unscaled[:12]]], lambda i, w, h, g: [folder.transform.box(w, h, g)])
    _, pil = folder.load(r)
    tops_lefts_flips = set()
    for k, s in enumerate(unscaled[:12]):
        box = folder.transform.box(*pil.size, torch.Generator().manual_seed(s))
        tops_lefts_flips.add((box.left, box.flip))
        assert torch.equal(got[k, 0], folder.transform(pil, torch.Generator().manual_seed(s)))
    assert len(tops_lefts_flips) > 3  # several offsets and both flips were compared
    for name, scale in (("t33", 0), ("t35", 1)):  # 33 = int(32 * 1.05), 35 = int(32 * 1.10)
        i = names.index(name)
        _, pil = folder.load(i)
        views = dali_views(images, [[(i, 0)]], lambda i, w, h, g: ten_crop_boxes(w, h, SIZE),
                           view_resizes_of("ten_crop"))[0]
        want = crop_views(pil, ten_crop_boxes(*pil.size, SIZE))
        for v in range(10 * scale, 10 * scale + 10):
            assert torch.equal(views[v], want[v]), (name, v)


def test_the_order_of_images_and_views_is_the_torch_loaders(photos):
    """Two ranks, two micro-batches each: every DALI batch holds the images of the torch loader's batch, in order."""
    folder, images = photos
    for rank in (0, 1):
        torch_batches = list(epoch_loader(folder, 8, seed=3, epoch=1, start_step=1, micro_batch=2, world_size=2,
                                          rank=rank))
        dali_batches = list(epoch_loader(images, 8, seed=3, epoch=1, start_step=1, micro_batch=2, world_size=2,
                                         rank=rank))
        assert len(torch_batches) == len(dali_batches) > 2
        for (xt, yt), (xd, yd) in zip(torch_batches, dali_batches):
            assert torch.equal(yt, yd)
            for a in range(len(xt)):
                # The same image and crop: closer to its torch twin than to anything else in the batch.
                distances = [pixel_difference(xd[a], xt[b])[0] for b in range(len(xt))]
                assert int(np.argmin(distances)) == a and distances[a] <= HALVING_MEAN


def _truncated_jpeg(pil) -> bytes:
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=90)
    return out.getvalue()[: len(out.getvalue()) // 2]


def test_corrupt_files_are_skipped_and_counted_and_unusual_ones_decode_to_the_pil_values(tmp_path):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (SIZE, 40, 3), dtype=np.uint8))
    folder_dir = tmp_path / "data" / "a"
    folder_dir.mkdir(parents=True)
    (folder_dir / "bad_truncated.jpg").write_bytes(_truncated_jpeg(rgb))
    (folder_dir / "bad_zero.jpg").write_bytes(b"")
    (folder_dir / "bad_text.jpg").write_text("this is not a picture\n")
    rgb.convert("CMYK").save(folder_dir / "cmyk.jpg", quality=95)
    rgb.convert("L").save(folder_dir / "grey.jpg", quality=95)
    rgb.convert("L").save(folder_dir / "grey.png")
    Image.fromarray((rng.integers(0, 65536, (SIZE, 40))).astype(np.uint16)).save(folder_dir / "grey16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder_dir / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (SIZE, 40), dtype=np.uint8)))
    rgba.save(folder_dir / "rgba.png")
    rgb.save(folder_dir / "rgb.jpg", quality=95)
    rgb.save(folder_dir / "rgb.png")
    folder = ImageFolderDataset(tmp_path / "data", build_transform("center_crop", SIZE, False))
    scan = scan_folder(folder.samples, folder.root, tmp_path / "scan", OneRank, progress=False)
    names = [p.split("/")[-1] for p, _ in folder.samples]
    status = dict(zip(names, scan.status.tolist()))
    assert [n for n, s in status.items() if s == UNREADABLE] == ["bad_text.jpg", "bad_truncated.jpg", "bad_zero.jpg"]
    assert {n for n, s in status.items() if s == DIRECT} == {"grey.jpg", "rgb.jpg", "rgb.png"}
    assert {n for n, s in status.items() if s == REENCODE} == {"cmyk.jpg", "grey.png", "grey16.png", "palette.png",
                                                               "rgba.png"}
    images = DaliImages(folder, scan, folder.transform, torch.device("cpu"))
    n = len(folder)
    got = torch.cat([x for x, _ in epoch_loader(images, n, seed=0, epoch=0)])
    want = torch.cat([x for x, _ in epoch_loader(folder, n, seed=0, epoch=0)])
    # A short side of 32 and a centre crop: nothing is resampled, so every file's values must be PIL's exactly
    # (CMYK converted as PIL converts it, 16-bit scaled from its range, transparency over white).
    assert torch.equal(got, want)
    assert images.num_skipped == folder.num_skipped == 3
    for i, name in enumerate(names):
        if name.startswith("bad_"):  # replaced, as ImageFolderDataset replaces it, by the next readable file
            _, size, label = images.read(i)
            j, pil = folder.load(i)
            assert j != i and size == pil.size and label == folder.samples[j][1]


def test_a_file_changed_since_the_scan_is_checked_again(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "d" / "a").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "d" / "a" / f"{k}.jpg")
    folder = ImageFolderDataset(tmp_path / "d", build_transform("center_crop", SIZE, False))
    scan = scan_folder(folder.samples, folder.root, tmp_path / "scan", OneRank, progress=False)
    (tmp_path / "d" / "a" / "0.jpg").write_bytes(b"\xff\xd8 truncated")  # broken after the scan said readable
    Image.fromarray(rng.integers(0, 256, (SIZE + 8, SIZE, 3), dtype=np.uint8)).convert("CMYK").save(
        tmp_path / "d" / "a" / "1.jpg")  # now CMYK, and another size
    images = DaliImages(folder, scan, folder.transform, torch.device("cpu"))
    fresh = ImageFolderDataset(tmp_path / "d", build_transform("center_crop", SIZE, False))
    got = torch.cat([x for x, _ in epoch_loader(images, 3, seed=0, epoch=0)])
    want = torch.cat([x for x, _ in epoch_loader(fresh, 3, seed=0, epoch=0)])
    assert images.num_skipped == fresh.num_skipped == 1
    for a in range(3):
        assert pixel_difference(got[a], want[a])[0] <= NO_HALVING_MEAN


def test_the_scan_resumes_splits_across_ranks_and_refuses_another_file_list(photos, tmp_path):
    folder, _ = photos
    samples, root = folder.samples, folder.root
    whole = build_scan(samples, root, tmp_path / "whole", shard_size=10, progress=False)
    part = build_scan(samples, root, tmp_path / "part", shard_size=10, progress=False, rank=1, world_size=2)
    with pytest.raises(CacheError, match="incomplete"):
        Scan(part, samples, root)
    build_scan(samples, root, part, shard_size=10, progress=False, rank=0, world_size=2, stop_after_shards=1)
    build_scan(samples, root, part, shard_size=10, progress=False, rank=0, world_size=2)
    a, b = Scan(whole, samples, root), Scan(part, samples, root)
    for name in ("status", "width", "height", "bytes", "crc32"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert (a.width == [Image.open(p).width for p, _ in samples]).all()
    with pytest.raises(CacheError, match="another list of files"):
        Scan(whole, samples[:-1], root)
    with pytest.raises(CacheError, match="files_sha256"):
        build_scan(samples[1:], root, whole, shard_size=10, progress=False)


def test_a_killed_dali_run_resumes_exactly(tmp_path):
    root = photo_folder(tmp_path / "photos", short_sides=(20, 28, 40))
    folder_data = MICRO_TOKENIZER + ["data.dataset=folder", f"data.root={root}", "train.ckpt_every=2",
                                     "train.batch_size=4"]
    overrides = folder_data + ["data.loader=dali", f"data.scan_dir={tmp_path / 'scan'}", "train.epochs=4"]
    ref = tmp_path / "ref"
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(ref), *overrides)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "semanticist_fast", "train", "configs/tokenizer_tiny.yaml",
                             "--out", str(out), *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(out)) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(out), "the run was killed before its first checkpoint"
    assert list_checkpoints(out)[-1].name < list_checkpoints(ref)[-1].name, "the run finished before the kill"
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(out), "--resume", *overrides)
    assert r.returncode == 0, r.stderr
    assert read_losses(out) == read_losses(ref)
    # The DALI run read the torch loader's images: its first loss is the torch run's, up to the filter difference.
    torch_run = tmp_path / "torch"
    r = _cli("train", "configs/tokenizer_tiny.yaml", "--out", str(torch_run), *folder_data, "train.epochs=1")
    assert r.returncode == 0, r.stderr
    assert read_losses(torch_run)[1] == pytest.approx(read_losses(ref)[1], rel=0.05)


def test_loader_dali_needs_image_files():
    from semanticist_fast.config import ConfigError
    from helpers import micro_tokenizer_run

    with pytest.raises((ConfigError, ValueError), match="data.dataset=folder"):
        micro_tokenizer_run("data.loader=dali")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the nvJPEG pipeline needs a GPU (gpu_suite.sh)"))])
def test_the_pipeline_is_built_once_and_refed_every_epoch(photos, monkeypatch, device):
    """Three epochs (one left part-way) through one DaliImages: one build for the full epochs; each epoch's batches
    equal those of a pipeline built for it alone."""
    from nvidia.dali import Pipeline

    folder, fresh = photos
    builds = []  # every call (run() calls build() too, which returns at once once built); the pipelines built
    build = Pipeline.build
    monkeypatch.setattr(Pipeline, "build", lambda self: (builds.append(self), build(self))[1])

    def pipelines() -> int:
        return len({id(p) for p in builds})

    def epoch(images, e):
        return list(epoch_loader(images, 4, seed=5, epoch=e, start_step=0, micro_batch=4, world_size=1, rank=0))

    images = DaliImages(folder, fresh.scan, folder.transform, torch.device(device))
    got = [epoch(images, e) for e in range(3)]
    assert pipelines() == 1
    for e in range(3):
        want = epoch(DaliImages(folder, fresh.scan, folder.transform, torch.device(device)), e)
        assert len(got[e]) == len(want) > 2
        for (x, y), (xw, yw) in zip(got[e], want):
            assert torch.equal(y, yw) and torch.equal(x, xw)
    assert not torch.equal(got[0][0][1], got[1][0][1])  # the epochs' orders differ: each epoch was fed its own
    # An epoch left after one batch keeps prefetched batches: the next one gets a new pipeline, and is right.
    partial = iter(epoch_loader(images, 4, seed=5, epoch=3, start_step=0, micro_batch=4, world_size=1, rank=0))
    next(partial)
    builds.clear()
    again = epoch(images, 0)
    assert pipelines() == 1  # a new pipeline
    assert all(torch.equal(y, yw) and torch.equal(x, xw) for (x, y), (xw, yw) in zip(again, got[0]))
