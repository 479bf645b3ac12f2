"""A directory of fixed-size .npy shards and the manifest that says what they hold and which are done.

Shared by the caches that encode a dataset once and stream it afterwards (the AR token cache; the latent cache
to come) and by the evaluations' sample stores (eval/sharded.py), which several ranks write at once. The manifest records the cache's identity (what it was built from); opening it for a run whose
identity differs is refused with the differing fields named. Shards are written atomically and recorded in the
manifest as they finish, so an interrupted build resumes at the first missing shard, and readers memory-map them.
"""
import json
from pathlib import Path

import numpy as np

from ..common.files import atomic_write, atomic_write_text

MANIFEST = "manifest.json"


def num_shards(num_items: int, shard_size: int) -> int:
    return -(-num_items // shard_size)


def shard_len(shard: int, shard_size: int, num_items: int) -> int:
    return min(shard_size, num_items - shard * shard_size)


def shard_file(directory: Path, name: str, shard: int) -> Path:
    return Path(directory) / f"{name}-{shard:05d}.npy"


class ShardWriter:
    """Creates the manifest, or checks an existing one against `identity` (its `identity_fields` must match;
    other entries, such as where the inputs were found, may change)."""

    def __init__(self, directory, identity: dict, identity_fields: tuple[str, ...], what: str = "cache"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / MANIFEST
        self.num_items, self.shard_size = identity["num_items"], identity["shard_size"]
        if self.path.exists():
            self.manifest = json.loads(self.path.read_text())
            diffs = [f"{k}: {what} has {self.manifest.get(k)!r}, this run needs {identity[k]!r}"
                     for k in identity_fields if self.manifest.get(k) != identity[k]]
            if diffs:
                raise ValueError(f"the {what} in {self.dir} does not match this run:\n  " + "\n  ".join(diffs)
                                 + f"\ndelete {self.dir} to rebuild it, or point the run at another directory")
        else:
            self.manifest = {**identity, "complete_shards": [], "complete": False}
            atomic_write_text(self.path, json.dumps(self.manifest, indent=1))

    def missing(self) -> list[int]:
        done = set(self.manifest["complete_shards"])
        return [s for s in range(num_shards(self.num_items, self.shard_size)) if s not in done]

    def shard_len(self, shard: int) -> int:
        return shard_len(shard, self.shard_size, self.num_items)

    def write(self, shard: int, **arrays: np.ndarray) -> None:
        """Each array to `{name}-{shard}.npy`, then the shard is recorded as done."""
        self.write_files(shard, **arrays)
        self.record([shard])

    def write_files(self, shard: int, **arrays: np.ndarray) -> None:
        """The shard's arrays, unrecorded. Writers in several processes use this, since recording races on the
        manifest; afterwards one of them records what is on disk: `record(found(names))`."""
        for name, array in arrays.items():
            atomic_write(shard_file(self.dir, name, shard), lambda f, a=array: np.save(f, a))

    def found(self, names: tuple[str, ...]) -> list[int]:
        """The shards all of whose arrays are on disk (each written atomically: a file there is whole)."""
        count = num_shards(self.num_items, self.shard_size)
        return [s for s in range(count) if all(shard_file(self.dir, n, s).is_file() for n in names)]

    def record(self, shards: list[int]) -> None:
        done = sorted(set(self.manifest["complete_shards"]) | set(shards))
        self.manifest["complete_shards"] = done
        self.manifest["complete"] = len(done) == num_shards(self.num_items, self.shard_size)
        atomic_write_text(self.path, json.dumps(self.manifest, indent=1))


def open_shards(directory, names: tuple[str, ...], what: str = "cache") -> tuple[dict, dict[str, list[np.ndarray]]]:
    """(manifest, {name: [memory-mapped shard arrays]}) of a complete shard directory."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {what} in {directory} ({MANIFEST} missing)")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise ValueError(f"the {what} in {directory} is incomplete; build it first (it resumes)")
    count = num_shards(manifest["num_items"], manifest["shard_size"])
    arrays = {name: [np.load(shard_file(directory, name, s), mmap_mode="r") for s in range(count)] for name in names}
    return manifest, arrays
