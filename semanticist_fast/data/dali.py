"""data.loader=dali: NVIDIA DALI decodes and crops the images, on the GPU (nvJPEG, `device="mixed"`) or on the CPU.

What stays ours: the order and the crops. The batches are the (index, item seed) lists of loader.rank_batches, so a
DALI run reads exactly the images, in exactly the order, of a torch-loader run, on any number of ranks, and resumes
at the same place. Every crop is a transforms.CropBox computed in Python from the image's size (recorded by the
scan) and the item's generator, with the PIL transform's own draws; DALI only decodes, resizes to the box's size and
cuts the box's window (per-sample arguments fed through `fn.external_source`). So the geometry is identical to the
PIL path's and only the resampling differs: PIL halves with a BOX filter while the short side is at least twice the
target and then resizes bicubically; DALI makes one antialiased bicubic resize. Per pixel on the 0-255 scale, DALI
minus PIL on photographs at 256 px (benchmarks/bench_data.py): a mean absolute difference of 0.17 and a maximum of 7
where PIL resizes in one step (the source's short side under twice the target's: most of ImageNet), a mean of 0.56
and a maximum of 9 where it halves first. On small crops of fine texture the halving case reaches a mean of 3-8 and
a maximum near 75 (the bounds of tests/test_dali.py). Where nothing is resampled the two are equal.

Files come from the scan (data/scan.py): unreadable ones are skipped (replaced, like ImageFolderDataset, by the
next readable file in sorted order) and counted; those DALI would decode differently or not at all (CMYK, 16-bit,
palette, transparency, formats other than JPEG and PNG) are fed re-encoded from PIL's to_rgb, so their values are
the PIL path's; a file whose size or checksum changed since the scan is checked again with PIL before use.

nvidia-dali is optional (`pip install -e .[dali]`). A pipeline is built once per output shape and re-fed each
epoch. The GPU path (`device="mixed"`, outputs on the trainer's device) is written for CUDA machines and untested
here; the CPU path (`device_id=None`) runs in the tests.
"""
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Optional

import numpy as np
import torch

from .scan import REENCODE, UNREADABLE, Scan, checksum, inspect_bytes, reencode
from .transforms import CropBox, ImageTransform, view_boxes

log = logging.getLogger(__name__)

# (index asked for, its file's width, height, the item's generator) -> the boxes to cut of that file
BoxesFor = Callable[[int, int, int, torch.Generator], Sequence[CropBox]]


def require_dali():
    """The nvidia.dali modules, or an error that says how to install them."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as e:
        raise ImportError(f"data.loader=dali needs NVIDIA DALI ({e}): pip install -e .[dali] (nvidia-dali-cuda130 "
                          "and nvidia-nvimgcodec-cu13, pinned in constraints.txt), or set data.loader=torch") from None
    return dali, fn, types


class _Feed:
    """The external source of a pipeline that outlives one epoch: each pass points it at that pass's batches."""

    def __init__(self, source: Callable[[], tuple]):
        self.source = source

    def __call__(self) -> tuple:
        return self.source()


class DaliCrops:
    """A DALI pipeline: encoded images in, for each image the windows of `view_resizes` out, as (B, V, 3, S, S)
    floats in [0, 1]. View v is cut from the image resized to the short side of resize `view_resizes[v]`, so one
    decode and one resize per distinct short side serve all V views (ten-crop: 2 resizes, 20 windows)."""

    def __init__(self, size: int, view_resizes: Sequence[int], batch_size: int, device: torch.device,
                 num_threads: int = 1):
        require_dali()
        self.size, self.view_resizes = size, tuple(view_resizes)
        self.num_resizes = max(self.view_resizes) + 1
        self.batch_size, self.device, self.num_threads = batch_size, torch.device(device), max(1, num_threads)
        self._pipe, self._feed, self._busy = None, None, False

    def run(self, source: Callable[[], tuple]) -> Iterator[tuple]:
        """The pipeline's (images, labels) for one pass over `source` (see pipeline). Built on the first pass and
        reset and re-fed for the next ones: building sets up the decoder (nvJPEG) and its device memory again.
        A pass left part-way holds prefetched batches, so the pass after it gets a new pipeline."""
        if self._pipe is None or self._busy:
            self._feed = _Feed(source)
            self._pipe = self.pipeline(self._feed)
        else:
            self._feed.source = source
            self._pipe.reset()
        pipe = self._pipe
        self._busy = True
        while True:
            try:
                out = pipe.run()
            except StopIteration:
                if pipe is self._pipe:
                    self._busy = False
                return
            yield out

    def pipeline(self, source: Callable[[], tuple]):
        """The pipeline that pulls its batches from `source()`: (encoded bytes, resizes (R, 2) as (w, h), windows
        (V, 3) as (top, left, flip), labels) lists; source raises StopIteration after the last batch."""
        dali, fn, types = require_dali()
        gpu = self.device.type == "cuda"
        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        S, view_resizes, R = self.size, self.view_resizes, self.num_resizes

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id, seed=0,
                           prefetch_queue_depth=2)
        def graph():
            encoded, resizes, windows, labels = fn.external_source(
                source=source, num_outputs=4, batch=True, dtype=[types.UINT8, types.FLOAT, types.INT32, types.INT64])
            # No EXIF rotation (PIL's to_rgb applies none); libjpeg's fancy upsampling, as PIL decodes.
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False, jpeg_fancy_upsampling=True)
            resized = [fn.resize(images, resize_x=resizes[r, 0], resize_y=resizes[r, 1],
                                 interp_type=types.INTERP_CUBIC, antialias=True) for r in range(R)]
            views = []
            for v, r in enumerate(view_resizes):
                window = fn.slice(resized[r], start=windows[v, 0:2], shape=[S, S], axis_names="HW")
                views.append(fn.flip(window, horizontal=windows[v, 2]))
            return fn.stack(*views), labels

        pipe = graph()
        pipe.build()
        return pipe

    def to_torch(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        x = out.permute(0, 1, 4, 2, 3).float().div_(255.0)  # (B, V, 3, S, S), as transforms.to_tensor scales
        return x, torch.from_numpy(np.array(labels.as_array(), dtype=np.int64)).reshape(-1)

    def inputs(self, encoded: list[bytes], boxes: list[Sequence[CropBox]], sizes: list[tuple[int, int]],
               labels: list[int]) -> tuple:
        """The per-sample inputs of one batch (the source's return value)."""
        resizes, windows = [], []
        for item_boxes, (w, h) in zip(boxes, sizes):
            if len(item_boxes) != len(self.view_resizes):
                raise ValueError(f"{len(item_boxes)} boxes for a pipeline of {len(self.view_resizes)} views")
            short = [None] * self.num_resizes
            for box, r in zip(item_boxes, self.view_resizes):
                if box.size != self.size or short[r] not in (None, box.short_side):
                    raise ValueError(f"box {box} does not fit this pipeline (size {self.size}, "
                                     f"views {self.view_resizes})")
                short[r] = box.short_side
            resizes.append(np.array([CropBox(s, 0, 0, self.size).resized(w, h) for s in short], np.float32))
            windows.append(np.array([(b.top, b.left, int(b.flip)) for b in item_boxes], np.int32))
        return ([np.frombuffer(e, np.uint8) for e in encoded], resizes, windows,
                [np.array(label, np.int64) for label in labels])


def view_resizes_of(views: str) -> tuple[int, ...]:
    """Which resize each cached view is cut from (transforms.view_boxes' order)."""
    return tuple(v // 10 for v in range(20)) if views == "ten_crop" else (0,) * (2 if views == "center_flip" else 1)


class _Epoch:
    """One pass over `batches` ((index, item seed) lists): yields (images, labels, *extra(indices)) per batch."""

    def __init__(self, images: "DaliImages", batches: list[list[tuple[int, int]]], crops: DaliCrops,
                 boxes_for: BoxesFor, extra: Optional[Callable[[list[int]], tuple]] = None, squeeze: bool = True):
        self.images, self.batches, self.crops, self.boxes_for = images, batches, crops, boxes_for
        self.extra, self.squeeze = extra, squeeze

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple]:
        pending: deque = deque()
        it = iter(self.batches)

        def source():
            batch = next(it)  # StopIteration ends the pipeline's epoch
            encoded, boxes, sizes, labels = [], [], [], []
            for index, seed in batch:
                data, (w, h), label = self.images.read(index)
                encoded.append(data)
                sizes.append((w, h))
                labels.append(label)
                boxes.append(self.boxes_for(index, w, h, torch.Generator().manual_seed(seed)))
            indices = [index for index, _ in batch]
            pending.append(self.extra(indices) if self.extra is not None else ())
            return self.crops.inputs(encoded, boxes, sizes, labels)

        for images, labels in self.crops.run(source):
            x, y = self.crops.to_torch(images, labels)
            yield (x[:, 0] if self.squeeze else x, y, *pending.popleft())


class DaliImages:
    """An ImageFolder read through DALI: the training set of data.loader=dali.

    `epoch_loader` (called by loader.epoch_loader with this rank's micro-batches) yields (images (B, 3, S, S) in
    [0, 1] on `device`, labels), each image cut as `transform` cuts it from the PIL image. `num_skipped` counts the
    distinct unreadable files this process met, as ImageFolderDataset's does."""

    def __init__(self, folder, scan: Scan, transform: Optional[ImageTransform], device: torch.device,
                 num_threads: int = 1):
        require_dali()
        self.folder, self.scan, self.transform = folder, scan, transform
        self.samples, self.root = folder.samples, folder.root
        self.device, self.num_threads = torch.device(device), num_threads
        self.epoch = 0
        self._crops: dict[tuple, DaliCrops] = {}  # one pipeline per output shape, kept across epochs
        self._skipped: set[int] = set()
        self._bad: set[int] = set()  # readable at the scan, unreadable now
        self._changed: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _skip(self, index: int, reason: str) -> None:
        if index not in self._skipped:
            self._skipped.add(index)
            log.warning("skipping unreadable image %s (%s); %d skipped so far", self.samples[index][0], reason,
                        self.num_skipped)

    def _bytes(self, j: int) -> Optional[tuple[bytes, tuple[int, int]]]:
        """File j as DALI should get it, with its size; None when it cannot be read now."""
        path = self.samples[j][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        size = self._changed.get(j, (int(self.scan.width[j]), int(self.scan.height[j])))
        if j not in self._changed and (len(data) != self.scan.bytes[j] or checksum(data) != self.scan.crc32[j]):
            status, w, h = inspect_bytes(data)
            log.warning("%s changed since the image scan (%s); checked again with PIL", path, self.scan.dir)
            if status == UNREADABLE:
                return None
            self._changed[j] = size = (w, h)
        if j in self._changed or self.scan.status[j] == REENCODE:
            data = reencode(data)
        return data, size

    def read(self, index: int) -> tuple[bytes, tuple[int, int], int]:
        """(bytes for DALI, (width, height), label) of item `index`: its file, or the readable one replacing it."""
        n = len(self.samples)
        index %= n
        while True:
            j = self.scan.resolve(index, self._bad)
            for k in range(index, index + (j - index) % n):
                self._skip(k % n, "unreadable at the image scan" if k % n not in self._bad else "unreadable now")
            got = self._bytes(j)
            if got is not None:
                return got[0], got[1], self.samples[j][1]
            self._bad.add(j)

    def loader(self, batches: list[list[tuple[int, int]]], size: int, boxes_for: BoxesFor,
               view_resizes: Sequence[int] = (0,), extra: Optional[Callable[[list[int]], tuple]] = None,
               squeeze: bool = True) -> _Epoch:
        """Batches of the boxes `boxes_for` gives each item, (B, V, 3, size, size) ((B, 3, size, size) when squeeze
        and V = 1), with the labels and extra(indices) of each batch."""
        key = (size, tuple(view_resizes), max((len(b) for b in batches), default=1))
        if key not in self._crops:
            self._crops[key] = DaliCrops(size, view_resizes, key[2], self.device, self.num_threads)
        return _Epoch(self, batches, self._crops[key], boxes_for, extra, squeeze)

    def epoch_loader(self, batches: list[list[tuple[int, int]]], num_workers: int = 0, pin_memory: bool = False):
        if self.transform is None:
            raise ValueError("this DaliImages has no transform: it serves cached views only")
        transform = self.transform
        return self.loader(batches, transform.size, lambda index, w, h, generator: [transform.box(w, h, generator)])

    def view_batches(self, indices: list[int], views: str, size: int, batch: int) -> Iterator[torch.Tensor]:
        """All `views` (transforms.view_boxes) of each image of `indices`, `batch` images at a time:
        (n, V, 3, size, size) tensors, for a cache build."""
        batches = [[(i, 0) for i in indices[k:k + batch]] for k in range(0, len(indices), batch)]
        epoch = self.loader(batches, size, lambda index, w, h, generator: view_boxes(views, w, h, size),
                            view_resizes_of(views), squeeze=False)
        for x, _ in epoch:
            yield x
