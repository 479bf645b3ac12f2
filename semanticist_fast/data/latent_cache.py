"""Stage 1's persistent cache of the frozen VAE's posterior: every image and view encoded once, sampled per step.

The KL-16 encoder is the costliest frozen part of a tokenizer step (about 138 GFLOP per image) and its input, a
fixed view of a fixed image, is the same at every epoch; only the posterior sample changes. So `build_latent_cache`
stores, for each image and each of its views (transforms.view_boxes: ten_crop, center_flip or center), the
posterior's mean and log-variance, fp16, in shards with a manifest (data/shards.py):

    mean-00007.npy, logvar-00007.npy   (images in shard 7, V, C, h, w) float16

The manifest names what the cache was made from: the codec's weights (sha256), the images (their file list's hash,
or the procedural data's settings), the views and crop spec, the image size and the latent shape. A run whose
inputs differ is refused with the differing fields named. The build resumes at the missing shards after a kill,
and ranks build disjoint shares (rank r: shards r, r + R, ...).

Training with data.latents=DIR reads, per item, one view chosen per epoch without replacement (as the AR token
cache does), the posterior of that view and the same view's pixels for the encoder (`LatentViews`); the task
samples the posterior with the trainer's per-sample noise (common/noise.py), so a run from the cache draws what the
online run draws and differs only by the fp16 rounding of mean and log-variance.

The codec is duck-typed (`posterior(images in [0, 1]) -> (mean, logvar)`, `channels`, `downsample`), so data/
imports no models.
"""
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..common.device import autocast_for
from .shards import CacheError, ShardWriter, check_identity, open_shards
from .token_cache import image_views
from .transforms import TEN_CROP_SCALES, crop_views, num_views, to_pil, view_boxes, view_for_epoch

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
IDENTITY_FIELDS = ("version", "codec_weights_sha256", "images", "views", "num_views", "crop", "image_size",
                   "latent_shape", "num_items", "shard_size")
NAMES = ("mean", "logvar")

# (indices, images per batch) -> (n, V, 3, S, S) views of those images, in order, a batch at a time
ViewBatches = Callable[[list[int], int], Iterator[torch.Tensor]]


def crop_spec(views: str) -> dict:
    """How the views are cut (transforms.py): a cache cut another way holds other pixels."""
    spec = {"resize": "adm (box halvings, then bicubic)", "views": views}
    if views == "ten_crop":
        spec["ten_crop_scales"] = list(TEN_CROP_SCALES)
    return spec


def expected_manifest(codec_weights_sha256: str, images: dict, views: str, image_size: int,
                      latent_shape: tuple[int, int, int], num_items: int, shard_size: int) -> dict:
    return {"version": FORMAT_VERSION, "codec_weights_sha256": codec_weights_sha256, "images": images,
            "views": views, "num_views": num_views(views), "crop": crop_spec(views), "image_size": image_size,
            "latent_shape": list(latent_shape), "num_items": num_items, "shard_size": shard_size}


def pil_view_batches(dataset, views: str, size: int) -> ViewBatches:
    """The views of raw dataset items ((3, H, W) image in [0, 1], label), cut with PIL."""
    def batches(indices: list[int], per_batch: int) -> Iterator[torch.Tensor]:
        for k in range(0, len(indices), per_batch):
            yield torch.stack([image_views(dataset[i][0], views, size) for i in indices[k:k + per_batch]])
    return batches


def build_latent_cache(codec, codec_weights_sha256: str, dataset, cache_dir, views: str, image_size: int,
                       images: dict, device: torch.device, shard_size: int = 512, batch_size: int = 64,
                       view_batches: Optional[ViewBatches] = None, progress: bool = True,
                       stop_after_shards: Optional[int] = None, rank: int = 0, world_size: int = 1) -> Path:
    """Encode this rank's share of `dataset` (raw items: full images) into `cache_dir`; resumes a partial build.

    images: what identifies the images (a file list hash, or the procedural settings). batch_size: views per
    encoder call. view_batches: where the pixels of the views come from (PIL by default; DALI's
    DaliImages.view_batches)."""
    cache_dir = Path(cache_dir)
    if image_size % codec.downsample:
        raise ValueError(f"image size {image_size} is not divisible by the codec's downsampling {codec.downsample}")
    side = image_size // codec.downsample
    latent_shape = (codec.channels, side, side)
    V = num_views(views)
    wanted = expected_manifest(codec_weights_sha256, images, views, image_size, latent_shape, len(dataset),
                               shard_size)
    writer = ShardWriter(cache_dir, wanted, IDENTITY_FIELDS, what="latent cache")
    todo = writer.missing(rank, world_size)
    if stop_after_shards is not None:
        todo = todo[:stop_after_shards]
    if not todo:
        return cache_dir
    view_batches = view_batches or pil_view_batches(dataset, views, image_size)
    per_batch = max(1, batch_size // V)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(writer.shard_len(s) for s in todo), desc="latent cache", unit="img")
    for shard in todo:
        start, n = shard * shard_size, writer.shard_len(shard)
        out = {name: np.empty((n, V, *latent_shape), dtype=np.float16) for name in NAMES}
        row = 0
        for x in view_batches(list(range(start, start + n)), per_batch):
            b = x.shape[0]
            with torch.no_grad(), autocast_for(device):
                mean, logvar = codec.posterior(x.reshape(b * V, *x.shape[2:]).to(device))
            for name, value in zip(NAMES, (mean, logvar)):
                half = value.float().reshape(b, V, *latent_shape).cpu().half()
                if not bool(torch.isfinite(half).all()):
                    raise ValueError(f"the codec's posterior {name} of images {start + row}..{start + row + b - 1} "
                                     "is not finite in fp16; check the codec weights and the images")
                out[name][row:row + b] = half.numpy()
            row += b
            if bar is not None:
                bar.update(b)
        if row != n:
            raise RuntimeError(f"shard {shard}: the view source gave {row} images, expected {n}")
        writer.write(shard, **out)
    if bar is not None:
        bar.close()
    return cache_dir


class LatentCache:
    """Memory-mapped view of a complete latent cache, checked against what the run needs (`expected`)."""

    def __init__(self, cache_dir, expected: Optional[dict] = None):
        self.dir = Path(cache_dir)
        self.manifest, arrays = open_shards(self.dir, NAMES, what="latent cache")
        # The format and the crops must be this code's; `expected` holds what the run needs of the rest (any views).
        wanted = {"version": FORMAT_VERSION, "crop": crop_spec(self.manifest.get("views")), **(expected or {})}
        check_identity(self.manifest, wanted, tuple(k for k in IDENTITY_FIELDS if k in wanted), self.dir,
                       "latent cache")
        self.mean, self.logvar = arrays["mean"], arrays["logvar"]
        self.shard_size, self.num_views = self.manifest["shard_size"], self.manifest["num_views"]
        self.views = self.manifest["views"]

    def __len__(self) -> int:
        return self.manifest["num_items"]

    def read(self, index: int, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of item `index`'s view `view`, float32 (C, h, w)."""
        shard, row = divmod(index, self.shard_size)
        out = []
        for name, arrays in (("mean", self.mean), ("logvar", self.logvar)):
            value = torch.from_numpy(np.array(arrays[shard][row, view], dtype=np.float32))
            if not bool(torch.isfinite(value).all()):
                raise CacheError(f"the latent cache in {self.dir} holds a non-finite {name} in shard {shard} "
                                 f"({name}-{shard:05d}.npy), row {row}, view {view}; delete it to rebuild it")
            out.append(value)
        return out[0], out[1]

    def read_batch(self, indices: list[int], views: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.read(i, v) for i, v in zip(indices, views)]
        return torch.stack([m for m, _ in pairs]), torch.stack([lv for _, lv in pairs])


class LatentViews(torch.utils.data.Dataset):
    """The training set of a run with data.latents: item i is (view v's pixels, label, v's posterior mean, logvar),
    v = the view epoch e shows (view_for_epoch). `images` are the raw items the cache was built from: an
    ImageFolderDataset without transform (its `load` gives the PIL image) or any dataset of (image, label)."""

    def __init__(self, cache: LatentCache, images, size: int, seed: int = 0):
        if len(images) != len(cache):
            raise CacheError(f"the latent cache in {cache.dir} holds {len(cache)} images, the data has {len(images)}")
        self.cache, self.images, self.size, self.seed = cache, images, size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.cache)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_skipped(self) -> int:
        return getattr(self.images, "num_skipped", 0)

    def view_for(self, index: int, epoch: int) -> int:
        return view_for_epoch(self.seed, index, epoch, self.cache.num_views)

    def _pil(self, index: int):
        load = getattr(self.images, "load", None)
        if load is not None:
            j, pil = load(index)
            return pil, self.images.samples[j][1]
        image, label = self.images[index]
        return to_pil(image), label

    def get(self, index: int, generator: Optional[torch.Generator] = None):
        view = self.view_for(index, self.epoch)
        pil, label = self._pil(index)
        pixels = crop_views(pil, [view_boxes(self.cache.views, *pil.size, self.size)[view]])[0]
        mean, logvar = self.cache.read(index, view)
        return pixels, label, mean, logvar

    def __getitem__(self, index: int):
        return self.get(index)


class DaliLatentViews(LatentViews):
    """LatentViews whose pixels DALI cuts (data/dali.py): `images` is a DaliImages."""

    def epoch_loader(self, batches: list[list[tuple[int, int]]], num_workers: int = 0, pin_memory: bool = False):
        epoch, views, size = self.epoch, self.cache.views, self.size

        def boxes_for(index, width, height, generator):
            return [view_boxes(views, width, height, size)[self.view_for(index, epoch)]]

        def posterior(indices):
            return self.cache.read_batch(indices, [self.view_for(i, epoch) for i in indices])

        return self.images.loader(batches, size, boxes_for, extra=posterior)
