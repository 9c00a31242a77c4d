"""HDF5 volume datasets: writing, inspecting and streaming with ``tf.data``.

Expected layout (keys configurable)::

    /volumes   N x D x H x W x C, any real numeric dtype, chunked along N
    /labels    N int (stored as int64 by write_hdf5_volumes)
    attrs      norm_mean, norm_std : float32 (C,)  -- on /volumes (or the file)
               num_classes : int                   -- on /labels (or the file)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import h5py
import numpy as np
import tensorflow as tf

from wrn3d_tl.validate import check_int, is_int
from wrn3d_tl.files import written_atomically

from .pipeline import (AUTOTUNE, _augmenter, _batch_transform, _check_pipeline_flags,
                       _check_labels, _element_seed, _finish, _tagged)
from .shards import EpochCounter, Share, start_of
from .reading import check_class_names, check_preprocessing
from .transforms import (Normalization, as_normalization,
                         compute_normalization)

__all__ = ["HDF5Info", "hdf5_info", "hdf5_dataset", "write_hdf5_volumes"]

_CHUNK_BYTES = 1 << 20      # default chunk / read block target: ~1 MiB
_WINDOW_BYTES = 64 << 20    # default in-memory shuffle window: ~64 MiB


@dataclasses.dataclass(frozen=True)
class HDF5Info:
    """Summary of a validated HDF5 volume dataset (see :func:`hdf5_info`).

    Attributes:
      path, x_key, y_key: where the data lives.
      n: number of samples N.
      volume_shape: ``(D, H, W, C)`` of one volume.
      dtype: numpy dtype of the stored volumes (native byte order).
      num_classes: the ``num_classes`` attribute if stored, else
        ``max(label) + 1``.
      normalization: :class:`Normalization` from the ``norm_mean`` /
        ``norm_std`` attributes, or ``None``.
      chunk_len: samples per HDF5 chunk along N (``None`` if contiguous).
      preprocessing: how the volumes were made from raw files (the ``preprocessing``
        JSON attribute ``nifti_to_hdf5`` writes), or ``None``.
      class_names: the classes' names in index order (the ``class_names`` JSON
        attribute of the labels), or ``None``.
    """

    path: str
    x_key: str
    y_key: str
    n: int
    volume_shape: tuple
    dtype: np.dtype
    num_classes: int
    normalization: Normalization | None
    chunk_len: int | None
    preprocessing: dict | None = None
    class_names: tuple | None = None


def _where(path, key=None) -> str:
    return f"{path!r}" if key is None else f"{path!r} key {key!r}"


def _dataset_keys(f: h5py.File) -> list:
    keys = []
    f.visititems(lambda name, obj: keys.append(name)
                 if isinstance(obj, h5py.Dataset) else None)
    return keys


def _attr(name, *objects):
    for obj in objects:
        if name in obj.attrs:
            return obj.attrs[name]
    return None


def _inspect(path, x_key, y_key, num_classes=None):
    """Validate the file; return (HDF5Info, int64 labels)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"HDF5 file {path!r} does not exist (expected volumes at key "
            f"{x_key!r} and labels at key {y_key!r})")
    if os.path.isdir(path) or not h5py.is_hdf5(path):
        raise ValueError(
            f"{path!r} is not an HDF5 file (expected volumes at key {x_key!r} "
            f"and labels at key {y_key!r})")
    with h5py.File(path, "r") as f:
        for key in (x_key, y_key):
            if not isinstance(f.get(key), h5py.Dataset):
                raise ValueError(
                    f"{_where(path, key)}: no such dataset; datasets present: "
                    f"{_dataset_keys(f)}")
        dx, dy = f[x_key], f[y_key]
        if dx.ndim != 5:
            raise ValueError(
                f"{_where(path, x_key)}: volumes must be 5-D N x D x H x W x C,"
                f" got shape {dx.shape}")
        if dx.dtype.kind not in "iuf":
            raise ValueError(
                f"{_where(path, x_key)}: volumes must be numeric (int, uint or "
                f"float), got dtype {dx.dtype}")
        n = dx.shape[0]
        if n == 0:
            raise ValueError(f"{_where(path, x_key)}: empty dataset (shape "
                             f"{dx.shape})")
        if dy.shape not in ((n,), (n, 1)):
            raise ValueError(
                f"{path!r}: key {x_key!r} holds {n} volumes but key {y_key!r} "
                f"has shape {dy.shape}; expected ({n},)")
        if dy.dtype.kind not in "iu":
            raise ValueError(f"{_where(path, y_key)}: labels must be integers, "
                             f"got dtype {dy.dtype}")
        labels = np.asarray(dy[()], dtype=np.int64).reshape(-1)
        if labels.min() < 0:
            i = int(np.argmin(labels))
            raise ValueError(f"{_where(path, y_key)}: labels must be >= 0, got "
                             f"{labels[i]} at index {i}")
        stored = _attr("num_classes", dy, dx, f)
        stored = None if stored is None else int(stored)
        limit = num_classes if num_classes is not None else stored
        if limit is not None and labels.max() >= limit:
            i = int(np.argmax(labels))
            source = ("num_classes" if num_classes is not None
                      else "the stored num_classes attribute")
            raise ValueError(
                f"{_where(path, y_key)}: label {labels[i]} at index {i} is >= "
                f"{source} = {limit}")
        mean, std = _attr("norm_mean", dx, f), _attr("norm_std", dx, f)
        norm = None
        if mean is not None and std is not None:
            try:
                norm = Normalization(mean=mean, std=std)
            except ValueError as err:
                raise ValueError(f"{_where(path, x_key)}: bad norm_mean/"
                                 f"norm_std attributes: {err}") from err
            if norm.channels != dx.shape[-1]:
                raise ValueError(
                    f"{_where(path, x_key)}: norm_mean/norm_std have "
                    f"{norm.channels} channels, volumes have {dx.shape[-1]}")
        preprocessing = _attr("preprocessing", dx)
        try:
            preprocessing = check_preprocessing(None if preprocessing is None else json.loads(preprocessing))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{_where(path, x_key)}: bad preprocessing attribute: {e}") from e
        names = _attr("class_names", dy)
        try:
            names = None if names is None else json.loads(names)
            names = check_class_names(names, len(names) if isinstance(names, list) else -1, "class_names")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{_where(path, y_key)}: bad class_names attribute: {e}") from e
        if names is not None and stored is not None and len(names) != stored:
            raise ValueError(f"{_where(path, y_key)}: {len(names)} class_names but num_classes={stored}")
        if names is not None and labels.max() >= len(names):
            raise ValueError(f"{_where(path, y_key)}: label {labels.max()} has no name among the "
                             f"{len(names)} class_names")
        info = HDF5Info(
            preprocessing=preprocessing, class_names=names,
            path=path, x_key=x_key, y_key=y_key, n=int(n),
            volume_shape=tuple(int(s) for s in dx.shape[1:]),
            dtype=dx.dtype.newbyteorder("="),
            num_classes=stored if stored is not None else int(labels.max()) + 1,
            normalization=norm,
            chunk_len=int(dx.chunks[0]) if dx.chunks else None)
    return info, labels


def hdf5_info(path, x_key: str = "volumes", y_key: str = "labels") -> HDF5Info:
    """Validate an HDF5 volume file and summarise it (reads labels only).

    Returns an :class:`HDF5Info` (``n``, ``volume_shape`` ``(D, H, W, C)``,
    ``dtype``, ``num_classes``, ``normalization`` ...).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: not an HDF5 file, missing keys (the keys present are
        listed), volumes not 5-D / not numeric / empty, label count differs
        from N, labels not integer, negative, or >= the stored
        ``num_classes``. Messages name the file and the key.
    """
    return _inspect(path, x_key, y_key)[0]


def write_hdf5_volumes(path, volumes, labels, *, x_key: str = "volumes",
                       y_key: str = "labels", chunks=None, normalization=None,
                       compression=None, num_classes=None, mode: str = "w",
                       class_names=None) -> HDF5Info:
    """Write volumes and labels to an HDF5 file in the layout
    :func:`hdf5_dataset` streams from.

    Args:
      path: output file.
      volumes: ``(N, D, H, W, C)`` array-like (numpy array, memmap or
        ``h5py.Dataset``) of any real numeric dtype (stored unchanged). It is
        copied chunk by chunk, never converted as a whole.
      labels: integer labels of shape ``(N,)`` (stored as int64).
      x_key, y_key: dataset names (may contain groups, e.g. ``"train/x"``).
      chunks: HDF5 chunk shape; default ``(k, D, H, W, C)`` with k the number
        of volumes in ~1 MiB (1 <= k <= 64).
      normalization: ``None``, a :class:`Normalization` (raw units), or
        ``"compute"`` to compute it from ``volumes`` with
        :func:`compute_normalization`; stored as float32 ``norm_mean`` /
        ``norm_std`` attributes of the volumes dataset.
      compression: ``None``, ``"gzip"``, ``"lzf"`` or a gzip level 0..9.
      num_classes: optional int stored as the ``num_classes`` attribute of the
        labels dataset; labels must be < num_classes.
      mode: ``"w"`` (create / overwrite the file) or ``"a"`` (add datasets to
        an existing file, e.g. a test split under other keys).
      class_names: optional names of the classes in index order, stored as the
        ``class_names`` JSON attribute of the labels (a ``Trainer`` on
        :func:`hdf5_dataset` of the file stores them in its checkpoints).

    Returns:
      :func:`hdf5_info` of the written file.
    """
    path = os.fspath(path)
    if x_key == y_key:
        raise ValueError(f"x_key and y_key must differ, both are {x_key!r}")
    if mode not in ("w", "a"):
        raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
    if not hasattr(volumes, "shape") or not hasattr(volumes, "dtype"):
        volumes = np.asarray(volumes)
    shape, dtype = tuple(volumes.shape), np.dtype(volumes.dtype)
    if len(shape) != 5:
        raise ValueError(f"volumes must be 5-D N x D x H x W x C, got shape "
                         f"{shape}")
    if dtype.kind not in "iuf":
        raise ValueError(f"volumes must be numeric, got dtype {dtype}")
    n = shape[0]
    if n == 0:
        raise ValueError(f"volumes is empty (shape {shape})")
    labels = _check_labels(labels, n, "labels")
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes")
        if labels.max() >= num_classes:
            raise ValueError(f"labels must be < num_classes={num_classes}, got "
                             f"max {labels.max()}")
    if class_names is not None:
        class_names = check_class_names(class_names, len(class_names) if isinstance(class_names, (list, tuple))
                                        else -1, "class_names")
        if num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        if labels.max() >= len(class_names):
            raise ValueError(f"labels must be < len(class_names)={len(class_names)}, got max {labels.max()}")
    if isinstance(normalization, str) and normalization == "compute":
        normalization = compute_normalization(volumes)
    normalization = as_normalization(normalization, shape[-1], "volumes")
    if chunks is None:
        per_volume = max(1, math.prod(shape[1:]) * dtype.itemsize)
        chunks = (max(1, min(64, n, _CHUNK_BYTES // per_volume)),) + shape[1:]
    elif (len(tuple(chunks)) != 5
          or not all(is_int(c) and c > 0 for c in chunks)):
        raise ValueError(f"chunks must be 5 positive ints (one chunk's "
                         f"N, D, H, W, C extent), got {chunks!r}")
    kwargs = {"chunks": tuple(int(c) for c in chunks)}
    if is_int(compression):
        kwargs.update(compression="gzip", compression_opts=int(compression))
    elif compression is not None:
        kwargs["compression"] = compression

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as Trainer.save does
    if mode == "w":   # a failure part-way leaves the old file (or none), not half of a new one
        with written_atomically(path) as tmp:
            _write_volumes(tmp, volumes, labels, x_key, y_key, kwargs, normalization, num_classes, "w", class_names)
    else:
        _write_volumes(path, volumes, labels, x_key, y_key, kwargs, normalization, num_classes, "a", class_names)
    return hdf5_info(path, x_key, y_key)


def _write_volumes(path, volumes, labels, x_key, y_key, kwargs, normalization, num_classes, mode, class_names):
    shape, dtype, n = tuple(volumes.shape), np.dtype(volumes.dtype), volumes.shape[0]
    with h5py.File(path, mode) as f:
        for key in (x_key, y_key):
            if key in f:
                raise ValueError(f"{_where(path, key)} already exists")
        dx = f.create_dataset(x_key, shape=shape, dtype=dtype, **kwargs)
        step = kwargs["chunks"][0] * max(1, 16 // kwargs["chunks"][0])
        for start in range(0, n, step):
            dx[start:start + step] = np.asarray(volumes[start:start + step])
        dy = f.create_dataset(y_key, data=labels)
        if normalization is not None:
            dx.attrs["norm_mean"] = normalization.mean
            dx.attrs["norm_std"] = normalization.std
        if num_classes is not None:
            dy.attrs["num_classes"] = np.int64(num_classes)
        if class_names is not None:
            dy.attrs["class_names"] = json.dumps(list(class_names))


def hdf5_dataset(path, *, x_key: str = "volumes", y_key: str = "labels",
                 batch_size: int, training: bool = False, seed: int = 0,
                 num_classes=None, normalization="file", augment=None,
                 depth_flip: bool = False, shuffle=None,
                 drop_remainder: bool = False, repeat: bool = False,
                 block_size=None, shuffle_buffer=None, crop_padding: int = 4
                 ) -> tf.data.Dataset:
    """Stream batches of volumes from an HDF5 file with ``tf.data``.

    The file is validated up front (see :func:`hdf5_info`), then read in
    contiguous blocks of ``block_size`` volumes (never as a whole). When
    shuffling, each epoch visits the blocks in a random order and shuffles
    the samples inside a window of ``shuffle_buffer`` samples (whole blocks
    read into memory together). Python runs once per block, not per sample.

    Args:
      path: HDF5 file with volumes ``x_key`` (N x D x H x W x C, numeric)
        and labels ``y_key`` (N integers).
      batch_size: positive int.
      training: default for ``augment`` and ``shuffle``.
      seed: int; same seed -> identical batches (per epoch).
      num_classes: if given, labels must be < num_classes (else the stored
        ``num_classes`` attribute, if any, is checked).
      normalization: ``"file"`` (use the stored ``norm_mean``/``norm_std``
        if present, else just cast), ``None`` (just cast to float32), or a
        :class:`Normalization` (or its ``to_dict()``) in the raw units of
        the stored volumes.
      augment: True: one random crop (reflect-pad ``crop_padding``) + h-flip
        per volume, shared by all slices (:func:`augment_volume`); or an
        :class:`Augment3D` / callable ``(volume, seed [2]) -> volume``.
        None: ``training``, except for scans written by ``nifti_to_hdf5``
        (no augmentation unless asked for, as in ``nifti_dataset``).
      depth_flip: with augmentation, also randomly reverse the depth axis.
      shuffle: see above. Without shuffling the order is the file order.
      drop_remainder, repeat: as in :func:`make_dataset`.
      block_size: volumes per read; default a multiple of the HDF5 chunk
        length of ~1 MiB.
      shuffle_buffer: samples per shuffle window; default ~64 MiB of data.

    Returns:
      ``tf.data.Dataset`` of ``(float32 (B, D, H, W, C), int64 (B,))``;
      ``dataset.wrn3d_preprocessing`` is the file's ``preprocessing`` (a
      ``Trainer`` stores it for ``predict``).
    """
    batch_size = check_int(batch_size, "batch_size")
    augment_given = augment
    training, augment, shuffle, depth_flip, drop_remainder, repeat, seed, crop_padding = _check_pipeline_flags(
        training, augment, shuffle, depth_flip, drop_remainder, repeat, seed, crop_padding)
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes")

    info, labels = _inspect(path, x_key, y_key, num_classes)
    if augment is True and info.preprocessing is not None and augment_given is None:
        # scans from nifti_to_hdf5: as in nifti_dataset, no flip is assumed safe for an anatomy
        augment = False
    path, n = info.path, info.n
    channels = info.volume_shape[-1]
    if isinstance(normalization, str):
        if normalization != "file":
            raise ValueError(
                "normalization must be 'file', None, a Normalization or its "
                "to_dict(), got "
                f"{normalization!r}")
        normalization = info.normalization
    else:
        normalization = as_normalization(
            normalization, channels, f"{_where(path, x_key)}")
    if augment is True and min(info.volume_shape[1:3]) <= crop_padding:
        raise ValueError(
            f"{_where(path, x_key)}: augmentation reflect-pads by crop_padding="
            f"{crop_padding}, which needs H and W > {crop_padding}; volumes "
            f"have shape {info.volume_shape}")
    if drop_remainder and not repeat and n < batch_size:
        raise ValueError(f"{_where(path, x_key)}: drop_remainder=True with "
                         f"batch_size={batch_size} > N={n} yields no batches")

    per_volume = max(1, math.prod(info.volume_shape) * info.dtype.itemsize)
    if block_size is None:
        chunk = info.chunk_len or 1
        block_size = chunk * max(1, -(-_CHUNK_BYTES // (chunk * per_volume)))
    block_size = min(n, check_int(block_size, "block_size"))
    if shuffle_buffer is None:
        shuffle_buffer = max(block_size, _WINDOW_BYTES // per_volume)
    shuffle_buffer = check_int(shuffle_buffer, "shuffle_buffer")
    window = max(1, -(-shuffle_buffer // block_size))      # blocks per window
    starts = np.arange(0, n, block_size)
    dtype = info.dtype

    def sizes_of(group):
        return [min(block_size, n - s) for s in group]

    def block_order(epoch, share):
        """``(rng, the starts of the blocks this worker reads in epoch)``: each epoch's seeded
        block order, every ``share.count``-th block from ``share.index`` (disjoint blocks)."""
        rng = np.random.default_rng([seed % 2**64, int(epoch)])
        order = rng.permutation(len(starts)) if shuffle else np.arange(len(starts))
        return rng, [int(starts[i]) for i in order[share.index::share.count]]

    def blocks(epoch, skip, stop, index, count):
        """Python generator for one epoch: (x, y, index, epoch) blocks, samples ``skip`` to
        ``stop`` of this worker's stream (windows before ``skip`` are not read, only their
        shuffles drawn)."""
        epoch, skip, stop = int(epoch), int(skip), int(stop)
        rng, order = block_order(epoch, Share(int(index), int(count)))
        with h5py.File(path, "r") as f:
            dx = f[x_key]
            for w in range(0, len(order), window):
                group = order[w:w + window]
                sizes = sizes_of(group)
                total = sum(sizes)
                if stop <= 0:
                    return
                if skip >= total:
                    if shuffle:
                        rng.permutation(total)  # keeps the later windows' shuffles those of a full pass
                    skip, stop = skip - total, stop - total
                    continue
                xs = [np.asarray(dx[s:s + size], dtype=dtype) for s, size in zip(group, sizes)]
                idx = np.concatenate([np.arange(s, s + size) for s, size in zip(group, sizes)])
                xs = np.concatenate(xs) if len(xs) > 1 else xs[0]
                if shuffle:
                    perm = rng.permutation(len(idx))
                    xs, idx = xs[perm], idx[perm]
                xs, idx = xs[skip:stop], idx[skip:stop]
                stop, skip = stop - total, 0
                for i in range(0, len(idx), block_size):
                    sl = slice(i, i + block_size)
                    yield (xs[sl], labels[idx[sl]], idx[sl],
                           np.full(len(idx[sl]), epoch, np.int64))

    signature = (tf.TensorSpec((None,) + info.volume_shape, tf.as_dtype(dtype)),
                 tf.TensorSpec([None], tf.int64),
                 tf.TensorSpec([None], tf.int64),
                 tf.TensorSpec([None], tf.int64))
    augmenter = _augmenter(augment, crop_padding, depth_flip) if augment else None

    def aug(volume, label, index, epoch):
        return augmenter(volume, _element_seed(seed, epoch, index)), label

    def build(pipeline):
        share = pipeline.share
        per_worker = None
        if share.count > 1:
            def per_worker(epoch):
                return sum(sizes_of(block_order(epoch, share)[1]))
        first, skip = start_of(pipeline, per_worker)
        ds = EpochCounter(first, skip).dataset(repeat).flat_map(
            lambda epoch, skip: tf.data.Dataset.from_generator(
                blocks, args=(epoch, skip, pipeline.samples_per_pass, share.index, share.count),
                output_signature=signature))
        if augmenter is not None:
            ds = ds.unbatch().map(aug, num_parallel_calls=AUTOTUNE, deterministic=True)
            ds = ds.batch(pipeline.replica_batch, drop_remainder=drop_remainder)
        else:
            ds = ds.map(lambda v, label, index, epoch: (v, label))
            ds = ds.rebatch(pipeline.replica_batch, drop_remainder=drop_remainder)
        ds = ds.map(_batch_transform(normalization, None, "repeat"), num_parallel_calls=AUTOTUNE, deterministic=True)
        return _finish(ds, pipeline)

    return _tagged(build, n, batch_size, drop_remainder, repeat, normalization, blocks=len(starts),
                   wrn3d_preprocessing=info.preprocessing, wrn3d_class_names=info.class_names)
