"""Datasets from the data section of a config."""
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional


@dataclass
class DataConfig:
    dataset: Literal["procedural", "folder"] = "procedural"
    root: str = ""  # folder: ImageFolder-layout training root
    val_root: str = ""  # folder: held-out images (defaults to none)
    num_items: int = 50_000  # procedural: training-set size
    num_val_items: int = 256  # procedural: held-out set size
    num_classes: int = 10  # procedural
    crop: Literal["random_crop", "center_crop"] = "random_crop"
    hflip: bool = True
    loader: Literal["torch", "dali"] = "torch"  # dali: NVIDIA DALI decodes and crops (data/dali.py), folder data only
    scan_dir: str = ""  # dali: where the scan of data.root is kept (default: ~/.cache/semanticist-fast/scans/)
    latents: str = ""  # stage 1: a latent cache (`semanticist-fast cache`) to read the VAE posterior from

    def validate(self):
        if self.dataset == "folder" and not self.root:
            raise ValueError("data.dataset=folder needs data.root: an ImageFolder directory (root/<class>/<image>)")
        if self.loader == "dali" and self.dataset != "folder":
            raise ValueError("data.loader=dali decodes image files: it needs data.dataset=folder (the procedural "
                             "images are drawn, not decoded); use data.loader=torch")


def build_dataset(cfg: DataConfig, image_size: int, split: str = "train", seed: int = 0, raw: bool = False):
    """raw=True: whole images, no crop or flip (the token cache makes its own views)."""
    from .procedural import ProceduralImages

    if cfg.dataset == "procedural":
        n = cfg.num_items if split == "train" else cfg.num_val_items
        return ProceduralImages(image_size, n, split=split, num_classes=cfg.num_classes, seed=seed)
    from .folder import ImageFolderDataset
    from .transforms import build_transform

    if split == "train":
        return ImageFolderDataset(cfg.root, None if raw else build_transform(cfg.crop, image_size, cfg.hflip))
    if not cfg.val_root:
        raise ValueError("no held-out images: set data.val_root to an ImageFolder directory")
    return ImageFolderDataset(cfg.val_root, build_transform("center_crop", image_size, False))


def images_identity(cfg: DataConfig, dataset, seed: int = 0) -> dict:
    """What identifies a training set's images in a cache's manifest: the folder's list of files and labels (the
    root may move), or the procedural settings."""
    if cfg.dataset == "folder":
        from .scan import files_digest
        return {"dataset": "folder", "files_sha256": files_digest(dataset.samples, dataset.root),
                "num_files": len(dataset.samples)}
    return {"dataset": "procedural", "num_items": cfg.num_items, "num_classes": cfg.num_classes, "seed": seed}


def dali_images(cfg: DataConfig, dataset, world, progress: bool = True, num_threads: int = 1):
    """`dataset` (an ImageFolderDataset) read through DALI on world.device: scans the folder first (each rank of
    `world` a share; it has rank, size, device and barrier(what)), or reuses the scan."""
    from .dali import DaliImages
    from .scan import default_scan_dir, scan_folder

    scan = scan_folder(dataset.samples, dataset.root, cfg.scan_dir or default_scan_dir(dataset.root), world,
                       progress=progress and world.rank == 0)
    return DaliImages(dataset, scan, dataset.transform, world.device, num_threads)


def held_out_dataset(cfg: DataConfig, image_size: int, seed: int = 0):
    """The images that previews and `reconstruct` show: the built-in val split or data.val_root; without either,
    the training images themselves (centre crops are not held out then)."""
    if cfg.dataset == "procedural" or cfg.val_root:
        return build_dataset(cfg, image_size, "val", seed=seed)
    return build_dataset(cfg, image_size, "train", seed=seed)


def class_names(cfg: DataConfig) -> list[str]:
    """A readable name per class: the built-in data's hue and shape ('orange squares') or an ImageFolder's class
    folders; none (an empty list) when the folder is not on this machine."""
    if cfg.dataset == "procedural":
        from .procedural import class_name

        return [class_name(c, cfg.num_classes) for c in range(cfg.num_classes)]
    from .folder import class_folders

    return class_folders(cfg.root) if Path(cfg.root).is_dir() else []


def load_images(paths: list[str], image_size: int, max_pixels: Optional[int] = None):
    """User-given image files -> (N, 3, S, S) in [0, 1] with the ADM centre crop. max_pixels: refuse larger images
    before decoding them (their header gives the size)."""
    import torch
    from PIL import Image

    from .transforms import center_crop_arr, to_rgb

    images = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} does not exist")
        try:
            with Image.open(p) as im:
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise ValueError(f"image {p} is {im.width}x{im.height} ({im.width * im.height / 1e6:.1f} "
                                     f"megapixels); at most {max_pixels / 1e6:g} megapixels are taken: downscale it")
                images.append(center_crop_arr(to_rgb(im), image_size))
        except (OSError, Image.DecompressionBombError) as e:  # not an image, a truncated one, a decompression bomb
            raise ValueError(f"cannot read image {p}: {e}") from None
    return torch.stack(images)
