"""The checks every module shares, written once: integers (numpy's too, never bools),
numbers, per-axis tuples, batch shapes, layout names and a scan's axis codes and voxel
spacing. ValueErrors name the argument.

Tensors are channels-last: ``NHWC`` (batch, height, width, channels) for a spatial rank
of 2 and ``NDHWC`` (batch, depth, height, width, channels) for a spatial rank of 3.
"""

import numbers

import numpy as np

__all__ = ["is_int", "check_int", "check_class_weight", "check_number", "ensure_tuple_rep", "layout", "LAYOUTS", "check_batch_shape",
           "same_output_shape", "check_orientation", "check_spacing"]

LAYOUTS = {2: "NHWC", 3: "NDHWC"}


def is_int(value):
    """True for Python and numpy integers, False for bools (which Python counts as ints)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value, name, minimum=1, *, allow_none=False):
    """``value`` as a Python int when it is an int (Python's or numpy's, not a bool) >=
    ``minimum``, or None when ``allow_none``; else ValueError "``name`` must be a positive int
    (minimum 1) / an int >= ``minimum``[ or None], got ..."."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        rule = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {rule}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_number(value, name, rule, ok):
    """``value`` as a Python float when it is a real number (numpy's too, not a bool) for
    which ``ok(value)`` holds; else ValueError "``name`` must be ``rule``, got ...". NaN fails
    every comparison, so it is refused by any ``ok``."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def ensure_tuple_rep(value, rank, what):
    """A positive int (the same on every axis) or ``rank`` positive ints -> a tuple of
    ``rank`` Python ints (MONAI's ``ensure_tuple_rep``). ValueError naming ``what`` otherwise."""
    values = (value,) * rank if is_int(value) else value
    if not isinstance(values, (tuple, list, np.ndarray)) or len(values) != rank \
            or not all(is_int(v) and v >= 1 for v in values):
        raise ValueError(f"{what} must be a positive int or {rank} positive ints (one per spatial axis), "
                         f"got {value!r}")
    return tuple(int(v) for v in values)


def same_output_shape(spatial, strides):
    """Spatial shape after a "SAME"-padded convolution: ceil(d / s) per axis (a tuple)."""
    return tuple(-(-int(d) // int(s)) for d, s in zip(spatial, strides))


def layout(rank):
    """The layout name for a spatial rank: 2 -> "NHWC", 3 -> "NDHWC"."""
    try:
        return LAYOUTS[rank]
    except KeyError:
        raise ValueError(f"spatial rank must be 2 (NHWC) or 3 (NDHWC), got {rank!r}") from None


def check_batch_shape(shape, input_shape, what):
    """Raise the one ValueError every entry point gives for a batch whose shape is not
    ``(batch,) + input_shape`` (``None`` entries of ``shape``, e.g. a traced batch size,
    match anything); ``what`` names the caller ("train_step", "model", ...)."""
    shape, input_shape = tuple(shape), tuple(input_shape)
    if len(shape) == len(input_shape) + 1 and all(s is None or s == d for s, d in zip(shape[1:], input_shape)):
        return
    hint = " (a single volume? add a batch axis: x[None])" if shape == input_shape else ""
    raise ValueError(f"{what}: x must have shape (batch,) + {input_shape} ({layout(len(input_shape) - 1)}), "
                     f"got {shape}{hint}")


def check_class_weight(class_weight, num_classes):
    """``Trainer(class_weight=...)`` as a list of ``num_classes`` finite floats > 0, or None."""
    if class_weight is None:
        return None
    try:
        w = np.asarray(class_weight, dtype=np.float64) if np.ndim(class_weight) == 1 else None
    except (TypeError, ValueError):
        w = None
    if w is None or w.shape != (num_classes,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"class_weight must be None or {num_classes} finite numbers > 0 (one per class), "
                         f"got {class_weight!r}")
    return [float(v) for v in w]


_PAIRS = ("LR", "PA", "IS")


def check_orientation(orientation):
    """None, or three axis codes, one from each of L/R, P/A, I/S (``"RAS"``, ``"LPS"``,
    ``"PIL"``, ...) -> the upper-case str. ValueError otherwise."""
    if orientation is None:
        return None
    codes = orientation.upper() if isinstance(orientation, str) else None
    if codes is None or len(codes) != 3 or sorted(next((i for i, p in enumerate(_PAIRS) if c in p), 9)
                                                  for c in codes) != [0, 1, 2]:
        raise ValueError(f"orientation must be None or three axis codes, one of each pair L/R, P/A, I/S "
                         f"(e.g. 'RAS', 'LPS'), got {orientation!r}")
    return codes


def check_spacing(spacing):
    """None, or three finite positive voxel sizes in mm ``(d, h, w)`` -> a tuple of floats."""
    if spacing is None:
        return None
    values = tuple(spacing) if isinstance(spacing, (tuple, list, np.ndarray)) else None
    try:
        ok = values is not None and len(values) == 3 and all(
            not isinstance(v, (bool, np.bool_, str)) and np.isfinite(float(v)) and float(v) > 0 for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"spacing must be None or three positive voxel sizes in mm (d, h, w), got {spacing!r}")
    return tuple(float(v) for v in values)
