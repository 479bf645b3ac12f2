"""Stage 1's latent cache: exact posteriors per view, resumed and shared builds, stale caches refused by field, and
training from it equal to training from the online VAE on the same views with the same noise."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import MICRO_TOKENIZER, OneRank, micro_tokenizer_run, photo_folder
from test_trainer import read_losses
from semanticist_fast.cli import main as cli_main
from semanticist_fast.common.noise import BatchNoise
from semanticist_fast.data.latent_cache import LatentCache, LatentViews, build_latent_cache
from semanticist_fast.data.procedural import ProceduralImages
from semanticist_fast.data.shards import CacheError
from semanticist_fast.data.token_cache import image_views
from semanticist_fast.models.latent_codec import CodecConfig, KL16Codec
from semanticist_fast.models.vae_kl import AutoencoderKL, VAEConfig, save_autoencoder_kl, small_test_config
from semanticist_fast.tasks import TASKS, train
from semanticist_fast.tasks.tokenizer_stage import TokenizerTask, build_latent_cache_for_run

SIZE = 16


def save_vae(path, seed=0):
    torch.manual_seed(seed)
    save_autoencoder_kl(AutoencoderKL(VAEConfig.from_dict(small_test_config())), small_test_config(), str(path))
    return path


def kl16_overrides(vae) -> list[str]:
    return ["model.codec.kind=kl16", f"model.codec.path={vae}", "model.codec.latent_channels=4",
            "model.codec.downsample=4", "model.decoder.patch_size=2", "data.num_items=16"]


@pytest.fixture
def vae(tmp_path):
    return save_vae(tmp_path / "vae")


def codec_of(vae):
    return KL16Codec(CodecConfig(kind="kl16", path=str(vae), latent_channels=4, downsample=4))


def build(codec, data, cache, **kw):
    args = dict(codec_weights_sha256="a" * 64, views="center_flip", image_size=SIZE, images={"test": 1},
                device=torch.device("cpu"), shard_size=8, batch_size=8, progress=False)
    args.update(kw)
    return build_latent_cache(codec, dataset=data, cache_dir=cache, **args)


def test_the_cache_holds_each_views_posterior_in_fp16(vae, tmp_path, one_thread):
    codec, data = codec_of(vae), ProceduralImages(20, 20, split="train", num_classes=5)  # 20 px, cut to 16
    cache = LatentCache(build(codec, data, tmp_path / "cache", views="ten_crop", batch_size=40))
    assert len(cache) == 20 and cache.num_views == 20 and cache.mean[0].dtype == np.float16
    for i in (0, 7, 19):
        views = image_views(data[i][0], "ten_crop", SIZE)
        mean, logvar = codec.posterior(views)
        for v in (0, 5, 13):
            m, lv = cache.read(i, v)
            torch.testing.assert_close(m, mean[v].half().float(), rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(lv, logvar[v].half().float(), rtol=1e-3, atol=1e-3)
    assert not torch.equal(cache.read(3, 0)[0], cache.read(3, 5)[0])  # a view and its mirror differ


def test_an_interrupted_build_resumes_and_ranks_build_disjoint_shares(vae, tmp_path, one_thread):
    codec, data = codec_of(vae), ProceduralImages(SIZE, 20, split="train", num_classes=5)
    whole = build(codec, data, tmp_path / "whole")
    part = build(codec, data, tmp_path / "part", stop_after_shards=1)
    with pytest.raises(CacheError, match="incomplete"):
        LatentCache(part)
    first = (part / "mean-00000.npy").stat().st_mtime_ns
    build(codec, data, part)
    assert (part / "mean-00000.npy").stat().st_mtime_ns == first  # finished shards are not redone
    shared = tmp_path / "shared"
    build(codec, data, shared, rank=1, world_size=2)
    assert sorted(p.name for p in shared.glob("shard-*.json")) == ["shard-00001.json"]
    build(codec, data, shared, rank=0, world_size=2)
    for other in (part, shared):
        for s in range(3):
            for name in ("mean", "logvar"):
                assert np.array_equal(np.load(whole / f"{name}-{s:05d}.npy"), np.load(other / f"{name}-{s:05d}.npy"))


def test_a_stale_cache_is_refused_with_the_field_named(vae, tmp_path, one_thread):
    codec, data = codec_of(vae), ProceduralImages(SIZE, 12, split="train", num_classes=5)
    cache = build(codec, data, tmp_path / "cache")
    with pytest.raises(CacheError, match="views"):
        build(codec, data, cache, views="ten_crop")
    with pytest.raises(CacheError, match="codec_weights_sha256"):
        build(codec, data, cache, codec_weights_sha256="b" * 64)
    ok = {"codec_weights_sha256": "a" * 64, "image_size": SIZE, "images": {"test": 1}}
    LatentCache(cache, ok)
    for field, value in (("image_size", 32), ("images", {"test": 2}), ("latent_shape", [4, 8, 8])):
        with pytest.raises(CacheError, match=field):
            LatentCache(cache, {**ok, field: value})
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["crop"]["ten_crop_scales"] = [1.0, 1.2]  # cut by other code: the pixels would not match
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="crop"):
        LatentCache(cache, ok)


def test_a_run_refuses_a_cache_of_another_vae_or_other_data(vae, tmp_path, one_thread):
    run = micro_tokenizer_run(*kl16_overrides(vae))
    cache, complete = build_latent_cache_for_run(run, tmp_path / "cache", "center", shard_size=8, progress=False)
    assert complete
    other = save_vae(tmp_path / "other_vae", seed=1)
    for extra, field in ((kl16_overrides(other), "codec_weights_sha256"), (["data.num_items=24"], "images")):
        with pytest.raises(CacheError, match=field):
            train(micro_tokenizer_run(*kl16_overrides(vae), *extra, f"data.latents={cache}"), tmp_path / field)


def test_the_loss_from_a_cached_posterior_is_the_online_loss(vae, one_thread):
    """Same images, same noise: sampling the posterior from the batch equals encoding online, bit for bit in fp32,
    and within fp16 rounding from a cache's fp16 values."""
    run = micro_tokenizer_run(*kl16_overrides(vae))
    task = TokenizerTask(run, torch.device("cpu"), None)
    images = torch.stack([ProceduralImages(SIZE, 8, split="train")[i][0] for i in range(8)])
    labels = torch.zeros(8, dtype=torch.long)
    mean, logvar = task.codec.posterior(images)

    def loss(batch):
        torch.manual_seed(0)
        return task.loss(task.model, batch, step=3, epoch=5, rng=BatchNoise(11, 8, slice(0, 8), "cpu"))[0].item()

    online = loss((images, labels))
    assert loss((images, labels, mean, logvar)) == online
    assert loss((images, labels, mean.half().float(), logvar.half().float())) == pytest.approx(online, rel=1e-3)
    assert loss((images, labels, mean + 1, logvar)) != pytest.approx(online, rel=1e-3)  # the posterior is used


class OnlineViews(torch.utils.data.Dataset):
    """The cached run's views without their posteriors: the online VAE encodes the same pixels."""

    def __init__(self, views: LatentViews):
        self.views = views

    def __len__(self):
        return len(self.views)

    def set_epoch(self, epoch):
        self.views.set_epoch(epoch)

    def get(self, index, generator):
        return self.views.get(index, generator)[:2]


def test_training_from_the_cache_matches_training_from_the_online_vae(vae, tmp_path, one_thread, monkeypatch):
    overrides = kl16_overrides(vae) + ["train.epochs=3", "train.ckpt_every=100"]
    cache = tmp_path / "cache"
    assert cli_main(["cache", "configs/tokenizer_tiny.yaml", "--out", str(cache), "--views", "center_flip",
                     "--shard-size", "8", *MICRO_TOKENIZER, *overrides]) == 0
    run = micro_tokenizer_run(*overrides, f"data.latents={cache}")
    train(run, tmp_path / "cached")
    # The same run, whose batches lose their posteriors on the way: the online VAE encodes the same views' pixels,
    # with the same noise.
    spec = TASKS["tokenizer"]

    def online(run, out_dir, device):
        task, make_train_set = spec.build(run, out_dir, device)
        return task, lambda world: OnlineViews(make_train_set(world))

    monkeypatch.setitem(TASKS, "tokenizer", replace(spec, build=online))
    train(micro_tokenizer_run(*overrides, f"data.latents={cache}"), tmp_path / "online")
    cached, online_losses = (list(read_losses(tmp_path / name).values()) for name in ("cached", "online"))
    assert len(cached) == len(online_losses) == 6
    assert cached == pytest.approx(online_losses, rel=2e-3)
    assert cached != online_losses  # the cache's fp16 rounding is the one difference


def test_dali_reads_the_same_views_and_posteriors(tmp_path, vae, one_thread):
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install -e .[dali])")
    from semanticist_fast.data.datasets import DataConfig, dali_images
    from semanticist_fast.data.folder import ImageFolderDataset
    from semanticist_fast.data.latent_cache import DaliLatentViews
    from semanticist_fast.data.loader import epoch_loader

    root = photo_folder(tmp_path / "photos", short_sides=(16, 24))
    raw = ImageFolderDataset(root)
    build(codec_of(vae), raw, tmp_path / "cache", views="ten_crop", batch_size=40)
    cache = LatentCache(tmp_path / "cache")

    images = dali_images(DataConfig(dataset="folder", root=str(root), scan_dir=str(tmp_path / "scan")), raw, OneRank,
                         progress=False)
    pil_views, dali_views = LatentViews(cache, raw, SIZE, seed=4), DaliLatentViews(cache, images, SIZE, seed=4)
    for epoch in (0, 1):
        a = list(epoch_loader(pil_views, 4, seed=4, epoch=epoch))
        b = list(epoch_loader(dali_views, 4, seed=4, epoch=epoch))
        assert len(a) == len(b) > 1
        for (xa, ya, ma, la), (xb, yb, mb, lb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.equal(ma, mb) and torch.equal(la, lb)  # same (image, view) pairs
            assert ((xa - xb).abs() * 255).mean() < 1.0  # the same crop (up to the resampling filter)
