"""Reference statistics for FID: an ADM-style .npz, or the Inception statistics of a run's own images, cached.

An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) holds `mu` and `sigma` of the 2048-d pool features,
and its images as `arr_0` (uint8 N x H x W x 3); either is accepted (images are scored with our Inception). Without
one, the statistics are those of the run's training images in ADM centre crops (a seeded random subset), cached
beside the evaluation under a name that hashes everything they depend on.
"""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..common.files import atomic_write
from ..common.seeds import seeded_generator
from ..config import from_dict
from ..data.datasets import DataConfig
from .grid import to_uint8
from .inception import fid_statistics, inception_features

log = logging.getLogger(__name__)
_REFERENCE_STREAM = 7  # the seed stream of the training-image subset


def load_reference(path, net=None, batch_size: int = 100) -> dict:
    """{"mu", "sigma"} from an ADM-style .npz: its own statistics, else its images `arr_0` through `net`. With a
    net, the statistics must have its FID feature dimension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} (eval.reference) do not exist")
    with np.load(path) as f:
        if "mu" in f.files and "sigma" in f.files:
            stats = {"mu": f["mu"].astype(np.float64), "sigma": f["sigma"].astype(np.float64)}
        elif "arr_0" in f.files:
            if net is None:
                raise ValueError(f"{path} holds images, not statistics: an Inception network is needed to score them")
            images = torch.from_numpy(np.ascontiguousarray(f["arr_0"])).permute(0, 3, 1, 2)
            stats = fid_statistics(inception_features(net, images.contiguous(), batch_size)["pool"])
        else:
            raise ValueError(f"{path} has neither `mu` and `sigma` nor images `arr_0` (it has {f.files}); "
                             "expected an ADM reference batch")
    dim = stats["mu"].shape[0] if net is None else int(net.features_list[0])
    if stats["mu"].shape != (dim,) or stats["sigma"].shape != (dim, dim):
        raise ValueError(f"{path}: mu {stats['mu'].shape} / sigma {stats['sigma'].shape} are not {dim}-d FID "
                         f"statistics (the ADM reference batches hold the 2048-d pool features)")
    return stats


def training_images(data: dict, image_size: int, data_seed: int = 0):
    """The training set of a run's `data` section (data_seed: the run's train.seed) in ADM centre crops."""
    cfg = from_dict(DataConfig, data, prefix="data.")
    if cfg.dataset == "procedural":
        from ..data.datasets import build_dataset
        return build_dataset(cfg, image_size, "train", seed=data_seed)
    from ..data.folder import ImageFolderDataset
    from ..data.transforms import build_transform
    return ImageFolderDataset(cfg.root, build_transform("center_crop", image_size, False))


def data_reference(data: dict, image_size: int, num_images: int, net, inception_sha256: str, cache_dir: Path,
                   data_seed: int = 0, batch_size: int = 100, progress: bool = True) -> tuple[dict, str]:
    """(statistics, where they came from) of num_images training images of the run's data (a random subset seeded
    by data_seed, the run's train.seed), computed once and cached in cache_dir as an ADM-style .npz (mu, sigma)."""
    dataset = training_images(data, image_size, data_seed)
    n = min(num_images, len(dataset))
    if n < 2:
        raise ValueError(f"the training set has {len(dataset)} images: too few for reference statistics")
    key = json.dumps({"data": data, "image_size": image_size, "n": n, "seed": data_seed, "inception": inception_sha256,
                      "layer": net.features_list[0]}, sort_keys=True)
    cache = Path(cache_dir) / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    where = f"{n} training images ({cache})"
    if cache.is_file():
        return load_reference(cache, net), where
    order = torch.randperm(len(dataset), generator=seeded_generator(data_seed, _REFERENCE_STREAM))[:n].sort().values
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="reference statistics", unit="img", dynamic_ncols=True)
    pool = []
    for chunk in order.split(batch_size):
        images = torch.stack([dataset[int(i)][0] for i in chunk])
        pool.append(inception_features(net, to_uint8(images), batch_size)["pool"])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    stats = fid_statistics(np.concatenate(pool))
    atomic_write(cache, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"], key=np.array(key)))
    log.info("reference statistics of %s", where)
    return stats, where
