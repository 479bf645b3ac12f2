"""Inception features, FID and IS through torch-fidelity, with the Inception weights read from a local file.

torch-fidelity's `inception-v3-compat` network is the TensorFlow FID Inception (2015-12-05) ported to PyTorch, so
its 2048-d pool features are the ones the ADM evaluator's reference statistics were computed from. FID uses those
pool features (or, for quick checks, one of the earlier layers torch-fidelity also offers: 64, 192, 768; such FIDs
are not comparable to published ones), IS the unbiased logits, as torch-fidelity's own metrics do. Nothing is
downloaded: the weights file must exist, and a missing one is an error that names it.

This module is the only door to torch-fidelity (and so to torchvision): import it, not them.
"""
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch

from ..common.files import atomic_torch_save
from . import torchvision_compat  # noqa: F401  (defines the torchvision op schemas a CPU torch lacks, first)
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric  # noqa: E402

FidLayer = Literal["2048", "768", "192", "64"]
LOGITS = "logits_unbiased"
WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default, so our IS splits are its splits


def missing_weights_message(path: str) -> str:
    where = f"{path!r} does not exist" if path else "no Inception weights were given"
    return (f"{where}: FID and IS need torch-fidelity's InceptionV3 weights ({WEIGHTS_FILE}, the TF FID Inception "
            f"2015-12-05). Nothing is downloaded at run time: fetch the file once on a machine with internet access "
            f"(torch-fidelity's release asset {URL_INCEPTION_V3}), copy it here and pass --inception-path FILE "
            f"(or set eval.inception_path)")


def load_inception(path: Union[str, Path], device: Union[str, torch.device] = "cpu", fid_layer: FidLayer = "2048",
                   logits: bool = True) -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 feature extractor with the weights at `path`, in eval mode on `device`, giving
    the `fid_layer` features and, if asked, the logits (without them the network stops after that layer)."""
    path = str(path or "")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(missing_weights_message(path))
    wanted = [fid_layer] + ([LOGITS] if logits else [])
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", wanted, feature_extractor_weights_path=path)
    except (RuntimeError, KeyError, AttributeError) as e:  # wrong keys or shapes, or not a state dict at all
        raise ValueError(f"{path} is not an InceptionV3 state dict that torch-fidelity reads ({e}); "
                         f"expected {WEIGHTS_FILE}") from None
    return net.to(device)


@torch.no_grad()
def inception_features(net: FeatureExtractorInceptionV3, images: torch.Tensor, batch_size: int = 64) -> dict:
    """uint8 images (N, 3, H, W) (any size: the network resizes to 299 as TF does) -> {"pool": (N, D) the FID
    features, "logits": (N, 1008) if the network gives them}, float32 numpy arrays."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Inception features need uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("Inception features of no images")
    device = next(net.parameters()).device
    outputs = [net(batch.to(device)) for batch in images.split(batch_size)]
    keys = ["pool"] + (["logits"] if LOGITS in net.features_list else [])
    return {key: torch.cat([out[j] for out in outputs]).cpu().numpy() for j, key in enumerate(keys)}


def fid_statistics(pool: np.ndarray) -> dict:
    """{"mu", "sigma"} (float64) of pool features (N, D), the ADM reference-batch keys."""
    if pool.ndim != 2 or pool.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature rows, got shape {pool.shape}")
    stats = fid_features_to_statistics(torch.from_numpy(np.asarray(pool, dtype=np.float64)))
    return {"mu": stats["mu"], "sigma": stats["sigma"]}


def frechet_distance(a: dict, b: dict) -> float:
    """FID between two {"mu", "sigma"} statistics (torch-fidelity's computation, in float64)."""
    a = {k: np.asarray(a[k], dtype=np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(b[k], dtype=np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape or a["sigma"].shape != b["sigma"].shape:
        raise ValueError(f"FID statistics of different dimensions: mu {a['mu'].shape} vs {b['mu'].shape}")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` splits of the (shuffled) samples."""
    if logits.shape[0] < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} samples, got {logits.shape[0]}")
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits, True, IS_SHUFFLE_SEED)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def save_random_inception(path: Union[str, Path], seed: int = 0) -> Path:
    """A randomly initialised InceptionV3 in torch-fidelity's layout, for tests and smoke runs without the real
    weights: its FID and IS run the real code path but mean nothing. Convolutions get He-normal weights so that
    activations keep their scale through the 94 layers (PyTorch's default init shrinks them to ~0)."""

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random initialisation
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    placeholder = path.with_name(path.name + ".empty")
    torch.save({}, placeholder)
    try:
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(placeholder))
    finally:
        placeholder.unlink()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.1)
                module.bias.zero_()
    atomic_torch_save(net.state_dict(), path)
    return path
