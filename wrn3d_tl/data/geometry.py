"""Where voxels are in the world: reorientation, resampling and the way back.

A scan is voxels ``(i, j, k[, C])`` plus a 4x4 affine mapping voxel indices to world
millimetres in RAS+ (nibabel's convention: x to the Right, y Anterior, z Superior). The
reading's file-side steps live here, in the order they run:

1. ``orientation`` (e.g. ``"RAS"``): a pure permutation/flip of the voxel axes (no
   interpolation) so that the first axis points most nearly along the first letter, and
   so on (:func:`reorient`; oblique scans keep their obliquity, as with nibabel's
   ``as_closest_canonical``);
2. ``spacing`` (mm per voxel, in the output axis order): linear resampling onto a grid of
   exactly that voxel size covering the same field of view, centred on it
   (:func:`resample`; ``scipy.ndimage.affine_transform`` with a diagonal matrix, its fast
   separable path, edges continued by their nearest voxel);
3. crop/pad to ``target_shape`` (``reading.fit_offsets``), a shift of the grid.

:func:`grid_of` follows a header's ``(shape, affine)`` through the same steps without
reading voxels, and :func:`to_scan_grid` takes a map on the network's grid back onto the
scan's own grid (Grad-CAM maps that overlay in a viewer).
"""

from __future__ import annotations

import numpy as np

from wrn3d_tl.validate import check_orientation, check_spacing

__all__ = ["check_orientation", "check_spacing", "voxel_sizes", "reorient", "resample", "resampled_shape",
           "grid_of", "shifted", "to_scan_grid"]

def voxel_sizes(affine) -> np.ndarray:
    """float64 ``(3,)``: the length in mm of one step along each voxel axis."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def _reorientation(shape, affine, orientation):
    """``(transform, shape', affine')``: nibabel's axis transform from ``affine``'s voxel
    order to ``orientation``, and the ``(D, H, W)`` and affine of the reoriented grid."""
    import nibabel.orientations as nio

    shape = tuple(int(s) for s in shape[:3])
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(check_orientation(orientation))))
    out = [0, 0, 0]
    for axis, (to, _) in enumerate(transform.astype(int)):
        out[to] = shape[axis]
    return transform, tuple(out), np.asarray(affine, np.float64) @ nio.inv_ornt_aff(transform, shape)


def reorient(data, affine, orientation):
    """Voxels ``(i, j, k[, C])`` and their affine -> the same scan with its axes permuted and
    flipped into ``orientation`` (see :func:`check_orientation`): ``(data', affine')`` with
    ``affine' @ index'`` the same world point as ``affine @ index`` for each voxel."""
    import nibabel.orientations as nio

    transform, _, new_affine = _reorientation(data.shape, affine, orientation)
    return np.ascontiguousarray(nio.apply_orientation(data, transform)), new_affine


def resampled_shape(shape, affine, spacing) -> tuple:
    """The ``(D, H, W)`` a grid of ``shape`` becomes at ``spacing`` mm: ``round(n * size /
    spacing)`` per axis, at least 1 (the field of view is kept to within half a voxel)."""
    n = np.floor(np.asarray(shape[:3], np.float64) * voxel_sizes(affine) / np.asarray(spacing) + 0.5)
    return tuple(int(v) for v in np.maximum(n, 1))


def _resampling(shape, affine, spacing):
    """``(new shape, ratio, offset, step)``: new voxel ``n`` is old voxel ``ratio * n +
    offset`` (old voxels per new one, the grid centres coinciding); ``step`` is that map as
    a 4x4 matrix, so the new affine is ``affine @ step``."""
    new = resampled_shape(shape, affine, spacing)
    ratio = np.asarray(spacing, np.float64) / voxel_sizes(affine)
    offset = (np.asarray(shape[:3], np.float64) - 1) / 2 - (np.asarray(new) - 1) / 2 * ratio
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = offset
    return new, ratio, offset, step


def resample(data, affine, spacing):
    """Linear resampling of voxels ``(i, j, k[, C])`` onto voxels of exactly ``spacing`` mm
    along the same axes, float32 out: ``(data', affine')``. The new grid has
    :func:`resampled_shape` and the same centre; points within half a voxel beyond the
    old grid's edge take the edge's value."""
    from scipy.ndimage import affine_transform

    affine = np.asarray(affine, np.float64)
    shape, ratio, offset, step = _resampling(data.shape, affine, check_spacing(spacing))
    x = np.asarray(data, np.float32)
    channels = x[..., None] if x.ndim == 3 else x
    out = np.empty(shape + channels.shape[3:], np.float32)
    for c in range(channels.shape[3]):
        affine_transform(channels[..., c], ratio, offset=offset, output_shape=shape, output=out[..., c], order=1,
                         mode="nearest")
    return (out[..., 0] if x.ndim == 3 else out), affine @ step


def shifted(affine, offset):
    """The affine of a grid whose index ``n`` is index ``n + offset`` of ``affine``'s grid."""
    step = np.eye(4)
    step[:3, 3] = offset
    return np.asarray(affine, np.float64) @ step


def grid_of(shape, affine, orientation=None, spacing=None):
    """A header's ``(shape (D, H, W), affine)`` after ``orientation`` and ``spacing``, as
    :func:`reorient` and :func:`resample` would give it, without reading a voxel."""
    shape, affine = tuple(int(s) for s in shape[:3]), np.asarray(affine, np.float64)
    orientation, spacing = check_orientation(orientation), check_spacing(spacing)
    if orientation is not None:
        _, shape, affine = _reorientation(shape, affine, orientation)
    if spacing is not None:
        shape, _, _, step = _resampling(shape, affine, spacing)
        affine = affine @ step
    return shape, affine


def to_scan_grid(volume, affine, scan_shape, scan_affine, order=1):
    """A float ``(D, H, W)`` map on the grid of ``affine`` resampled onto the scan's own grid
    (``scan_shape`` (i, j, k), ``scan_affine``): float32 ``scan_shape``, linear, 0 outside
    the map's grid. What overlays the scan in a viewer with the scan's affine."""
    from scipy.ndimage import affine_transform

    to_map = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(scan_affine, np.float64)
    return affine_transform(np.asarray(volume, np.float32), to_map[:3, :3], offset=to_map[:3, 3],
                            output_shape=tuple(int(s) for s in scan_shape[:3]), order=order, mode="constant",
                            cval=0.0).astype(np.float32, copy=False)
