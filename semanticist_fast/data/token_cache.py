"""A persistent cache of tokenizer outputs for training the AR model.

Every image is encoded once (all of its augmented views) with the tokenizer's EMA weights, and the first N slots
are stored as memory-mapped fp16 shards with the labels (data/shards.py). The manifest records what the cache was
built from; a run whose tokenizer, N, views or data differ is refused with the differing fields named, and an
interrupted build resumes at the missing shards. Ranks build disjoint shards of one cache. Reading checks what it
reads: a non-finite token or a label outside the classes is an error naming the shard and row.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from ..common.device import autocast_for
from ..common.files import sha256_file
from .shards import CacheError, ShardWriter, open_shards
from .transforms import crop_views, num_views, to_pil, view_boxes, view_for_epoch

log = logging.getLogger(__name__)
FORMAT_VERSION = 3  # 3: a record with sizes and checksums per shard


@dataclass
class CacheConfig:
    dir: str = "token_cache"
    views: Literal["ten_crop", "center_flip", "center"] = "ten_crop"
    shard_size: int = 4096  # images per shard
    encode_batch_size: int = 256


def image_views(image: torch.Tensor, views: str, size: int) -> torch.Tensor:
    """All augmented views of one image (3, H, W) in [0, 1] -> (V, 3, size, size) (transforms.view_boxes)."""
    pil = to_pil(image)
    return torch.stack(crop_views(pil, view_boxes(views, *pil.size, size)))


def expected_manifest(tokenizer_file: Path, num_tokens: int, views: str, data_desc: dict, num_items: int,
                      shard_size: int, token_dim: int, tokenizer_sha256: Optional[str] = None) -> dict:
    return {
        "version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256 or sha256_file(tokenizer_file),
        "tokenizer_path": str(tokenizer_file),
        "num_tokens": num_tokens,
        "token_dim": token_dim,
        "views": views,
        "num_views": num_views(views),
        "data": data_desc,
        "num_items": num_items,
        "shard_size": shard_size,
    }


# Fields that must match for a cache to be reused; the path may move, the rest may not.
IDENTITY_FIELDS = ("version", "tokenizer_sha256", "num_tokens", "token_dim", "views", "num_views", "data",
                   "num_items", "shard_size")


def build_token_cache(tokenizer, tokenizer_file, dataset, cache_dir, num_tokens: int, views: str,
                      data_desc: dict, shard_size: int = 4096, batch_size: int = 256, progress: bool = True,
                      stop_after_shards: Optional[int] = None, tokenizer_sha256: Optional[str] = None,
                      rank: int = 0, world_size: int = 1) -> Path:
    """Encode `dataset` (items (image (3,H,W) in [0,1], label)) into `cache_dir`; resumes a partial build.
    Rank `rank` of `world_size` builds its share of the shards (the caller waits for all before opening).

    tokenizer: an inference.Tokenizer (its EMA model encodes)."""
    cache_dir = Path(cache_dir)
    token_dim = tokenizer.config.encoder.slot_dim
    if not 1 <= num_tokens <= tokenizer.num_slots:
        raise ValueError(f"num_tokens {num_tokens} must be in 1..{tokenizer.num_slots}")
    wanted = expected_manifest(Path(tokenizer_file), num_tokens, views, data_desc, len(dataset), shard_size, token_dim,
                               tokenizer_sha256)
    writer = ShardWriter(cache_dir, wanted, IDENTITY_FIELDS, what="token cache")
    todo = writer.missing(rank, world_size)
    if not todo:
        return cache_dir
    bar = None
    if progress:
        from tqdm.auto import tqdm
        mine = range(rank, writer.shards, world_size)
        bar = tqdm(total=sum(writer.shard_len(s) for s in mine),
                   initial=sum(writer.shard_len(s) for s in mine) - sum(writer.shard_len(s) for s in todo),
                   desc="token cache", unit="img")
    size = tokenizer.image_size
    V = num_views(views)
    for done, shard in enumerate(todo):
        if stop_after_shards is not None and done >= stop_after_shards:
            break
        start = shard * shard_size
        n = writer.shard_len(shard)
        tokens = np.empty((n, V, num_tokens, token_dim), dtype=np.float16)
        labels = np.empty((n,), dtype=np.int64)
        for b in range(0, n, max(1, batch_size // V)):
            idx = range(start + b, start + min(n, b + max(1, batch_size // V)))
            items = [dataset[i] for i in idx]
            batch = torch.cat([image_views(img, views, size) for img, _ in items])
            with torch.no_grad(), autocast_for(tokenizer.device):
                encoded = tokenizer.model.encode(batch.to(tokenizer.device))[:, :num_tokens]
            tokens[b:b + len(idx)] = encoded.float().reshape(len(idx), V, num_tokens, token_dim).cpu().numpy()
            labels[b:b + len(idx)] = [label for _, label in items]
            if bar is not None:
                bar.update(len(idx))
        writer.write(shard, tokens=tokens, labels=labels)
    if bar is not None:
        bar.close()
    return cache_dir


class TokenCache(torch.utils.data.Dataset):
    """Memory-mapped view of a complete cache. An epoch shows each image once, through one of its views; an
    image's views are drawn without replacement across successive epochs (all V before any repeats), seeded.
    num_classes: labels must lie in 0..num_classes-1 (checked once, at open)."""

    def __init__(self, cache_dir, seed: int = 0, num_classes: Optional[int] = None):
        self.dir = Path(cache_dir)
        self.manifest, arrays = open_shards(self.dir, ("tokens", "labels"), what="token cache")
        self.tokens = arrays["tokens"]
        self.labels = np.concatenate(arrays["labels"])
        self.shard_size = self.manifest["shard_size"]
        self.num_views = self.manifest["num_views"]
        self.seed = seed
        self.epoch = 0
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= (num_classes or np.iinfo(np.int64).max)))
        if bad.size:
            i = int(bad[0])
            raise CacheError(f"the token cache in {self.dir} has {bad.size} labels outside 0..{num_classes - 1} "
                             f"(first: {int(self.labels[i])} in shard {i // self.shard_size}, row "
                             f"{i % self.shard_size}); was it built for another dataset? delete it to rebuild")

    def __len__(self) -> int:
        return self.manifest["num_items"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_for(self, index: int, epoch: int) -> int:
        return view_for_epoch(self.seed, index, epoch, self.num_views)

    def read(self, index: int, view: int) -> torch.Tensor:
        shard, row = divmod(index, self.shard_size)
        tokens = torch.from_numpy(np.array(self.tokens[shard][row, view], dtype=np.float32))
        if not bool(torch.isfinite(tokens).all()):
            raise CacheError(f"the token cache in {self.dir} holds non-finite tokens in shard {shard} "
                             f"(tokens-{shard:05d}.npy), row {row}, view {view}; delete it to rebuild it")
        return tokens

    def __getitem__(self, index: int):
        return self.read(index, self.view_for(index, self.epoch)), int(self.labels[index])
