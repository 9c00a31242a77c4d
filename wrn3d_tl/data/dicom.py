"""One DICOM series in a folder, as voxels and an affine (pydicom: ``pip install
'wrn3d_tl[dicom]'``).

A table row may name a folder holding the files of one single-frame series (CT, MR, PET
slices). :func:`read_series` sorts the slices along the slice normal
(``ImageOrientationPatient``'s row x column direction) by ``ImagePositionPatient``,
applies each slice's ``RescaleSlope``/``RescaleIntercept`` (CT: Hounsfield units), and
builds the affine from the orientation, ``PixelSpacing`` and the slice positions. The
voxel axes are ``(i, j, k)`` = (column, row, slice), and the affine maps them to RAS+
world millimetres (DICOM's patient axes are LPS: x and y change sign), nibabel's
convention, so the series reads exactly as its NIfTI conversion would and ``orientation``
and ``spacing`` work the same on both.

Refused, with the folder named: several series in one folder (their SeriesInstanceUIDs),
slices whose orientation, pixel spacing or size differ, two slices at one position, a gap
larger than 1.5x the median slice step (missing slices), uneven steps, a compressed
transfer syntax with no decoder installed (the packages that would decode it),
multi-frame and colour images, missing or malformed geometry tags, files that are not
DICOM (including files without the 128-byte preamble and ``DICM`` marker of a DICOM file;
``DICOMDIR`` and hidden files are skipped).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

__all__ = ["read_series", "series_files", "looks_like_series"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GAP = 1.5           # a step this many times the median one means slices are missing
_UNEVEN = 0.05       # steps further than this fraction from the median are uneven
_SAME = 1e-4         # orientation cosines / spacings (mm) that agree to this are the same


def series_files(folder) -> list:
    """The files a series folder holds: every regular, non-hidden file but ``DICOMDIR``, sorted."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if not f.startswith(".") and f.upper() != "DICOMDIR" and os.path.isfile(os.path.join(folder, f)))


def looks_like_series(folder, is_other) -> bool:
    """Whether ``folder`` is a folder of files only, none of them ``is_other`` (e.g. NIfTI)."""
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    return bool(entries) and all(os.path.isfile(os.path.join(folder, e)) and not is_other(e) for e in entries)


def _pydicom(where, folder):
    try:
        import pydicom
    except ImportError:
        raise ValueError(f"{where}: {folder!r} is a folder, read as one DICOM series, which needs pydicom: "
                         "pip install 'wrn3d_tl[dicom]'") from None
    return pydicom


def _read_files(folder, where, pixels):
    pydicom = _pydicom(where, folder)
    files = series_files(folder)
    if not files:
        raise ValueError(f"{where}: folder {folder!r} holds no files (expected the files of one DICOM series)")
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except pydicom.errors.InvalidDicomError:
            raise ValueError(f"{where}: {path!r} in the DICOM series folder is not a DICOM file") from None
        except Exception as e:  # truncated or malformed
            raise ValueError(f"{where}: {path!r} is not a readable DICOM file: {' '.join(str(e).split())}") from e
        slices.append((path, ds))
    return slices


def _one_series(slices, where, folder):
    uids = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in slices)
    if len(uids) > 1:
        described = "; ".join(f"{uid or '(none)'} ({count} files)" for uid, count in sorted(uids.items()))
        raise ValueError(f"{where}: folder {folder!r} holds {len(uids)} DICOM series: {described}. A row names one "
                         "series: put the files of each SeriesInstanceUID in a folder of their own and list the "
                         "folder of the one to use")


def _geometry_tags(path, ds, where):
    missing = [t for t in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
               if t not in ds]
    if missing:
        raise ValueError(f"{where}: {path!r} has no {', '.join(missing)}: not a slice of a volume")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{where}: {path!r} is a multi-frame or colour image; only single-frame greyscale "
                         "series are read (convert others with dcm2niix)")
    try:
        iop, ipp, spacing = (np.asarray(ds[t].value, np.float64).reshape(-1) for t in
                             ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {path!r} has a non-numeric geometry tag: {' '.join(str(e).split())}") from None
    row, col = iop[:3], iop[3:]
    if iop.size != 6 or ipp.size != 3 or spacing.size != 2 or not np.isfinite(np.concatenate([iop, ipp, spacing])).all() \
            or (spacing <= 0).any() or abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 \
            or abs(np.dot(row, col)) > 1e-3:
        raise ValueError(f"{where}: {path!r} has malformed geometry: ImageOrientationPatient {list(iop)} (two "
                         f"orthogonal unit vectors), ImagePositionPatient {list(ipp)} (3 numbers), PixelSpacing "
                         f"{list(spacing)} (2 positive numbers)")
    return iop, ipp, spacing, (int(ds.Rows), int(ds.Columns))


def _sorted_slices(slices, where, folder):
    """The slices in order along the normal, checked, with the LPS affine of the series."""
    tags = [_geometry_tags(path, ds, where) for path, ds in slices]
    iop0, _, spacing0, size0 = tags[0]
    first = slices[0][0]
    for (path, _), (iop, _, spacing, size) in zip(slices, tags):
        for name, a, b in (("ImageOrientationPatient", iop, iop0), ("PixelSpacing", spacing, spacing0)):
            if not np.allclose(a, b, atol=_SAME):
                raise ValueError(f"{where}: series in {folder!r} has inconsistent {name}: {list(b)} in {first!r}, "
                                 f"{list(a)} in {path!r}")
        if size != size0:
            raise ValueError(f"{where}: series in {folder!r} has slices of {size0[0]}x{size0[1]} pixels in "
                             f"{first!r} and {size[0]}x{size[1]} in {path!r}")
    if len(slices) < 2:
        raise ValueError(f"{where}: folder {folder!r} holds one slice; a volume needs at least two")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    order = np.argsort([float(np.dot(pos, normal)) for _, pos, _, _ in tags], kind="stable")
    positions = np.stack([tags[i][1] for i in order])
    names = [slices[i][0] for i in order]
    steps = np.diff(positions @ normal)
    median = float(np.median(steps))
    for s, step in enumerate(steps):
        pair = f"{names[s]!r} and {names[s + 1]!r}"
        if step < _SAME or median < _SAME:
            raise ValueError(f"{where}: series in {folder!r} has two slices at one position ({pair}): several "
                             "acquisitions, echoes or time points in one series? Put one volume per folder")
        if step > _GAP * median:
            raise ValueError(f"{where}: series in {folder!r} is missing slices: a {step:.4g} mm gap between {pair}, "
                             f"against a median step of {median:.4g} mm")
        if abs(step - median) > _UNEVEN * median:
            raise ValueError(f"{where}: series in {folder!r} has uneven slice steps: {step:.4g} mm between {pair}, "
                             f"against a median of {median:.4g} mm")
    affine = np.eye(4)
    affine[:3, 0] = row * spacing0[1]        # i: along a row, one column to the next
    affine[:3, 1] = col * spacing0[0]        # j: one row to the next
    affine[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine[:3, 3] = positions[0]
    return [slices[i] for i in order], _LPS_TO_RAS @ affine, size0


def _pixels(path, ds, where):
    meta = getattr(ds, "file_meta", None)
    syntax = None if meta is None else meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ValueError(f"{where}: {path!r} uses the transfer syntax {syntax.name!r}, which pydicom cannot "
                             "decode") from None
        if not decoder.is_available:
            raise ValueError(f"{where}: {path!r} is compressed ({syntax.name}) and no decoder for it is installed; "
                             "install one of: " + "; ".join(decoder.missing_dependencies))
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise ValueError(f"{where}: cannot decode the pixels of {path!r}: {' '.join(str(e).split())}") from e
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def read_series(folder, where=None, pixels=True):
    """The DICOM series in ``folder`` as ``(voxels, affine)``: float32 ``(i, j, k)`` =
    (columns, rows, slices) with rescale slope/intercept applied (None when ``pixels`` is
    False: the header pass), and the float64 4x4 RAS+ affine. ValueError naming ``where``
    and the file in each refused case (see the module's doc)."""
    folder = os.fspath(folder)
    where = where or repr(folder)
    slices = _read_files(folder, where, pixels)
    _one_series(slices, where, folder)
    slices, affine, (rows, columns) = _sorted_slices(slices, where, folder)
    if not pixels:
        return None, affine, (columns, rows, len(slices))
    data = np.empty((columns, rows, len(slices)), np.float32)
    for k, (path, ds) in enumerate(slices):
        data[:, :, k] = _pixels(path, ds, where).T
    return data, affine, data.shape
