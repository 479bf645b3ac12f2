"""A persistent cache of tokenizer outputs for training the AR model.

Every image is encoded once (all of its augmented views) with the tokenizer's EMA weights, and the first N slots
are stored as memory-mapped fp16 shards with the labels. A manifest records what the cache was built from; a run
whose tokenizer, N, views or data differ is refused with the differing fields named. Shards are written atomically
and recorded in the manifest as they finish, so an interrupted build resumes at the first missing shard.
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from ..engine.checkpoint import atomic_write, atomic_write_text

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class CacheConfig:
    dir: str = "token_cache"
    views: Literal["ten_crop", "center_flip", "center"] = "ten_crop"
    shard_size: int = 4096  # images per shard
    encode_batch_size: int = 256


def num_views(views: str) -> int:
    return {"ten_crop": 20, "center_flip": 2, "center": 1}[views]


def image_views(image: torch.Tensor, views: str, size: int) -> torch.Tensor:
    """All augmented views of one image (3, H, W) in [0, 1] -> (V, 3, size, size)."""
    from PIL import Image

    from .transforms import center_crop_arr, ten_crop_views

    pil = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    if views == "ten_crop":
        return torch.stack(ten_crop_views(pil, size))
    center = center_crop_arr(pil, size)
    return torch.stack([center, center.flip(-1)]) if views == "center_flip" else center[None]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_manifest(tokenizer_file: Path, num_tokens: int, views: str, data_desc: dict, num_images: int,
                      shard_size: int, token_dim: int) -> dict:
    return {
        "version": FORMAT_VERSION,
        "tokenizer_sha256": file_sha256(tokenizer_file),
        "tokenizer_path": str(tokenizer_file),
        "num_tokens": num_tokens,
        "token_dim": token_dim,
        "views": views,
        "num_views": num_views(views),
        "data": data_desc,
        "num_images": num_images,
        "shard_size": shard_size,
    }


# Fields that must match for a cache to be reused; the path may move, the rest may not.
IDENTITY_FIELDS = ("version", "tokenizer_sha256", "num_tokens", "token_dim", "views", "num_views", "data",
                   "num_images", "shard_size")


def check_manifest(found: dict, wanted: dict, cache_dir: Path) -> None:
    diffs = [f"{k}: cache has {found.get(k)!r}, this run needs {wanted[k]!r}" for k in IDENTITY_FIELDS
             if found.get(k) != wanted[k]]
    if diffs:
        raise ValueError(f"the token cache in {cache_dir} does not match this run:\n  " + "\n  ".join(diffs)
                         + f"\ndelete {cache_dir} to rebuild it, or set cache.dir to another directory")


def build_token_cache(tokenizer, tokenizer_file, dataset, cache_dir, num_tokens: int, views: str,
                      data_desc: dict, shard_size: int = 4096, batch_size: int = 256, progress: bool = True,
                      stop_after_shards: Optional[int] = None) -> Path:
    """Encode `dataset` (items (image (3,H,W) in [0,1], label)) into `cache_dir`; resumes a partial build."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    token_dim = tokenizer.model.cfg.encoder.slot_dim
    if not 1 <= num_tokens <= tokenizer.model.num_slots:
        raise ValueError(f"num_tokens {num_tokens} must be in 1..{tokenizer.model.num_slots}")
    wanted = expected_manifest(Path(tokenizer_file), num_tokens, views, data_desc, len(dataset), shard_size, token_dim)
    manifest_path = cache_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        check_manifest(manifest, wanted, cache_dir)
    else:
        manifest = {**wanted, "complete_shards": [], "complete": False}
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    num_shards = -(-len(dataset) // shard_size)
    todo = [s for s in range(num_shards) if s not in set(manifest["complete_shards"])]
    if not todo:
        return cache_dir
    device = tokenizer.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(dataset), initial=len(dataset) - sum(_shard_len(s, shard_size, len(dataset)) for s in todo),
                   desc="token cache", unit="img")
    size = tokenizer.cfg.image_size
    V = num_views(views)
    for done, shard in enumerate(todo):
        if stop_after_shards is not None and done >= stop_after_shards:
            break
        start = shard * shard_size
        n = _shard_len(shard, shard_size, len(dataset))
        tokens = np.empty((n, V, num_tokens, token_dim), dtype=np.float16)
        labels = np.empty((n,), dtype=np.int64)
        for b in range(0, n, max(1, batch_size // V)):
            idx = range(start + b, start + min(n, b + max(1, batch_size // V)))
            items = [dataset[i] for i in idx]
            batch = torch.cat([image_views(img, views, size) for img, _ in items])
            with torch.no_grad(), autocast:
                encoded = tokenizer.model.encode(batch.to(device))[:, :num_tokens]
            tokens[b:b + len(idx)] = encoded.float().reshape(len(idx), V, num_tokens, token_dim).cpu().numpy()
            labels[b:b + len(idx)] = [label for _, label in items]
            if bar is not None:
                bar.update(len(idx))
        _atomic_save_npy(cache_dir / f"tokens-{shard:05d}.npy", tokens)
        _atomic_save_npy(cache_dir / f"labels-{shard:05d}.npy", labels)
        manifest["complete_shards"] = sorted(set(manifest["complete_shards"]) | {shard})
        manifest["complete"] = len(manifest["complete_shards"]) == num_shards
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    if bar is not None:
        bar.close()
    return cache_dir


def _shard_len(shard: int, shard_size: int, total: int) -> int:
    return min(shard_size, total - shard * shard_size)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


class TokenCache(torch.utils.data.Dataset):
    """Memory-mapped view of a complete cache. An epoch shows each image once, through one of its views; an
    image's views are drawn without replacement across successive epochs (all V before any repeats), seeded."""

    def __init__(self, cache_dir, seed: int = 0):
        self.dir = Path(cache_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"no token cache in {self.dir} ({MANIFEST} missing)")
        self.manifest = json.loads(manifest_path.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"the token cache in {self.dir} is incomplete; build it first (it resumes)")
        num_shards = -(-self.manifest["num_images"] // self.manifest["shard_size"])
        self.tokens = [np.load(self.dir / f"tokens-{s:05d}.npy", mmap_mode="r") for s in range(num_shards)]
        self.labels = np.concatenate([np.load(self.dir / f"labels-{s:05d}.npy") for s in range(num_shards)])
        self.shard_size = self.manifest["shard_size"]
        self.num_views = self.manifest["num_views"]
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.manifest["num_images"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_for(self, index: int, epoch: int) -> int:
        cycle, position = divmod(epoch, self.num_views)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 100_003 + cycle)
        return int(torch.randperm(self.num_views, generator=g)[position])

    def read(self, index: int, view: int) -> torch.Tensor:
        shard, row = divmod(index, self.shard_size)
        return torch.from_numpy(np.array(self.tokens[shard][row, view], dtype=np.float32))

    def __getitem__(self, index: int):
        return self.read(index, self.view_for(index, self.epoch)), int(self.labels[index])
