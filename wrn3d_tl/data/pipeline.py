"""In-memory ``tf.data`` input pipelines (``make_dataset``) and shared helpers.

Determinism: all randomness (shuffle order, crops, flips) comes from
stateless RNG ops seeded from ``(seed, epoch, sample index)``, so results do
not depend on parallelism or timing. ``epoch`` counts passes over the data:
the k-th time a dataset object is iterated (or the k-th pass inside a
``repeat=True`` stream) is epoch k, starting at 0 for a freshly built dataset.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

try:  # creating the class directly bypasses tf.distribute variable creators
    from tensorflow.python.ops.resource_variable_ops import (
        ResourceVariable as _HostVariable)
except ImportError:  # pragma: no cover - moved in some future TF
    _HostVariable = tf.Variable

from wrn3d_tl.validate import check_int, is_int

from .shards import EpochCounter, Pipeline, epoch_positions, start_of
from .transforms import (_check_tile_mode,
                         _crop_flip, as_normalization,
                         tile_to_volume)

__all__ = ["make_dataset", "normalization_of", "marked_errors", "data_errors"]

AUTOTUNE = tf.data.AUTOTUNE
_MARK = "\u2039wrn3d_tl\u203a"   # brackets a reader's one-line message inside TensorFlow's error text


def marked_errors(fn):
    """``fn`` for a ``tf.numpy_function``: its ValueError/OSError messages (which name the
    file and the CSV line) are bracketed so :func:`data_errors` can give them back whole."""
    def call(*args):
        try:
            return fn(*args)
        except (ValueError, OSError) as e:
            raise ValueError(f"{_MARK}{' '.join(str(e).split())}{_MARK}") from None
    return call


class data_errors:
    """Context manager around pulling batches: a reader's error raised inside ``tf.data``
    (a ``tf.errors.OpError`` wrapping Python traceback text) comes out as ``ValueError``
    with the reader's one-line message (file, CSV line, what is wrong)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, tf.errors.OpError) and _MARK in (exc.message or ""):
            message = exc.message.split(_MARK)[1]
            raise ValueError(message) from None
        return False


# --------------------------------------------------------------------------
# shared helpers (also used by hdf5.py)
# --------------------------------------------------------------------------
def _check_seed(seed) -> int:
    if not is_int(seed) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed must be an int (int64 range), got {seed!r}")
    return int(seed)


def _check_bool(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_pipeline_flags(training, augment, shuffle, depth_flip, drop_remainder, repeat, seed, crop_padding):
    """Validate the options both pipelines share; ``augment``/``shuffle`` default to ``training``."""
    training = _check_bool("training", training)
    augment = training if augment is None else _check_augment(augment)
    shuffle = training if shuffle is None else _check_bool("shuffle", shuffle)
    return (training, augment, shuffle, _check_bool("depth_flip", depth_flip),
            _check_bool("drop_remainder", drop_remainder), _check_bool("repeat", repeat), _check_seed(seed),
            check_int(crop_padding, "crop_padding", 0))


def _check_augment(augment):
    """``augment``: True/False (the WRN crop + flip) or a callable ``(sample, seed) -> sample``
    such as :class:`~wrn3d_tl.data.Augment3D`, returned as given."""
    if isinstance(augment, (bool, np.bool_)):
        return bool(augment)
    if callable(augment):
        return augment
    raise ValueError(f"augment must be None, True/False, an Augment3D or a callable (sample, seed) -> sample, "
                     f"got {augment!r}")


def _augmenter(augment, crop_padding, depth_flip):
    """The per-sample function ``(sample, seed [2]) -> sample`` for a checked ``augment``."""
    if augment is True:
        return lambda sample, seed: _crop_flip(sample, seed, crop_padding, depth_flip)
    if augment and depth_flip:
        raise ValueError("depth_flip=True belongs to augment=True (the WRN crop + flip); with an Augment3D put "
                         "'D' in its flip_axes")
    return augment


def _epoch_seed(seed: int, epoch, stream: int):
    """Stateless seed (shape [2] int64) for one random stream of one epoch."""
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, stream)


def _element_seed(seed: int, epoch, index):
    """Augmentation seed of sample ``index`` in ``epoch`` (shape [2] int64)."""
    return tf.random.experimental.stateless_fold_in(
        _epoch_seed(seed, epoch, 1), tf.cast(index, tf.int64))


def _permutation(n: int, seed: int, epoch):
    """Deterministic random permutation of 0..n-1 (int64) for ``epoch``."""
    keys = tf.random.stateless_uniform([n], seed=_epoch_seed(seed, epoch, 0))
    return tf.cast(tf.argsort(keys, stable=True), tf.int64)


def _batch_transform(normalization, tile_depth, tile_mode):
    """Batch-level map: cast/normalise to float32, then tile 2D -> 3D."""
    def transform(x, y):
        if normalization is not None:
            x = normalization.apply(x)
        else:
            x = tf.cast(x, tf.float32)
        if tile_depth is not None:
            # tiling commutes with per-channel normalisation (edge-replicate
            # shift), so normalising the smaller 2D batch first is equivalent
            x = tile_to_volume(x, tile_depth, tile_mode)
        return x, y
    return transform


def _finish(ds, pipeline):
    """Prefetch and state the cardinality of one build of ``pipeline`` (when known)."""
    ds = ds.prefetch(AUTOTUNE)
    cardinality = pipeline.cardinality()
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        return ds
    return ds.apply(tf.data.experimental.assert_cardinality(cardinality))


def _tagged(build, n, batch_size, drop_remainder, repeat, normalization, blocks=0, **tags):
    """The dataset of ``build(pipeline)`` (see ``shards.Pipeline``), tagged with the normalisation it
    applies and ``tags`` (``wrn3d_preprocessing``, ...)."""
    tags = {"wrn3d_normalization": None if normalization is None else normalization.to_dict(), **tags}
    return Pipeline(build, n, batch_size, repeat, drop_remainder, tags, blocks=blocks).dataset()


def _sample_order(pipeline, seed, shuffle):
    """Dataset of ``(sample index, epoch)`` in the order the pipeline reads them: per epoch
    (one per pass, or endless with ``repeat``) a fresh seeded permutation when shuffling,
    from the pipeline's start on and only its share of every global batch."""
    n = pipeline.n
    first, skip = start_of(pipeline)

    def per_epoch(epoch, skip):
        order = _permutation(n, seed, epoch) if shuffle else tf.range(n, dtype=tf.int64)
        order = epoch_positions(pipeline, order, epoch, skip)
        return tf.data.Dataset.from_tensor_slices((order, tf.fill(tf.shape(order), epoch)))

    return EpochCounter(first, skip).dataset(pipeline.repeat).flat_map(per_epoch)


def normalization_of(dataset):
    """``(known, stats)``: the normalisation a wrn3d_tl pipeline applies to its batches.

    ``make_dataset`` and ``hdf5_dataset`` tag the dataset they return with the stats they
    apply (``dataset.wrn3d_normalization``: ``{"mean", "std"}`` in raw units, or None for
    raw float32 batches), so a ``Trainer`` fed with it stores them for inference without
    being told twice. Any other dataset, including one derived from a tagged one with
    ``.map``/``.skip``/..., gives ``(False, None)``: unknown.
    """
    if isinstance(dataset, tf.data.Dataset) and hasattr(dataset, "wrn3d_normalization"):
        return True, dataset.wrn3d_normalization
    return False, None


def _check_labels(y, n: int, name: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:      # Keras-style (N, 1) labels
        y = y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of N integer labels, got "
                         f"shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"len(x) = {n} but len({name}) = {len(y)}; they must "
                         "match")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class labels, got dtype "
                         f"{y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {y.min()} "
                         f"at index {int(np.argmin(y))}")
    return y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------
# make_dataset
# --------------------------------------------------------------------------
def make_dataset(x, y, *, batch_size: int, volume_depth=8,
                 tile_mode: str = "repeat", training: bool = True,
                 seed: int = 0, normalization=None, augment=None,
                 depth_flip: bool = False, shuffle=None,
                 drop_remainder: bool = False, repeat: bool = False,
                 crop_padding: int = 4) -> tf.data.Dataset:
    """Build a ``tf.data`` pipeline over in-memory images or volumes.

    Args:
      x: either 2D images ``NHWC`` (e.g. uint8 CIFAR ``(N, 32, 32, 3)``) or
        volumes ``NDHWC``; any real numeric dtype. Copied once into a CPU
        ``tf.Variable`` (same dtype, so uint8 CIFAR costs 150 MB); samples
        are gathered by index and volumes are only built per batch.
      y: integer labels, shape ``(N,)`` (``(N, 1)`` is accepted), >= 0.
      batch_size: positive int.
      volume_depth: for 2D ``x``: slices D per volume (tiled inside the
        pipeline with :func:`tile_to_volume`), or ``None`` to yield 2D
        ``NHWC`` batches for 2D models. For volumetric ``x``: ``None`` or
        equal to ``x.shape[1]`` (volumes are never re-tiled).
      tile_mode: ``"repeat"`` or ``"shift"`` (see :func:`tile_to_volume`).
      training: default for ``augment`` and ``shuffle``.
      seed: int; with the same seed two pipelines yield identical batches.
      normalization: a :class:`Normalization` in raw units (typically
        ``compute_normalization(x_train)``) or its ``to_dict()``, or
        ``None`` -- then values are only cast to float32 (0..255 for uint8
        CIFAR).
      augment: True: WRN augmentation (reflect-pad ``crop_padding``, random
        crop, random h-flip), applied per sample BEFORE tiling so all slices
        share one crop/flip; for volumetric ``x``, :func:`augment_volume`. Or
        an :class:`Augment3D` (volumes) or any callable ``(sample, seed [2])
        -> sample`` of the same shape, applied to the raw sample.
      depth_flip: with volumetric ``x`` and augmentation, also randomly
        reverse the depth axis.
      shuffle: reshuffle every epoch (deterministically from seed and epoch).
      drop_remainder: drop the last incomplete batch.
      repeat: endless stream; epochs follow each other without a gap, so
        every batch is full and batches may span an epoch boundary.
      crop_padding: pixels of reflect padding for the random crop.

    Returns:
      ``tf.data.Dataset`` of ``(x_batch, y_batch)``: ``x_batch`` float32
      ``(B, D, H, W, C)`` (or ``(B, H, W, C)`` when ``volume_depth=None`` and
      ``x`` is 2D), ``y_batch`` int64 ``(B,)``. Its cardinality is known
      (number of batches, or infinite with ``repeat=True``).

    Pipeline: [shuffle] -> gather -> [augment] -> batch -> normalise/cast ->
    [tile] -> prefetch; maps run with ``num_parallel_calls=AUTOTUNE`` and
    ``deterministic=True``.
    """
    batch_size = check_int(batch_size, "batch_size")
    x = np.asarray(x)
    if x.ndim not in (4, 5):
        raise ValueError(
            "x must be 2D images N x H x W x C (rank 4) or volumes "
            f"N x D x H x W x C (rank 5), got shape {x.shape}"
        )
    if x.dtype.kind not in "iuf":
        raise ValueError(f"x must hold real numbers, got dtype {x.dtype}")
    n = len(x)
    if n == 0:
        raise ValueError(f"x is empty (shape {x.shape})")
    y = _check_labels(y, n)
    is_volume = x.ndim == 5
    if volume_depth is not None:
        volume_depth = check_int(volume_depth, "volume_depth")
        if is_volume and volume_depth != x.shape[1]:
            raise ValueError(
                f"x is already volumetric with depth {x.shape[1]} (shape "
                f"{x.shape}); volume_depth must be None or {x.shape[1]}, got "
                f"{volume_depth}"
            )
    _check_tile_mode(tile_mode)
    training, augment, shuffle, depth_flip, drop_remainder, repeat, seed, crop_padding = _check_pipeline_flags(
        training, augment, shuffle, depth_flip, drop_remainder, repeat, seed, crop_padding)
    normalization = as_normalization(normalization, x.shape[-1], "x")
    if augment is True and min(x.shape[-3], x.shape[-2]) <= crop_padding:
        raise ValueError(
            f"augmentation reflect-pads by crop_padding={crop_padding}, which "
            f"needs H and W > {crop_padding}; x has shape {x.shape}"
        )
    if drop_remainder and not repeat and n < batch_size:
        raise ValueError(f"drop_remainder=True with batch_size={batch_size} > "
                         f"N={n} would yield no batches")

    # One copy of x lives in a non-trainable host variable that the map
    # functions capture by handle (tf.convert_to_tensor / from_tensor_slices
    # keep two copies). It is a plain ResourceVariable even inside a
    # tf.distribute scope: input data must not be mirrored onto devices.
    # Volumes are only ever built per batch.
    with tf.device("/CPU:0"):
        x_t = _HostVariable(x, trainable=False, name="make_dataset_x")
        y_t = tf.constant(y)
    tile_depth = None if is_volume else volume_depth
    augmenter = _augmenter(augment, crop_padding, is_volume and depth_flip)
    transform = _batch_transform(normalization, tile_depth, tile_mode)

    def build(pipeline):
        ds = _sample_order(pipeline, seed, shuffle)
        batch = pipeline.replica_batch
        if shuffle or augment:
            def load(index, epoch):
                sample = tf.gather(x_t, index)
                if augment:
                    sample = augmenter(sample, _element_seed(seed, epoch, index))
                return sample, tf.gather(y_t, index)

            ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
            ds = ds.batch(batch, drop_remainder=drop_remainder)
            ds = ds.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
        else:
            # fixed order, no randomness: gather whole batches at once
            ds = ds.batch(batch, drop_remainder=drop_remainder)
            ds = ds.map(lambda i, _: transform(tf.gather(x_t, i), tf.gather(y_t, i)),
                        num_parallel_calls=AUTOTUNE, deterministic=True)
        return _finish(ds, pipeline)

    return _tagged(build, n, batch_size, drop_remainder, repeat, normalization)
