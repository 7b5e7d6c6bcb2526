"""All Zarr I/O: ragged per-image arrays in sharded Zarr 3 stores.

Token grids (and pixel maps) differ per image, so per-element arrays are stored *ragged*: one
array concatenated over all images, plus ``offsets`` (N+1,) so that image i owns rows
``offsets[i]:offsets[i+1]``. Per-image arrays have N rows. Arrays are chunked along the first axis
(about 1 MB per chunk) and sharded (16 chunks per shard) so a store is a handful of files, which
keeps DVC hashing fast.

Writing is crash-safe: a store is built at ``<path>.partial`` and renamed to ``<path>`` by
:meth:`RaggedWriter.finalize`. A partial store carries a digest and the number of images already
written, so an interrupted writer with the same digest resumes where it stopped. Zarr rewrites a whole
shard file for any write into it, so the writer buffers each array up to its next shard boundary and
writes whole shards; everything buffered is flushed at least every ``flush_every_s`` seconds, the work
an interrupt can lose.

Stores used by the pipeline (names are owned here):
- ``features.zarr``: per token ``keys`` (T, D) float16 (last-block patch keys, concatenated over
  heads), ``cls_logits`` (T, H) float32 (raw q_CLS(h)·k_j(h)); per image ``cls_token`` (N, D),
  ``grid`` (N, 2), ``input_size`` (N, 2: the resized, unpadded h, w), ``image_id`` (N,).
- ``masks.zarr``: per token ``token_mask`` (T,) bool (inside any mined mask) and ``token_label`` (T,)
  uint8 (0 outside every mask, m inside the image's m-th mask); per image ``source`` (N,) (token index
  of the first mask's seed s), ``bottom`` (N,) bool (mined from the least attended side of a_CLS),
  ``grid``, ``input_size``, ``image_id``.
- ``semantic.zarr``: per pixel ``label`` (P,) uint8; per image ``shape`` (N, 2), ``image_id``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from unseg.errors import UserError

CHUNK_BYTES = 1 << 20
CHUNKS_PER_SHARD = 16
CHECKSUMS = True  # crc32c per chunk (the zarr_io benchmark turns it off to measure its cost)


@dataclass(frozen=True)
class Spec:
    """An array's trailing shape and dtype; ``ragged=True`` means one row per element, not per image."""

    tail: tuple[int, ...]
    dtype: str
    ragged: bool


def _chunk_rows(tail: tuple[int, ...], dtype: str) -> int:
    row = int(np.prod(tail, dtype=np.int64)) * np.dtype(dtype).itemsize
    return max(64, CHUNK_BYTES // max(row, 1))


def _create(group: zarr.Group, name: str, rows: int, spec: Spec) -> zarr.Array:
    chunk = min(_chunk_rows(spec.tail, spec.dtype), max(rows, 1))
    shard = chunk * CHUNKS_PER_SHARD
    # float features barely compress (keys: 1.15x with either codec), so multi-byte arrays take lz4, 3x faster
    # to write and 5x to read than zstd; masks and labels (1 byte) compress well with zstd
    cname = "zstd" if np.dtype(spec.dtype).itemsize == 1 else "lz4"
    return group.create_array(
        name,
        shape=(rows, *spec.tail),
        chunks=(chunk, *spec.tail),
        shards=(shard, *spec.tail),
        dtype=spec.dtype,
        # crc32c after compression: a changed byte in any chunk stops the reader (CorruptStore), never a wrong value
        compressors=[
            BloscCodec(cname=cname, clevel=3 if cname == "zstd" else 5, shuffle=BloscShuffle.bitshuffle),
            *([Crc32cCodec()] if CHECKSUMS else []),
        ],
        fill_value=0,
        dimension_names=("element" if spec.ragged else "image", *[f"d{i}" for i in range(len(spec.tail))]),
    )


def _no_empty_chunk_check(array: zarr.Array) -> zarr.Array:
    """``array`` writing every chunk: by default Zarr first compares each (shard-sized) chunk with the fill
    value, byte by byte, to skip writing empty ones; that check took ~10 % of a features store's write
    (py-spy), and whole shards of zeros are rare here."""
    return array.with_config({"write_empty_chunks": True})


class _RowBuffer:
    """Rows of one array waiting for their shard to fill: one array reused between flushes, so each written
    row is copied once on its way in (a buffered view would keep its whole base alive) and never again."""

    def __init__(self, tail: tuple[int, ...], dtype: str):
        self.data = np.empty((0, *tail), dtype)
        self.rows = 0

    def append(self, value: np.ndarray) -> None:
        end = self.rows + len(value)
        if end > len(self.data):
            grown = np.empty((max(end, 2 * len(self.data)), *self.data.shape[1:]), self.data.dtype)
            grown[: self.rows] = self.data[: self.rows]
            self.data = grown
        self.data[self.rows : end] = value
        self.rows = end

    def drop(self, rows: int) -> None:
        """Forget the first ``rows`` rows (written), moving the rest to the front."""
        rest = self.rows - rows
        self.data[:rest] = self.data[rows : self.rows]  # numpy copies through a temporary when these overlap
        self.rows = rest


class RaggedWriter:
    """Streams per-image results into a ragged store, in image order, resumably.

    ``lengths[i]`` is the number of ragged rows of image i (known up front, e.g. from its token grid).
    """

    def __init__(self, path: str | Path, lengths: np.ndarray, specs: Mapping[str, Spec], attrs: dict, digest: str,
                 flush_every_s: float = 30.0):  # fmt: skip
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.lengths = np.asarray(lengths, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.specs = dict(specs)
        self.flush_every_s = flush_every_s
        self.done = 0  # images handed to write(); ``images_done`` in the store counts those on disk
        self._pending = {name: _RowBuffer(spec.tail, spec.dtype) for name, spec in self.specs.items()}
        self._last_flush = time.monotonic()
        if self.partial.exists() and self._resumable(digest):
            self.group = zarr.open_group(self.partial, mode="r+")
            self.done = int(self.group.attrs["images_done"])
            self._stored = {name: self._rows(name, self.done) for name in self.specs}
            self._arrays = {name: _no_empty_chunk_check(self.group[name]) for name in self.specs}
            return
        if self.partial.exists():
            print(f"[store] discarding {self.partial}: written with other inputs or params", file=sys.stderr)
            shutil.rmtree(self.partial)
        self.group = zarr.open_group(self.partial, mode="w")
        n, t = len(self.lengths), int(self.offsets[-1])
        _create(self.group, "offsets", n + 1, Spec((), "int64", False))[:] = self.offsets
        for name, spec in self.specs.items():
            _create(self.group, name, t if spec.ragged else n, spec)
        self.group.attrs.update({**attrs, "digest": digest, "images_done": 0})
        self._stored = {name: 0 for name in self.specs}  # rows of each array on disk
        self._arrays = {name: _no_empty_chunk_check(self.group[name]) for name in self.specs}

    def _resumable(self, digest: str) -> bool:
        """Whether the partial store was written by this very job. A store left half-created by a kill
        (no metadata, no ``offsets``) is not; any other error (a permission, a full disk) propagates."""
        try:
            g = zarr.open_group(self.partial, mode="r")
            return g.attrs.get("digest") == digest and np.array_equal(g["offsets"][:], self.offsets)
        except (FileNotFoundError, KeyError, ValueError):  # zarr.errors.BaseZarrError is a ValueError
            return False

    def _rows(self, name: str, images: int) -> int:
        """Rows of array ``name`` that the first ``images`` images fill."""
        return int(self.offsets[images]) if self.specs[name].ragged else images

    def write(self, start: int, values: Mapping[str, np.ndarray]) -> None:
        """Write images ``start .. start+n-1`` (``n`` from the per-image arrays); must follow ``done``."""
        if start != self.done:
            raise ValueError(f"writes must be sequential: expected image {self.done}, got {start}")
        if set(values) != set(self.specs):
            raise ValueError(f"write() needs every array of the store {sorted(self.specs)}, got {sorted(values)}")
        per_image = [len(v) for name, v in values.items() if not self.specs[name].ragged]
        if not per_image:
            raise ValueError("write() needs at least one per-image array to know how many images it holds")
        n = per_image[0]
        values = {name: np.asarray(value) for name, value in values.items()}
        for name, value in values.items():  # all checked before any is buffered
            expected = self._rows(name, start + n) - self._rows(name, start)
            if len(value) != expected:
                raise ValueError(f"{name}: {len(value)} rows for images {start}..{start + n - 1}, expected {expected}")
            if value.shape[1:] != self.specs[name].tail:
                raise ValueError(f"{name}: rows of shape {value.shape[1:]}, expected {self.specs[name].tail}")
        for name, value in values.items():
            self._pending[name].append(value)
        self.done = start + n
        self.flush(whole_shards_only=time.monotonic() - self._last_flush < self.flush_every_s)

    def flush(self, whole_shards_only: bool = False) -> None:
        """Write the buffered rows (with ``whole_shards_only``, those up to each array's last shard boundary),
        then record in the store how many images are complete on disk."""
        for name, buffer in self._pending.items():
            array, lo = self._arrays[name], self._stored[name]
            end = hi = lo + buffer.rows
            if whole_shards_only:
                shard = (array.shards or array.chunks)[0]
                hi = max(lo, end // shard * shard)
            if hi == lo:
                continue
            array[lo:hi] = buffer.data[: hi - lo]
            buffer.drop(hi - lo)
            self._stored[name] = hi
        complete = min(
            int(np.searchsorted(self.offsets, rows, side="right")) - 1 if self.specs[name].ragged else rows
            for name, rows in self._stored.items()
        )
        if complete != self.group.attrs["images_done"]:
            self.group.attrs["images_done"] = complete
        if not whole_shards_only:
            self._last_flush = time.monotonic()

    def finalize(self) -> Path:
        self.flush()
        if self.done != len(self.lengths):
            raise ValueError(f"{self.path}: only {self.done} of {len(self.lengths)} images written")
        with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to v3; we want it
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.partial)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.partial, self.path)
        return self.path


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous share [lo, hi) of ``n`` images that process ``rank`` of ``world`` writes (the first
    ``n % world`` ranks take one more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def is_finished(path: str | Path, digest: str, n_images: int) -> bool:
    """Whether ``path`` is a finalized store of ``n_images`` written with ``digest``."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return False
    s = RaggedStore(path)
    return s.attrs.get("digest") == digest and len(s) == n_images


def shard_path(path: str | Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` builds its share of the store at ``path`` (a sibling folder)."""
    path = Path(path)
    return path.with_name(f"{path.name}.shard-{rank}-of-{world}")


def merge_shards(
    path: str | Path, lengths: np.ndarray, specs: Mapping[str, Spec], attrs: dict, digest: str, world: int,
    block: int = 64,
) -> Path:  # fmt: skip
    """The store at ``path`` from the ``world`` finished shard stores of :func:`shard_path`, in rank order
    (each holds a contiguous range of images, :func:`shard_bounds`), copied ``block`` images at a time;
    the shards are removed afterwards. Ranks write separate stores because Zarr chunks hold rows of
    neighbouring images: two processes writing one chunk would overwrite each other's rows."""
    w = RaggedWriter(path, lengths, specs, attrs, digest)
    for rank in range(world):
        lo, hi = shard_bounds(len(lengths), rank, world)
        shard = RaggedStore(shard_path(path, rank, world))
        if len(shard) != hi - lo:
            raise ValueError(f"{shard.path}: {len(shard)} images, expected {hi - lo}")
        for start in range(max(w.done - lo, 0), hi - lo, block):
            stop = min(start + block, hi - lo)
            w.write(lo + start, {
                name: shard.span(name, start, stop) if spec.ragged else shard[name][start:stop]
                for name, spec in specs.items()
            })  # fmt: skip
    out = w.finalize()
    for rank in range(world):
        shutil.rmtree(shard_path(path, rank, world))
    return out


def write_ragged(
    path: str | Path,
    offsets_or_lengths: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    ragged: set[str],
    attrs: dict,
    lengths: bool = True,
) -> Path:
    """Write a whole ragged store at once (small stores: masks, semantic maps)."""
    lens = np.asarray(offsets_or_lengths) if lengths else np.diff(offsets_or_lengths)
    specs = {k: Spec(tuple(v.shape[1:]), str(v.dtype), k in ragged) for k, v in arrays.items()}
    w = RaggedWriter(path, lens, specs, attrs, digest="once")
    if w.done:  # a leftover partial store of a whole-store write is never worth resuming
        shutil.rmtree(w.partial)
        w = RaggedWriter(path, lens, specs, attrs, digest="once")
    w.write(0, arrays)
    return w.finalize()


class CorruptStore(UserError):
    """A store whose bytes changed after it was written (a chunk or shard-index checksum, or its metadata)."""


def _corrupt(path: Path, what: str, err: Exception) -> CorruptStore:
    return CorruptStore(
        f"{path}: {what} is corrupted ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
        f"restore it with `dvc checkout {path}` or rerun the stage that writes it"
    )


class CheckedArray:
    """A read-only zarr array whose reads turn a checksum or decoding failure into one :class:`CorruptStore` line."""

    def __init__(self, array: zarr.Array, path: Path, name: str):
        self._array, self._path, self._name = array, path, name

    def __getitem__(self, key) -> np.ndarray:
        try:
            return self._array[key]
        except (ValueError, RuntimeError, OSError) as err:  # crc32c mismatch, blosc or shard-index failure
            raise _corrupt(self._path, f"array {self._name}", err) from err

    def __len__(self) -> int:
        return len(self._array)

    def __getattr__(self, attr: str):
        return getattr(self._array, attr)


class RaggedStore:
    """Read access: ``store[name]`` is the (checked) zarr array, ``rows(name, i)`` image i's ragged rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: store not found (run the stage that writes it first)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.group = zarr.open_group(self.path, mode="r", use_consolidated=True)
            self.attrs = dict(self.group.attrs)
        except (ValueError, KeyError, TypeError, OSError) as err:  # unreadable zarr.json metadata
            raise _corrupt(self.path, "the metadata", err) from err
        self.offsets = self["offsets"][:]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, name: str) -> CheckedArray:
        try:
            array = self.group[name]
        except KeyError as err:
            raise _corrupt(self.path, f"array {name} (missing)", err) from err
        return CheckedArray(array, self.path, name)

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def read(self, name: str) -> np.ndarray:
        return self[name][:]

    def rows(self, name: str, i: int) -> np.ndarray:
        return self[name][int(self.offsets[i]) : int(self.offsets[i + 1])]

    def span(self, name: str, start: int, stop: int) -> np.ndarray:
        """Ragged rows of images ``start..stop-1`` concatenated (one read)."""
        return self[name][int(self.offsets[start]) : int(self.offsets[stop])]


# ---------------------------------------------------------------- named stores

FEATURE_SPECS = {
    "keys": lambda d, h: Spec((d,), "float16", True),
    "cls_logits": lambda d, h: Spec((h,), "float32", True),
    "cls_token": lambda d, h: Spec((d,), "float32", False),
    "grid": lambda d, h: Spec((2,), "int32", False),
    "input_size": lambda d, h: Spec((2,), "int32", False),
    "image_id": lambda d, h: Spec((), "int64", False),
}


def feature_specs(dim: int, heads: int) -> dict[str, Spec]:
    return {name: make(dim, heads) for name, make in FEATURE_SPECS.items()}


def feature_writer(path: str | Path, grids: np.ndarray, dim: int, heads: int, attrs: dict, digest: str,
                   flush_every_s: float = 30.0) -> RaggedWriter:  # fmt: skip
    """Writer for ``features.zarr``; ``grids`` (N, 2) gives each image's token grid (h, w)."""
    return RaggedWriter(path, grids[:, 0] * grids[:, 1], feature_specs(dim, heads), attrs, digest, flush_every_s)


def write_masks(
    path: str | Path,
    features: RaggedStore,
    token_label: np.ndarray,
    source: np.ndarray,
    bottom: np.ndarray,
    attrs: dict,
) -> Path:
    """``masks.zarr``, aligned row-for-row with ``features``: per token ``token_label`` (0 outside every mask,
    m inside the image's m-th mask) and ``token_mask`` (inside any); per image the source token of the first
    mask and ``bottom`` (the masks were mined from the least attended side of a_CLS)."""
    return write_ragged(
        path,
        features.offsets,
        {
            "token_mask": token_label > 0,
            "token_label": token_label.astype(np.uint8),
            "source": source.astype(np.int32),
            "bottom": bottom.astype(bool),
            "grid": features.read("grid"),
            "input_size": features.read("input_size"),
            "image_id": features.read("image_id"),
        },
        ragged={"token_mask", "token_label"},
        attrs=attrs,
        lengths=False,
    )


def write_semantic(path: str | Path, image_ids: np.ndarray, labels: list[np.ndarray], attrs: dict) -> Path:
    """``semantic.zarr``: one uint8 label map per image (ragged over pixels)."""
    shapes = np.array([lab.shape for lab in labels], np.int32).reshape(-1, 2)
    flat = np.concatenate([lab.reshape(-1) for lab in labels]) if labels else np.zeros(0, np.uint8)
    return write_ragged(
        path,
        shapes[:, 0].astype(np.int64) * shapes[:, 1],
        {"label": flat.astype(np.uint8), "shape": shapes, "image_id": np.asarray(image_ids, np.int64)},
        ragged={"label"},
        attrs=attrs,
    )


def read_semantic_map(store: RaggedStore, i: int) -> np.ndarray:
    h, w = store["shape"][i]
    return store.rows("label", i).reshape(int(h), int(w))
