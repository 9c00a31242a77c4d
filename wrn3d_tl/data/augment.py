"""Seeded augmentation for real volumes: flips, 90-degree rotations, crops, intensity jitter.

The WRN paper's CIFAR recipe (reflect-pad 4, random crop, horizontal flip) lives in
``transforms.augment_volume``. Scans need other transforms: a left-right flip may be fine
for one organ and wrong for another, a rotation may be fine within the axial plane only.
:class:`Augment3D` lets the user say which, and every pipeline (``make_dataset``,
``hdf5_dataset``, ``nifti_dataset``) takes it as ``augment=``.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from wrn3d_tl.validate import is_int

__all__ = ["Augment3D", "SPATIAL_AXES"]

SPATIAL_AXES = {"D": 0, "H": 1, "W": 2}     # axes of one DHWC volume


def _axis(value, what):
    if isinstance(value, str) and value.upper() in SPATIAL_AXES:
        return SPATIAL_AXES[value.upper()]
    if is_int(value) and 0 <= value <= 2:
        return int(value)
    raise ValueError(f"Augment3D.{what}: axes are 0/'D', 1/'H' or 2/'W' of a DHWC volume, got {value!r}")


def _real(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"Augment3D.{what} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Augment3D:
    """Random transforms of one ``DHWC`` volume, drawn from a stateless seed.

    Applied in this order, every channel of a volume getting the same transform:

    - ``flip_axes``: spatial axes (``0``/``"D"``, ``1``/``"H"``, ``2``/``"W"``), each
      reversed with probability 1/2, independently.
    - ``rotate_plane``: two spatial axes ``(a, b)``; the volume is rotated by ``k`` x 90
      degrees in that plane, ``k`` uniform in {0, 1, 2, 3}, as ``np.rot90(v, k, axes=(a,
      b))``. The two axes must have the same size (a rotation by 90 degrees swaps them).
    - ``crop_padding``: an int or one int per spatial axis ``(pD, pH, pW)``: the volume is
      zero-padded by ``p`` on both sides of that axis and a window of the original size is
      cut at a uniform offset in ``[0, 2p]``. In ``nifti_dataset`` it runs after the
      intensity step, so zero is the mean (``"zscore"``) or the window's low end; in
      ``make_dataset``/``hdf5_dataset`` it runs on the raw sample, before normalisation (so
      do ``shift`` and zero padding, in raw units).
    - ``scale``, ``shift``: intensity jitter ``x * g + s`` with ``g`` uniform in
      ``[1 - scale, 1 + scale]`` and ``s`` uniform in ``[-shift, shift]`` (the volume is cast
      to float32 first). Both 0: no jitter, dtype kept.

    ``aug(volume, seed)``: ``volume`` a ``DHWC`` tensor, ``seed`` an int tensor of shape
    ``[2]``; returns a tensor of the same shape. The same seed always gives the same
    result; ``aug.draws(seed)`` returns the random choices and ``aug.apply(volume, draws)``
    applies them (the two halves of ``aug(volume, seed)``, so tests can rebuild it in NumPy).
    """

    flip_axes: tuple = ()
    rotate_plane: tuple | None = None
    crop_padding: object = 0
    scale: float = 0.0
    shift: float = 0.0

    def __post_init__(self):
        flips = tuple(sorted({_axis(a, "flip_axes") for a in tuple(self.flip_axes)}))
        plane = self.rotate_plane
        if plane is not None:
            plane = tuple(_axis(a, "rotate_plane") for a in plane)
            if len(plane) != 2 or plane[0] == plane[1]:
                raise ValueError(f"Augment3D.rotate_plane must be two different spatial axes, got "
                                 f"{self.rotate_plane!r}")
        pad = self.crop_padding
        try:
            pad = (pad,) * 3 if is_int(pad) else tuple(pad)
        except TypeError:   # not an int and not iterable (e.g. 1.5): refused below
            pad = (pad,)
        if len(pad) != 3 or not all(is_int(p) and p >= 0 for p in pad):
            raise ValueError(f"Augment3D.crop_padding must be an int >= 0 or three of them (D, H, W), got "
                             f"{self.crop_padding!r}")
        scale, shift = _real(self.scale, "scale"), _real(self.shift, "shift")
        if scale >= 1:
            raise ValueError(f"Augment3D.scale must be < 1 (the gain 1 +- scale stays positive), got {scale}")
        for name, value in (("flip_axes", flips), ("rotate_plane", plane),
                            ("crop_padding", tuple(int(p) for p in pad)), ("scale", scale), ("shift", shift)):
            object.__setattr__(self, name, value)

    def draws(self, seed):
        """The random choices for ``seed``: ``flips`` int32 (3,) of 0/1 per spatial axis,
        ``k`` int32 quarter turns, ``offsets`` int32 (3,) crop offsets, ``gain`` and ``bias``
        float32 scalars."""
        seed = tf.convert_to_tensor(seed)
        if seed.shape.rank != 1 or seed.shape[0] != 2 or not seed.dtype.is_integer:
            raise ValueError(f"seed must be an int tensor of shape [2], got {seed.dtype.name} {seed.shape}")

        def stream(i):
            return tf.random.experimental.stateless_fold_in(seed, i)

        pad = tf.constant(self.crop_padding, tf.int32)
        wanted = tf.constant([a in self.flip_axes for a in range(3)])
        flips = tf.random.stateless_uniform([3], stream(11), 0, 2, tf.int32) * tf.cast(wanted, tf.int32)
        k = tf.random.stateless_uniform([], stream(12), 0, 4, tf.int32) if self.rotate_plane else tf.constant(0)
        offsets = tf.random.stateless_uniform([3], stream(13), 0, 2**30, tf.int32) % (2 * pad + 1)
        u = tf.random.stateless_uniform([2], stream(14), -1.0, 1.0)
        return {"flips": flips, "k": k, "offsets": offsets,
                "gain": 1.0 + self.scale * u[0], "bias": self.shift * u[1]}

    def apply(self, volume, draws):
        """Apply the choices ``draws`` (from :meth:`draws`) to one ``DHWC`` volume."""
        v = tf.convert_to_tensor(volume)
        if v.shape.rank != 4:
            raise ValueError(f"Augment3D works on one DHWC volume (rank 4), got shape {v.shape}")
        if self.rotate_plane is not None:
            a, b = self.rotate_plane
            if v.shape[a] is not None and v.shape[a] != v.shape[b]:
                raise ValueError(f"Augment3D.rotate_plane={self.rotate_plane}: a quarter turn swaps axes of sizes "
                                 f"{v.shape[a]} and {v.shape[b]} (volume shape {v.shape}); they must be equal")
        shape = v.shape
        for axis in self.flip_axes:
            v = tf.cond(draws["flips"][axis] > 0, lambda v=v, axis=axis: tf.reverse(v, [axis]), lambda v=v: v)
        if self.rotate_plane is not None:
            v = _rot90(v, draws["k"], *self.rotate_plane)
        if any(self.crop_padding):
            pads = [[p, p] for p in self.crop_padding] + [[0, 0]]
            size = tf.shape(v, out_type=tf.int32)
            v = tf.slice(tf.pad(v, pads), tf.concat([draws["offsets"], [0]], 0), size)
        if self.scale or self.shift:
            v = tf.cast(v, tf.float32) * draws["gain"] + draws["bias"]
        return tf.ensure_shape(v, shape)

    def __call__(self, volume, seed):
        return self.apply(volume, self.draws(seed))


def _rot90(v, k, a, b):
    """``np.rot90(v, k, axes=(a, b))`` for a traced ``k`` (the a/b sizes are equal)."""
    perm = list(range(4))
    perm[a], perm[b] = b, a
    return tf.switch_case(k % 4, [
        lambda: v,
        lambda: tf.transpose(tf.reverse(v, [b]), perm),
        lambda: tf.reverse(v, [a, b]),
        lambda: tf.reverse(tf.transpose(v, perm), [b]),
    ])
