"""The *reading*: how raw scans became a model's input volumes, one record for every path.

A reading is the JSON-able dict ``{"reader": "nifti", "intensity": ..., "target_shape":
[D, H, W] or None}``, with ``"orientation"`` (e.g. ``"RAS"``) and ``"spacing"`` ([d, h, w]
mm) only when they are set, so records written before they existed stay equal to today's
(:func:`preprocessing_of`). Training data built from files carries it
(``nifti_dataset``, ``hdf5_dataset`` on a ``nifti_to_hdf5`` file), a ``Trainer`` stores it
in every checkpoint, and every way of using the model applies it the same way:

* files and raw arrays (``predict``, ``Predictor``, ``grad_cam``): :func:`apply_reading`
  in NumPy, the very function the NIfTI reader trains with;
* the SavedModel: :func:`apply_reading_tf`, the same steps as TensorFlow ops in the
  serving graph (agreeing with the NumPy one to float32 round-off).

The steps, per volume, in this order: ``orientation`` then ``spacing``, which need the
file's affine and so happen where files are read (``wrn3d_tl.data.geometry``; raw arrays
and the SavedModel's input are taken as already reoriented and resampled), then, per
channel, ``intensity`` on the voxels as stored
(``"zscore"``: ``(x - mean) / std`` over all voxels, std 1 for a constant volume;
``"zscore_nonzero"``: the same over the non-zero voxels, zeros stay 0; ``("window", lo,
hi)``: clip to ``[lo, hi]`` and scale to ``[0, 1]``; None: nothing), then centre crop /
zero pad of each spatial axis to ``target_shape`` (no resampling). Volumes are float32
``(N, D, H, W, C)`` (NDHWC).
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

from wrn3d_tl.validate import check_orientation, check_spacing, is_int

__all__ = ["INTENSITY_MODES", "check_intensity", "check_target_shape", "preprocessing_of", "check_preprocessing",
           "apply_reading", "apply_reading_tf", "describe_reading", "check_class_names", "fit_offsets",
           "check_orientation", "check_spacing", "FILE_SIDE"]

FILE_SIDE = ("orientation", "spacing")   # the steps that need a file's affine

INTENSITY_MODES = ("zscore", "zscore_nonzero", "('window', lo, hi)", None)
_STD_FLOOR = 1e-6   # a constant volume is centred, not scaled by ~0


def check_intensity(intensity):
    """Validate ``intensity``: ``"zscore"``, ``"zscore_nonzero"``, ``None`` or
    ``("window", lo, hi)`` with finite ``lo < hi``; returns it (the window as a tuple)."""
    if intensity is None or intensity in ("zscore", "zscore_nonzero"):
        return intensity
    if (isinstance(intensity, (tuple, list)) and len(intensity) == 3 and intensity[0] == "window"
            and all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and np.isfinite(v)
                    for v in intensity[1:]) and intensity[1] < intensity[2]):
        return ("window", float(intensity[1]), float(intensity[2]))
    raise ValueError(f"intensity must be 'zscore', 'zscore_nonzero', None or ('window', lo, hi) with finite "
                     f"lo < hi, got {intensity!r}")


def check_target_shape(target_shape):
    """``None`` or three positive ints ``(D, H, W)``."""
    if target_shape is None:
        return None
    shape = tuple(target_shape) if isinstance(target_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(is_int(s) and s > 0 for s in shape):
        raise ValueError(f"target_shape must be None or three positive ints (D, H, W), got {target_shape!r}")
    return tuple(int(s) for s in shape)


def preprocessing_of(intensity, target_shape, orientation=None, spacing=None) -> dict:
    """The JSON-able record of how NIfTI files become volumes, as a ``Trainer`` stores it in
    checkpoints: ``{"reader": "nifti", "intensity": ..., "target_shape": [D, H, W] or None}``
    plus ``"orientation": "RAS"`` and ``"spacing": [d, h, w]`` when those are set."""
    intensity, target_shape = check_intensity(intensity), check_target_shape(target_shape)
    orientation, spacing = check_orientation(orientation), check_spacing(spacing)
    record = {"reader": "nifti", "intensity": list(intensity) if isinstance(intensity, tuple) else intensity,
              "target_shape": None if target_shape is None else list(target_shape)}
    if orientation is not None:
        record["orientation"] = orientation
    if spacing is not None:
        record["spacing"] = list(spacing)
    return record


def check_preprocessing(value, what="preprocessing"):
    """Validate a stored reading (None, or a dict as :func:`preprocessing_of` returns, e.g.
    read back from a checkpoint or an HDF5 attribute); returns it in canonical form.
    ValueError naming ``what`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("reader") != "nifti" or \
            not {"reader", "intensity", "target_shape"} <= set(value) <= {"reader", "intensity", "target_shape",
                                                                          *FILE_SIDE}:
        raise ValueError(f"{what} must be None or {{'reader': 'nifti', 'intensity': ..., 'target_shape': ...}} "
                         f"(optionally with 'orientation' and 'spacing'), got {value!r}")
    try:
        return preprocessing_of(value["intensity"], value["target_shape"], value.get("orientation"),
                                value.get("spacing"))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e


def check_class_names(names, num_classes, what="class_names"):
    """None, or ``num_classes`` distinct names in class-index order -> a tuple of str.
    ValueError naming ``what`` otherwise."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple, np.ndarray)) \
            or len(names) != num_classes or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise ValueError(f"{what} must be None or {num_classes} distinct non-empty names (one per class, in index "
                         f"order), got {names!r}")
    return tuple(names)


def describe_reading(reading) -> str:
    """``"intensity zscore, crop/pad to 8x8x8"``: a reading in a few words (None: "none")."""
    if reading is None:
        return "none"
    intensity = reading["intensity"]
    words = "window {:g}..{:g}".format(*intensity[1:]) if isinstance(intensity, (list, tuple)) else intensity
    shape = reading["target_shape"]
    geometry = "".join(part for part in (reading.get("orientation") and f"reoriented to {reading['orientation']}, ",
                                         reading.get("spacing") and "resampled to {:g}x{:g}x{:g} mm, ".format(
                                             *reading["spacing"])) if part)
    return geometry + f"intensity {words or 'as stored'}, " + ("shape as stored" if shape is None else
                                                               "crop/pad to " + "x".join(map(str, shape)))


def _parts(reading):
    reading = check_preprocessing(reading)
    intensity = reading["intensity"]
    return (tuple(intensity) if isinstance(intensity, list) else intensity), reading["target_shape"]


# ---------------------------------------------------------------------- NumPy
def _intensity_np(x, intensity):
    if intensity is None:
        return x
    if intensity[0] == "window":
        _, lo, hi = intensity
        return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    axes = (1, 2, 3)
    x64 = x.astype(np.float64)
    if intensity == "zscore_nonzero":
        mask = x != 0
        count = mask.sum(axis=axes, keepdims=True)
        mean = np.where(count > 0, np.where(mask, x64, 0).sum(axis=axes, keepdims=True) / np.maximum(count, 1), 0.0)
        var = np.where(mask, (x64 - mean) ** 2, 0).sum(axis=axes, keepdims=True) / np.maximum(count, 1)
    else:
        mask = None
        mean = x64.mean(axis=axes, keepdims=True)
        var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    std = np.sqrt(var)
    std = np.where(std > _STD_FLOOR, std, 1.0)
    out = (x - mean.astype(np.float32)) / std.astype(np.float32)
    return out if mask is None else np.where(mask, out, np.float32(0))


def fit_offsets(shape, target_shape) -> tuple:
    """Per spatial axis, where crop/pad to ``target_shape`` puts the old grid: index ``n`` of
    the fitted grid is index ``n + offset`` of a ``shape`` grid (crop: the centre part,
    offset ``(have - want) // 2``; pad: zeros around it, offset ``-((want - have) // 2)``)."""
    return tuple((have - want) // 2 if have >= want else -((want - have) // 2)
                 for have, want in zip(shape, target_shape))


def _fit_np(x, target_shape):
    for axis, (want, offset) in enumerate(zip(target_shape, fit_offsets(x.shape[1:4], target_shape)), start=1):
        have = x.shape[axis]
        if have > want:
            x = np.take(x, np.arange(offset, offset + want), axis=axis)
        elif have < want:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (-offset, want - have + offset)
            x = np.pad(x, widths)
    return x


def apply_reading(volumes, reading) -> np.ndarray:
    """Apply a reading to raw volumes: float32 ``(N, D', H', W', C)`` (any real dtype, NDHWC)
    -> float32 ``(N, D, H, W, C)``, each volume on its own (intensity, then crop/pad).
    Arrays carry no affine: a reading's orientation and spacing are the file reader's
    steps, and ``volumes`` are taken as already reoriented and resampled."""
    intensity, target_shape = _parts(reading)
    x = np.asarray(volumes, np.float32)
    x = _intensity_np(x, intensity)
    if target_shape is not None:
        x = _fit_np(x, target_shape)
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------- TensorFlow
def _intensity_tf(x, intensity):
    if intensity is None:
        return x
    if intensity[0] == "window":
        _, lo, hi = intensity
        return (tf.clip_by_value(x, lo, hi) - lo) / (hi - lo)
    axes = [1, 2, 3]
    x64 = tf.cast(x, tf.float64)
    if intensity == "zscore_nonzero":
        mask = tf.not_equal(x, 0)
        m64 = tf.cast(mask, tf.float64)
        count = tf.reduce_sum(m64, axis=axes, keepdims=True)
        safe = tf.maximum(count, 1.0)
        mean = tf.reduce_sum(x64 * m64, axis=axes, keepdims=True) / safe
        var = tf.reduce_sum(tf.square(x64 - mean) * m64, axis=axes, keepdims=True) / safe
    else:
        mask = None
        mean = tf.reduce_mean(x64, axis=axes, keepdims=True)
        var = tf.reduce_mean(tf.square(x64 - mean), axis=axes, keepdims=True)
    std = tf.sqrt(var)
    std = tf.where(std > _STD_FLOOR, std, tf.ones_like(std))
    out = (x - tf.cast(mean, tf.float32)) / tf.cast(std, tf.float32)
    return out if mask is None else tf.where(mask, out, tf.zeros_like(out))


def _fit_tf(x, target_shape):
    have = tf.shape(x)[1:4]
    want = tf.constant(target_shape, tf.int32)
    crop = tf.maximum(have - want, 0)
    begin = tf.concat([[0], crop // 2, [0]], axis=0)
    size = tf.concat([[-1], tf.minimum(have, want), [-1]], axis=0)
    x = tf.slice(x, begin, size)
    pad = tf.maximum(want - have, 0)
    before = pad // 2
    paddings = tf.concat([[[0, 0]], tf.stack([before, pad - before], axis=1), [[0, 0]]], axis=0)
    x = tf.pad(x, paddings)
    return tf.ensure_shape(x, [None, *target_shape, None])


def apply_reading_tf(volumes, reading):
    """:func:`apply_reading` as TensorFlow ops (for a serving graph): float32 ``(N, D', H',
    W', C)`` tensor -> float32 ``(N, D, H, W, C)``; statistics in float64 like the NumPy one."""
    intensity, target_shape = _parts(reading)
    x = _intensity_tf(volumes, intensity)
    return x if target_shape is None else _fit_tf(x, target_shape)
