"""Small configs and reference data shared by the tests."""
from pathlib import Path

import torch

from semanticist_fast.config import load_config
from semanticist_fast.tasks.tokenizer_stage import TokenizerRun

# The official checkpoints' parameter layouts (copied from shared/reference/checkpoint_layouts).
LAYOUTS = Path(__file__).resolve().parent / "data" / "checkpoint_layouts"


def parse_layout(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) for each tab-separated row of a layout file; '#' lines are comments."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        dims = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        rows.append((name, dims, getattr(torch, dtype.removeprefix("torch."))))
    return rows


def layout_shapes(file_name: str) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape, _ in parse_layout(LAYOUTS / file_name)}

MICRO_TOKENIZER = [
    "model.image_size=16",
    "model.encoder.size=custom", "model.encoder.dim=32", "model.encoder.depth=1", "model.encoder.heads=2",
    "model.encoder.patch_size=8", "model.encoder.num_slots=4",
    "model.decoder.size=custom", "model.decoder.depth=1", "model.decoder.hidden=32", "model.decoder.heads=2",
    "model.decoder.patch_size=4",
    "model.nested.enable_nest_after=2",
    "data.num_items=64", "data.num_val_items=8",
    "train.batch_size=8", "train.epochs=2", "train.log_every=1", "train.ckpt_every=4", "train.preview_every=0",
    "train.progress=false", "optim.warmup_epochs=0.25",
    "preview_images=2",
]


def micro_tokenizer_run(*extra: str) -> TokenizerRun:
    return load_config(TokenizerRun, "configs/tokenizer_tiny.yaml", MICRO_TOKENIZER + list(extra))


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (adaLN-Zero would make every block the identity and every head output zero);
    norms near 1 and the diffusion head's output layer small, so sampling chains stay tame."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.05 if name.startswith("diffloss.net.final_layer") else (0.2 if p.ndim > 1 else 0.1)
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def photographs() -> list:
    """Real photographs as PIL RGB images: those scikit-image ships in its wheel (scripts/install.sh --dev installs
    it, without its dependencies: only the files are read), else photograph-like stand-ins drawn here (smooth
    shading, edges and fine texture), so the tests run either way."""
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(spec.submodule_search_locations[0]) / "data"
        names = ("chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
                 "motorcycle_left.png", "ihc.png", "astronaut.png")
        found = [Image.open(folder / n).convert("RGB") for n in names if (folder / n).is_file()]
        if len(found) >= 4:
            return found
    rng = np.random.default_rng(0)
    images = []
    for k in range(6):
        h, w = 300 + 40 * k, 400 - 20 * k
        coarse = rng.random((6, 8, 3))
        shade = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), float)
        yy, xx = np.mgrid[0:h, 0:w]
        edge = ((xx - w / 2) * np.cos(k) + (yy - h / 2) * np.sin(k) > 0)[..., None] * 60.0
        texture = rng.normal(0, 18, (h, w, 1)) * (np.sin(xx / (3 + k)) > 0)[..., None]
        images.append(Image.fromarray(np.clip(shade * 0.7 + edge + texture, 0, 255).astype(np.uint8)))
    return images


def photo_folder(root: Path, short_sides=(40, 52, 64, 72, 90, 130), classes: int = 2) -> Path:
    """An ImageFolder of the photographs, each saved at every short side (JPEG and PNG alternating)."""
    from PIL import Image

    root = Path(root)
    count = 0
    for i, photo in enumerate(photographs()):
        for short in short_sides:
            scale = short / min(photo.size)
            small = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS)
            folder = root / f"class{count % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            if count % 2:
                small.save(folder / f"p{i}-{short}.png")
            else:
                small.save(folder / f"p{i}-{short}.jpg", quality=92)
            count += 1
    return root


class OneRank:
    """The `world` data/ asks for (rank, size, device, barrier), of a single CPU process."""
    rank, size = 0, 1
    device = torch.device("cpu")

    @staticmethod
    def barrier(what: str) -> None:
        pass
