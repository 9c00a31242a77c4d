"""Tensor-level transforms: 2D->3D tiling, normalisation and augmentation.

Layout conventions used throughout ``wrn3d_tl.data``:

* ``HWC`` / ``NHWC``    -- one image / a batch of images (height, width, channels).
* ``DHWC`` / ``NDHWC``  -- one volume / a batch of volumes (depth first).

Every function here is a TensorFlow op: it runs eagerly and inside
``tf.data`` map functions / ``tf.function``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from wrn3d_tl.validate import check_int

__all__ = [
    "TILE_MODES",
    "tile_to_volume",
    "Normalization",
    "compute_normalization",
    "augment_image",
    "augment_volume",
    "as_normalization",
    "same_normalization",
]

TILE_MODES = ("repeat", "shift")


# --------------------------------------------------------------------------
# small argument checks shared by the package
# --------------------------------------------------------------------------
def _check_tile_mode(mode) -> str:
    if mode not in TILE_MODES:
        raise ValueError(f"mode must be one of {TILE_MODES}, got {mode!r}")
    return mode


# --------------------------------------------------------------------------
# 2D -> 3D tiling
# --------------------------------------------------------------------------
def tile_to_volume(images, depth: int, mode: str = "repeat") -> tf.Tensor:
    """Turn 2D images into volumes by stacking ``depth`` slices.

    Args:
      images: ``NHWC`` batch -> result ``NDHWC``, or a single ``HWC`` image ->
        result ``DHWC``. Any dtype; the dtype is preserved.
      depth: number of slices D (positive Python int).
      mode: ``"repeat"`` -- every slice is the unchanged image, i.e. the image
        seen as a volume that is constant along depth. Use it to run a 3D
        network on 2D data (sanity checks, CIFAR baselines): the depth axis
        carries no information, so a 3D WRN should match its 2D counterpart.
        ``"shift"`` -- slice ``d`` is the image translated horizontally by
        ``s = d - depth // 2`` pixels (content moves right for ``s > 0``,
        slice ``depth // 2`` is the original), like a camera pan in a short
        video clip. Pixels that enter from outside the image replicate the
        nearest edge column (edge-replicate, not zero fill):
        ``out[d, h, w] = image[h, clip(w - s, 0, W - 1)]``. Use it when the
        depth axis should carry real structure (3D kernels must track motion).
        Edge replication also means the op commutes with per-channel
        normalisation.

    Returns:
      A tensor of rank ``rank(images) + 1`` with the depth axis inserted just
      before H (``NDHWC`` or ``DHWC``), same dtype as ``images``.

    Raises:
      ValueError: ``depth`` not a positive int, unknown ``mode`` or ``images``
        not of rank 3 or 4.
    """
    depth = check_int(depth, "depth")
    _check_tile_mode(mode)
    images = tf.convert_to_tensor(images)
    rank = images.shape.rank
    if rank not in (3, 4):
        raise ValueError(
            "images must be HWC (rank 3) or NHWC (rank 4), got shape "
            f"{images.shape}"
        )
    if mode == "repeat":
        return tf.repeat(tf.expand_dims(images, axis=-4), depth, axis=-4)

    # "shift": gather columns with a (D, W) index table.
    width = tf.shape(images, out_type=tf.int32)[-2]
    shifts = tf.range(depth, dtype=tf.int32) - depth // 2           # (D,)
    cols = tf.range(width, dtype=tf.int32)[None, :] - shifts[:, None]  # (D, W)
    cols = tf.clip_by_value(cols, 0, width - 1)
    if rank == 3:   # HWC -> H D W C -> D H W C
        out = tf.gather(images, cols, axis=1)
        out = tf.transpose(out, [1, 0, 2, 3])
    else:           # NHWC -> N H D W C -> N D H W C
        out = tf.gather(images, cols, axis=2)
        out = tf.transpose(out, [0, 2, 1, 3, 4])
    return out


# --------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------
def _as_channel_vector(name: str, value) -> np.ndarray:
    arr = np.array(value, dtype=np.float32)   # a private, writable copy
    if arr.ndim > 1 or arr.size == 0:
        raise ValueError(
            f"Normalization.{name} must be a non-empty 1-D sequence of floats "
            f"(one per channel), got shape {np.shape(value)}"
        )
    arr = arr.reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"Normalization.{name} must be finite, got {arr}")
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Normalization:
    """Per-channel normalisation ``(x - mean) / std`` in RAW input units.

    ``mean`` and ``std`` are read-only float32 arrays of shape ``(C,)`` in the
    units of the data as stored (e.g. 0..255 for uint8 CIFAR, so CIFAR-10's
    mean is about ``[125.3, 123.0, 113.9]``). Every ``std`` must be > 0.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        mean = _as_channel_vector("mean", self.mean)
        std = _as_channel_vector("std", self.std)
        if mean.shape != std.shape:
            raise ValueError(
                f"Normalization.mean and .std must have the same length, got "
                f"{mean.shape[0]} and {std.shape[0]}"
            )
        if np.any(std <= 0):
            raise ValueError(f"Normalization.std must be > 0, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.mean.shape[0])

    def apply(self, x) -> tf.Tensor:
        """Return ``(float32(x) - mean) / std`` broadcast over the last axis.

        ``x``: any rank, any real dtype, last axis = C channels (HWC, NHWC,
        NDHWC ...). Returns a float32 tensor of the same shape.
        """
        x = tf.convert_to_tensor(x)
        last = x.shape[-1] if x.shape.rank else None
        if last is not None and last != self.channels:
            raise ValueError(
                f"x has {last} channels (last axis of shape {x.shape}) but the "
                f"Normalization has {self.channels}"
            )
        return (tf.cast(x, tf.float32) - self.mean) / self.std

    def to_dict(self) -> dict:
        """``{"mean": [float, ...], "std": [float, ...]}`` (JSON friendly)."""
        return {"mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d) -> "Normalization":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or "mean" not in d or "std" not in d:
            raise ValueError(
                "Normalization.from_dict expects a dict with keys 'mean' and "
                f"'std', got {d!r}"
            )
        return cls(mean=d["mean"], std=d["std"])

    def __eq__(self, other):
        if not isinstance(other, Normalization):
            return NotImplemented
        return (np.array_equal(self.mean, other.mean)
                and np.array_equal(self.std, other.std))

    def __hash__(self):
        return hash((self.mean.tobytes(), self.std.tobytes()))

    def __repr__(self):
        def fmt(values):
            return [round(float(v), 4) for v in values]
        return f"Normalization(mean={fmt(self.mean)}, std={fmt(self.std)})"


def same_normalization(a, b) -> bool:
    """Whether two normalisations (None, a ``Normalization`` or its dict) are the same
    stats, to float32 round-off; None equals only None."""
    if a is None or b is None:
        return a is None and b is None
    a = a if isinstance(a, Normalization) else Normalization.from_dict(a)
    b = b if isinstance(b, Normalization) else Normalization.from_dict(b)
    return (a.channels == b.channels and np.allclose(a.mean, b.mean, rtol=1e-6, atol=0)
            and np.allclose(a.std, b.std, rtol=1e-6, atol=0))


def as_normalization(normalization, channels: int, what: str = "the data"):
    """The one validator of normalisation stats, wherever they come from (a pipeline
    argument, a Trainer, a checkpoint, an export): ``None`` -> None; a ``Normalization``
    or its ``to_dict()`` -> a ``Normalization`` with ``channels`` channels.

    Raises ValueError naming what is wrong (not a dict with 'mean' and 'std', non-finite
    values, std <= 0, or a channel count other than that of ``what``).
    """
    if normalization is None:
        return None
    if isinstance(normalization, dict):        # e.g. from a checkpoint
        normalization = Normalization.from_dict(normalization)
    if not isinstance(normalization, Normalization):
        raise ValueError(
            "normalization must be None, a Normalization (e.g. "
            "compute_normalization(x_train)) or its to_dict(), got "
            f"{normalization!r}"
        )
    if normalization.channels != channels:
        raise ValueError(
            f"normalization has {normalization.channels} channels but {what} "
            f"has {channels}"
        )
    return normalization


def compute_normalization(x, batch: int = 4096, min_std: float = 1e-6
                          ) -> Normalization:
    """Per-channel mean/std over all axes but the last, computed in chunks.

    Args:
      x: array-like of shape ``(N, ..., C)`` -- e.g. the uint8 NHWC training
        images, NDHWC volumes, or an ``h5py.Dataset`` (read chunk by chunk).
        Use the TRAINING split only.
      batch: number of samples (first-axis rows) per chunk. Only one chunk is
        converted to float64 at a time, so memory stays bounded.
      min_std: a channel whose std is below this (a constant channel) gets
        ``std = 1.0`` -- it is centred but not scaled -- instead of dividing
        by ~0.

    Returns:
      :class:`Normalization` with float32 ``mean``/``std`` of shape ``(C,)``
      in the raw units of ``x``; ``std`` is the population std (ddof=0), as
      ``np.std``. Accumulation is float64 (Chan et al. parallel update).
    """
    batch = check_int(batch, "batch")
    shape = tuple(getattr(x, "shape", np.shape(x)))
    if len(shape) < 2 or shape[0] == 0 or shape[-1] == 0:
        raise ValueError(
            "x must have shape (N, ..., C) with N > 0 and C > 0, got shape "
            f"{shape}"
        )
    channels = shape[-1]
    count = 0
    mean = np.zeros(channels, np.float64)
    m2 = np.zeros(channels, np.float64)
    for start in range(0, shape[0], batch):
        chunk = np.asarray(x[start:start + batch], dtype=np.float64)
        chunk = chunk.reshape(-1, channels)
        n_b = chunk.shape[0]
        mean_b = chunk.mean(axis=0)
        m2_b = ((chunk - mean_b) ** 2).sum(axis=0)
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta ** 2 * (count * n_b / total)
        count = total
    std = np.sqrt(m2 / count)
    std = np.where(std < min_std, 1.0, std)
    return Normalization(mean=mean.astype(np.float32),
                         std=std.astype(np.float32))


# --------------------------------------------------------------------------
# augmentation (WRN paper: reflect-pad 4, random crop, random h-flip)
# --------------------------------------------------------------------------
def _crop_flip(x, seed, pad: int, depth_flip: bool):
    """Shared body of augment_image (rank 3) / augment_volume (rank 4)."""
    pad = check_int(pad, "pad", 0)
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank != 1 or seed.shape[0] != 2 or not seed.dtype.is_integer:
        raise ValueError(
            f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype}"
            f" tensor of shape {seed.shape}"
        )
    height, width = x.shape[-3], x.shape[-2]
    for axis_name, size in (("height", height), ("width", width)):
        if size is not None and size <= pad:
            raise ValueError(
                f"reflect padding by pad={pad} needs {axis_name} > {pad}, got "
                f"input of shape {x.shape}"
            )
    # Draws do not depend on rank, so augment_volume(repeat-tiled image, s)
    # == tile(augment_image(image, s)).
    offsets = tf.random.stateless_uniform(
        [2], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    flips = tf.random.stateless_uniform(
        [2], seed=tf.random.experimental.stateless_fold_in(seed, 1),
        minval=0, maxval=2, dtype=tf.int32)

    lead = [[0, 0]] * (rank - 3)
    padded = tf.pad(x, lead + [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    shape = tf.shape(x, out_type=tf.int32)
    zeros = [0] * (rank - 3)
    out = tf.slice(padded, tf.stack(zeros + [offsets[0], offsets[1], 0]),
                   shape)
    out = tf.cond(flips[0] > 0, lambda: tf.reverse(out, [-2]), lambda: out)
    if depth_flip:
        out = tf.cond(flips[1] > 0, lambda: tf.reverse(out, [-4]),
                      lambda: out)
    return tf.ensure_shape(out, x.shape)


def augment_image(image, seed, pad: int = 4) -> tf.Tensor:
    """WRN-paper augmentation of one 2D image, deterministic in ``seed``.

    Reflect-pads H and W by ``pad`` (4 in the paper), takes a random crop of
    the original ``H x W`` size and flips horizontally with probability 1/2.

    Args:
      image: ``HWC`` tensor, any dtype (kept). Needs ``H, W > pad``.
      seed: int32/int64 tensor of shape ``[2]`` (stateless RNG seed); the
        same seed always gives the same crop and flip.
      pad: reflect padding in pixels.

    Returns:
      ``HWC`` tensor, same shape and dtype as ``image``.

    Apply it BEFORE :func:`tile_to_volume` so every slice of the volume gets
    the same crop/flip.
    """
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3:
        raise ValueError(
            f"image must be a single HWC image (rank 3), got shape {image.shape}"
        )
    return _crop_flip(image, seed, pad, depth_flip=False)


def augment_volume(volume, seed, depth_flip: bool = False, pad: int = 4
                   ) -> tf.Tensor:
    """WRN-paper augmentation of one volume, identical for every slice.

    Reflect-pads H and W by ``pad``, takes ONE random ``H x W`` crop offset
    and ONE horizontal-flip decision and applies them to all D slices (the
    relation between slices is preserved). With ``depth_flip=True`` the slice
    order is also reversed with probability 1/2.

    Args:
      volume: ``DHWC`` tensor, any dtype (kept). Needs ``H, W > pad``.
      seed: int32/int64 tensor of shape ``[2]``. The crop offset and h-flip
        drawn for a seed are the same as in :func:`augment_image`, so for a
        ``"repeat"``-tiled image ``augment_volume(tile(img), s) ==
        tile(augment_image(img, s))``.
      depth_flip: also randomly reverse the depth axis.
      pad: reflect padding in pixels.

    Returns:
      ``DHWC`` tensor, same shape and dtype as ``volume``.
    """
    volume = tf.convert_to_tensor(volume)
    if volume.shape.rank != 4:
        raise ValueError(
            f"volume must be a single DHWC volume (rank 4), got shape "
            f"{volume.shape}"
        )
    return _crop_flip(volume, seed, pad, depth_flip=bool(depth_flip))
