"""Streaming safetensors I/O with bounded memory.

Reading: each input file is memory-mapped and tensors are zero-copy views of it. The pages of a
chunk are released (MADV_DONTNEED) as soon as it is consumed, and the next tensor's pages are
requested ahead (MADV_WILLNEED, the kernel reads them while we compute). So the resident set
stays at a few chunks whatever the model size, and disk reads overlap the merge.

Writing: the output layout (shards, headers, offsets) is fixed before any data is merged, so
each shard is written front to back by a background thread while the next chunk is computed.

Headers are validated before anything is merged: a truncated or corrupt file, a missing shard
or a pickle checkpoint is refused with a message naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
MAX_HEADER_BYTES = 100 << 20
PAGE = mmap.PAGESIZE
# Linux >= 5.14: map a range's pages in one call instead of one fault per 64 KB. Python 3.11's
# mmap module does not name it; older kernels answer EINVAL and we stop asking.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: file and absolute byte range."""
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors file's header against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: corrupt or truncated safetensors file (header length "
                             f"{header_len} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: a JSON object is expected, got "
                         f"{type(header).__name__}")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has an unsupported or corrupt header "
                             f"entry {info!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {list(shape)} "
                             f"of {info['dtype']}: corrupt header")
        if data_start + end > size:
            raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                             f"but the file has {size} bytes")
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + begin, data_start + end)
    return entries


def read_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of a HF model directory (single file or sharded with an index)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: corrupt index ({exc!r})") from None
        entries = {}
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise FileNotFoundError(f"{index} names shard {shard}, which is missing")
            entries.update(read_header(model_dir / shard))
        for name, shard in weight_map.items():
            if name not in entries or entries[name].file.name != shard:
                raise ValueError(f"{index}: tensor {name!r} is not in its shard {shard}")
        return entries
    if (model_dir / SINGLE_FILE).is_file():
        return read_header(model_dir / SINGLE_FILE)
    pickles = [p.name for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern)]
    if pickles:
        raise ValueError(f"{model_dir}: only pickle checkpoints ({', '.join(sorted(pickles))}); dafast "
                         "loads safetensors only, as pickle files can run code. Convert them first.")
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


class MappedFiles:
    """Read-only memory maps of input files, with zero-copy tensor views and page release."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._can_populate = hasattr(mmap, "MADV_DONTNEED")

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def view(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor's bytes as a flat tensor, without copying (copied only if misaligned)."""
        if entry.numel == 0:
            return torch.empty(0, dtype=entry.dtype)
        with warnings.catch_warnings():  # read-only buffer: we never write to the view
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map(entry.file), dtype=torch.uint8,
                                    count=entry.end - entry.start, offset=entry.start)
        if entry.start % entry.dtype.itemsize:
            flat = flat.clone()
        return flat.view(entry.dtype)

    def _advise(self, entry: TensorEntry, start: int, end: int, advice: int) -> None:
        lo = (start // PAGE) * PAGE
        hi = min(-(-end // PAGE) * PAGE, len(self._map(entry.file)))
        if hi > lo:
            self._map(entry.file).madvise(advice, lo, hi - lo)

    def prefetch(self, entry: TensorEntry) -> None:
        self._advise(entry, entry.start, entry.end, mmap.MADV_WILLNEED)

    def populate(self, entry: TensorEntry, first: int, count: int) -> None:
        """Map the pages of elements [first, first+count) ahead of reading them."""
        if not self._can_populate:
            return
        start = entry.start + first * entry.dtype.itemsize
        try:
            self._advise(entry, start, start + count * entry.dtype.itemsize, MADV_POPULATE_READ)
        except OSError:
            self._can_populate = False

    def release(self, entry: TensorEntry, first: int = 0, count: int | None = None) -> None:
        """Drop the pages of elements [first, first+count) from this process (not the cache)."""
        size = entry.dtype.itemsize
        count = entry.numel - first if count is None else count
        start = entry.start + first * size
        self._advise(entry, start, start + count * size, mmap.MADV_DONTNEED)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the GC will unmap it
                pass
        self._maps.clear()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors into shards of at most max_shard_bytes (one tensor may exceed it alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes planned shards front to back from a background thread, then the index.

    `write(buffer)` queues bytes of the tensors in plan order; the queue is short, so at most a
    few chunks wait in memory. `close()` flushes (and with fsync=True waits for the disk) and writes the index.
    """

    def __init__(self, out_dir: Path, shards: list[list[OutputTensor]], metadata: dict[str, str],
                 fsync: bool = False):
        self.out_dir, self.fsync = out_dir, fsync
        self.names = shard_names(len(shards))
        self.shards = shards
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._files = []
        for name, tensors in zip(self.names, shards):
            f = open(out_dir / name, "wb")
            self._files.append(f)
            f.write(self._header(tensors, metadata))
        self._thread = threading.Thread(target=self._drain, name="dafast-shard-writer", daemon=True)
        self._thread.start()

    @staticmethod
    def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
        header: dict = {"__metadata__": {"format": "pt", **metadata}}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        return len(raw).to_bytes(8, "little") + raw

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            shard, data, done = item
            try:
                if self._error is None:
                    self._files[shard].write(data)
            except BaseException as exc:  # reported to the producer at its next write
                self._error = exc
            finally:
                if done is not None:
                    done()

    def write(self, shard: int, data, done=None) -> None:
        """Queue bytes (a buffer-protocol object) for shard `shard`; `done()` runs once written."""
        if self._error is not None:
            raise self._error
        self._queue.put((shard, data, done))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        for f in self._files:
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
            f.close()
        if len(self.names) > 1:
            weight_map = {t.name: name for name, tensors in zip(self.names, self.shards) for t in tensors}
            total = sum(t.nbytes for tensors in self.shards for t in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
        for f in self._files:
            f.close()


def iter_rows(numel: int, row_len: int, max_elements: int) -> Iterator[tuple[int, int]]:
    """Row ranges [r0, r1) of a [numel / row_len, row_len] tensor, at most max_elements each."""
    rows = numel // row_len if row_len else 0
    step = max(1, max_elements // max(row_len, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)
