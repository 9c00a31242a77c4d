"""NIfTI volumes (``.nii`` / ``.nii.gz``, read with nibabel) listed in a table.

A *table* is either

* a CSV file with a header holding ``path`` and ``label`` columns (other columns are
  ignored; paths relative to the CSV's folder or absolute; labels all integers, or all
  class names), or
* a folder with one sub-folder per class (classes = sorted sub-folder names) holding the
  ``.nii``/``.nii.gz`` files (for prediction, a folder of files without labels).

A path (a CSV cell, or a folder inside a class folder) may also name a folder holding one
DICOM series (``wrn3d_tl.data.dicom``; needs ``pip install 'wrn3d_tl[dicom]'``), read as
the NIfTI conversion of it would be.

Voxel order: the array nibabel returns (``img.dataobj``, scaling slope/intercept applied),
its axes ``i, j, k`` becoming ``D, H, W``. By default it is used as stored and the affine
is ignored; ``orientation="RAS"`` (recommended when scans come from several scanners or
sites) first permutes/flips the axes by the affine so that the same anatomy gives the same
array whichever order the file stores it in, and ``spacing=(d, h, w)`` then resamples
each scan linearly to that voxel size in mm (``wrn3d_tl.data.geometry``). 3-D images get
a channel axis of 1, 4-D images are channels-last ``(i, j, k, C)``. Training and
prediction read files the same way.

Preprocessing, per volume, in this order: ``orientation``, ``spacing``, ``intensity``
(on the voxels as read), then ``target_shape`` (centre crop / zero pad of each spatial
axis). Zero padding comes after the intensity step, so it pads with the volume's mean
(``"zscore"``) or the window's low end (``("window", lo, hi)``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from wrn3d_tl.validate import check_int, is_int
from wrn3d_tl.files import written_atomically

from . import dicom, geometry
from .reading import (INTENSITY_MODES, apply_reading, check_intensity, check_preprocessing, check_target_shape,
                      FILE_SIDE, check_spacing, fit_offsets, preprocessing_of)
from .pipeline import AUTOTUNE, marked_errors, _augmenter, _check_pipeline_flags, _element_seed, _finish, _sample_order, _tagged

__all__ = ["NIFTI_SUFFIXES", "INTENSITY_MODES", "NiftiInfo", "NiftiVolumes", "nifti_info", "read_nifti",
           "check_files", "usable_files", "nifti_dataset", "nifti_to_hdf5", "is_nifti_path", "preprocessing_of",
           "check_preprocessing", "check_intensity", "check_target_shape", "read_scan", "scan_grids", "placeable",
           "check_geometry"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path) -> bool:
    """Whether ``path`` names a NIfTI file by its suffix (``.nii`` or ``.nii.gz``)."""
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------- tables
@dataclasses.dataclass(frozen=True)
class NiftiInfo:
    """A validated NIfTI table (see :func:`nifti_info`).

    Attributes:
      table: the CSV file or folder.
      paths: absolute file paths, in table order (CSV rows, or folders then file names).
      where: one description per file for messages (``"labels.csv line 3 ('a.nii.gz')"``).
      labels: int64 ``(n,)`` class indices, or None for an unlabelled table.
      class_names: class names in index order (sorted names or sub-folders, or the
        ``classes`` given), or None when the labels are integers.
      num_classes: ``len(class_names)``, the ``num_classes`` given, or ``max(label) + 1``.
      n: number of volumes.
      volume_shape: ``(D, H, W, C)`` when every file reads to one shape, else None.
      shapes: ``(D, H, W, C)`` of each file as read (after the ``orientation`` and
        ``spacing`` given to :func:`nifti_info`, kept in ``geometry``), from the headers.
    """

    table: str
    paths: tuple = dataclasses.field(repr=False)
    where: tuple = dataclasses.field(repr=False)
    labels: np.ndarray | None = dataclasses.field(repr=False)
    class_names: tuple | None
    num_classes: int | None
    n: int
    volume_shape: tuple | None
    shapes: tuple = dataclasses.field(repr=False)
    geometry: tuple = (None, None)     # the (orientation, spacing) the shapes are for

    @property
    def channels(self) -> int:
        return self.shapes[0][-1]


def _csv_rows(table, need_labels):
    folder = os.path.dirname(os.path.abspath(table))
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            need = ["path", "label"] if need_labels else ["path"]
            missing = [c for c in need if c not in header]
            if missing:
                raise ValueError(f"table {table!r}: no {' or '.join(repr(c) for c in missing)} column; the header "
                                 f"is {header} (expected columns {need})")
            rows = []
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
                if not any(row.values()):
                    continue        # a blank line
                line = reader.line_num
                if not row.get("path"):
                    raise ValueError(f"table {table!r} line {line}: empty path")
                if need_labels and not row.get("label"):
                    raise ValueError(f"table {table!r} line {line}: empty label for {row['path']!r}")
                path = os.path.join(folder, os.path.expanduser(row["path"]))
                rows.append((path, row.get("label") if need_labels else None,
                             f"{table!r} line {line} ({row['path']!r})"))
    except UnicodeDecodeError as e:
        raise ValueError(f"table {table!r} is not a UTF-8 CSV file: {_one_line(e)}") from e
    except csv.Error as e:
        raise ValueError(f"table {table!r} is not a readable CSV file: {_one_line(e)}") from e
    return rows


def _series_folder(path):
    """Whether ``path`` is a folder of one DICOM series' files (files only, none NIfTI)."""
    return os.path.isdir(path) and dicom.looks_like_series(path, is_nifti_path)


def _nifti_files(folder, series=False):
    """The NIfTI files in ``folder``, and with ``series`` its sub-folders of DICOM files."""
    return sorted(p for p in (os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith("."))
                  if (is_nifti_path(p) and os.path.isfile(p)) or (series and _series_folder(p)))


def _folder_rows(table, need_labels):
    """``(rows, class names)``: the classes are the sorted sub-folders, an empty one included
    (numbering them by the files found would shift a split that lacks a class)."""
    classes = sorted(d for d in os.listdir(table) if os.path.isdir(os.path.join(table, d)))
    if not need_labels:     # unlabelled: series folders at the top level are scans, not classes
        classes = [d for d in classes if not _series_folder(os.path.join(table, d))]
    loose = _nifti_files(table, series=not need_labels)
    if need_labels and loose:
        raise ValueError(f"table {table!r}: a labelled folder holds one sub-folder per class, but "
                         f"{os.path.basename(loose[0])!r} lies at its top level")
    rows = [(p, None, repr(p)) for p in loose]
    for name in classes:
        rows += [(p, name, repr(p)) for p in _nifti_files(os.path.join(table, name), series=True)]
    return rows, tuple(classes)


def _labels(values, where, table, classes, num_classes):
    """Integer class indices and the class names (None for integer labels)."""
    if classes is None and all(_is_int_literal(v) for v in values):
        labels = np.array([int(v) for v in values], np.int64)
        limit = num_classes if num_classes is not None else None
        for label, w in zip(labels, where):
            if label < 0 or (limit is not None and label >= limit):
                raise ValueError(f"{w}: label {label} is outside [0, num_classes={limit})" if limit is not None
                                 else f"{w}: label {label} is negative")
        return labels, None, int(num_classes if num_classes is not None else labels.max() + 1)
    names = tuple(sorted(set(values))) if classes is None else tuple(str(c) for c in classes)
    if classes is not None and len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct names, got {list(classes)}")
    index = {name: i for i, name in enumerate(names)}
    for value, w in zip(values, where):
        if value not in index:
            raise ValueError(f"{w}: label {value!r} is not one of the classes {list(names)}")
    if num_classes is not None and len(names) > num_classes:
        raise ValueError(f"table {table!r}: {len(names)} classes {list(names)} but num_classes={num_classes}")
    return (np.array([index[v] for v in values], np.int64), names,
            int(num_classes if num_classes is not None else len(names)))


def _is_int_literal(value):
    try:
        int(value)
        return True
    except (TypeError, ValueError):
        return False


def _header(path, where):
    """``((i, j, k, C), affine, placed)`` of a NIfTI file (header only; the voxels stay on
    disk) or of a DICOM series folder (headers only); ``placed``: see :func:`_placed`."""
    import nibabel as nib

    if os.path.isdir(path):
        _, affine, shape = dicom.read_series(path, where, pixels=False)
        return tuple(shape) + (1,), affine, True
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: file {path!r} does not exist")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib/gzip errors ...
        raise ValueError(f"{where}: {path!r} is not a readable NIfTI file: {_one_line(e)}") from e
    img = _checked(img, path, where)
    return _shape_of(img), img.affine, _placed(img)


def _placed(img):
    """Whether a NIfTI header says where its voxels are (a qform or sform code above 0).
    Without one nibabel makes up an affine from the voxel sizes alone, whose axis
    directions are a guess: fine for voxel sizes, wrong for an orientation."""
    return bool(int(img.header["qform_code"]) or int(img.header["sform_code"]))


def _read_shape(path, where, orientation=None, spacing=None):
    """``(D, H, W, C)`` of the file as read with ``orientation`` and ``spacing``, from its header."""
    shape, affine, placed = _header(path, where)
    check_geometry(affine, placed, path, where, orientation, spacing)
    return geometry.grid_of(shape, affine, orientation, spacing)[0] + shape[3:]


def check_geometry(affine, placed, path, where, orientation=None, spacing=None, purpose=None):
    """Raise ValueError naming the file when its affine cannot serve ``orientation``,
    ``spacing`` or ``purpose`` (e.g. "overlaid"): not finite, or a zero voxel size or
    axes in one plane; and, for an orientation or a purpose, a header that does not place
    the voxels (``placed`` False: no qform or sform code)."""
    if orientation is None and spacing is None and purpose is None:
        return
    use = purpose or " or ".join(word for word, given in (("reoriented", orientation), ("resampled", spacing))
                                 if given is not None)
    affine = np.asarray(affine, np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        rows = [[float(f"{v:.6g}") for v in row] for row in affine[:3]]
        why = "not finite" if not np.isfinite(affine).all() else "a zero voxel size or axes in one plane"
        raise ValueError(f"{where}: {path!r} has a degenerate affine ({why}), so it cannot be {use}: {rows}")
    if not placed and (orientation is not None or purpose is not None):
        raise ValueError(f"{where}: {path!r} does not say where its voxels are (its qform_code and sform_code are "
                         f"0), so it cannot be {use}; set its orientation (e.g. with nibabel's set_qform) or read it "
                         "without orientation")


def _load_whole(path, where):
    """The nibabel image of ``path`` read into memory with one open and one gunzip:
    ``nib.load`` opens a file three times (type sniffing, header, voxels), which made
    reading, not decompressing, most of a volume's cost in a pipeline."""
    import gzip

    import nibabel as nib

    if os.path.isdir(path):
        data, affine, _ = dicom.read_series(path, where)
        return nib.Nifti1Image(data, affine)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: file {path!r} does not exist")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
        kind = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
        if kind is None:
            raise ValueError("no NIfTI header (its first 4 bytes are not 348 or 540)")
        img = kind.from_bytes(raw)
    except Exception as e:  # truncated gzip (EOFError), bad header (HeaderDataError), ...
        raise ValueError(f"{where}: {path!r} is not a readable NIfTI file: {_one_line(e)}") from e
    return _checked(img, path, where)


def _checked(img, path, where):
    """``img`` when it is a NIfTI image of real numbers with 3 or 4 axes."""
    import nibabel as nib

    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{where}: {path!r} is a {type(img).__name__}, not a NIfTI image")
    dtype = img.get_data_dtype()
    if dtype.kind not in "iufb" or dtype.fields is not None:
        raise ValueError(f"{where}: {path!r} holds {dtype} voxels; only real numbers are supported")
    if len(img.shape) not in (3, 4) or 0 in img.shape:
        raise ValueError(f"{where}: {path!r} has shape {img.shape}; expected a 3-D (i, j, k) or 4-D "
                         "(i, j, k, channels) image")
    return img


def _shape_of(img):
    shape = tuple(int(s) for s in img.shape)
    return shape + (1,) if len(shape) == 3 else shape


def check_files(paths, where, *, threads=None, progress=None, orientation=None, spacing=None):
    """Read every file once (header, voxels, finiteness, and whether its affine can serve
    ``orientation`` and ``spacing``; parallel threads, a progress bar on a terminal): the
    list of ``"where: what is wrong"`` messages of the bad ones, in table order (empty when
    all are fine)."""
    return [m for m in _problems(paths, where, threads, progress, orientation, spacing) if m is not None]


def usable_files(table, *, threads=None, progress=None, orientation=None, spacing=None):
    """Split an unlabelled table (a CSV with a ``path`` column, a folder, or one file) into
    ``(NiftiInfo of the files that read cleanly, [(path, "where: what is wrong"), ...] of the
    others)``: the check pass of :func:`nifti_info` that keeps going (``wrn3d-predict
    --skip-bad``). The usable files must share their channel count; their shapes are as
    read with ``orientation`` and ``spacing``."""
    table = os.fspath(table)
    rows, _ = _table_rows(table, False, single_file=True)
    paths = tuple(os.path.abspath(p) for p, _, _ in rows)
    where = tuple(w for _, _, w in rows)
    grid = (geometry.check_orientation(orientation), geometry.check_spacing(spacing))
    problems = _problems(paths, where, threads, progress, *grid)
    keep = [i for i, m in enumerate(problems) if m is None]
    bad = [(paths[i], m) for i, m in enumerate(problems) if m is not None]
    if not keep:
        _none_usable(table, len(paths), bad)
    shapes = _header_shapes([paths[i] for i in keep], [where[i] for i in keep], *grid)
    info = NiftiInfo(table=table, paths=tuple(paths[i] for i in keep), where=tuple(where[i] for i in keep), geometry=grid,
                     labels=None, class_names=None, num_classes=None, n=len(keep),
                     volume_shape=shapes[0] if all(sh == shapes[0] for sh in shapes) else None, shapes=shapes)
    return info, bad


def placeable(info, reading):
    """Split a :class:`NiftiInfo` by whether each file's header can serve ``reading``'s
    orientation and spacing (headers only; e.g. files checked before the model's reading
    was known): ``(NiftiInfo of those that can, with their shapes as read, [(path, "where:
    what is wrong"), ...] of the others)``."""
    reading = check_preprocessing(reading) or preprocessing_of(None, None)
    if reading.get("orientation") is None and reading.get("spacing") is None:
        return info, []
    keep, bad = [], []
    for i, (path, where) in enumerate(zip(info.paths, info.where)):
        try:
            _read_shape(path, where, reading.get("orientation"), reading.get("spacing"))
        except (OSError, ValueError) as e:
            bad.append((path, _one_line(e)))
            continue
        keep.append(i)
    if not keep:
        _none_usable(info.table, info.n, bad)
    subset = dataclasses.replace(info, paths=tuple(info.paths[i] for i in keep), n=len(keep),
                                 where=tuple(info.where[i] for i in keep), shapes=tuple(info.shapes[i] for i in keep),
                                 labels=None if info.labels is None else info.labels[keep], geometry=(None, None))
    return _as_read(subset, reading), bad


def _none_usable(table, n, bad):
    if n == 1 and bad[0][0] == os.path.abspath(table):     # one scan given, not a table
        raise ValueError(bad[0][1])
    raise ValueError(f"table {table!r}: none of its {n} files can be used; the first: {bad[0][1]}")


def _table_rows(table, labels, single_file=False):
    """``(rows, class folders or None)`` of a table: rows ``(path, label value or None,
    where)`` of a CSV, a class-per-folder folder, or (``single_file``) one NIfTI file or
    one DICOM series folder (a folder of files only, none of them NIfTI)."""
    if not os.path.exists(table):
        raise FileNotFoundError(f"table {table!r} does not exist (expected a CSV file with path and label "
                                "columns, or a folder of NIfTI files)")
    folders = None
    if single_file and _one_scan(table):
        rows = [(table, None, repr(table))]
    elif os.path.isdir(table):
        rows, folders = _folder_rows(table, labels)
    else:
        rows = _csv_rows(table, labels)
    if not rows:
        raise ValueError(f"table {table!r} lists no NIfTI files (.nii or .nii.gz) or DICOM series folders")
    return rows, folders


def _header_shapes(paths, where, orientation=None, spacing=None):
    """``(D, H, W, C)`` of each file as read, from its header; ValueError when the channels differ."""
    shapes = tuple(_read_shape(p, w, orientation, spacing) for p, w in zip(paths, where))
    for shape, w in zip(shapes, where):
        if shape[-1] != shapes[0][-1]:
            raise ValueError(f"{w}: {shape[-1]} channel(s) (shape {shape}), but {where[0]} has {shapes[0][-1]}")
    return shapes


def _problems(paths, where, threads=None, progress=None, orientation=None, spacing=None):
    """One entry per file: None, or its one-line problem."""
    import sys

    from tqdm import tqdm

    def problem(i):
        try:
            read_nifti(paths[i], intensity=None, where=where[i])         # voxels as stored: no resampling
            if orientation is not None or spacing is not None:
                _read_shape(paths[i], where[i], orientation, spacing)   # the affine serves the reading
        except (OSError, ValueError) as e:
            return _one_line(e)
        return None

    show = sys.stderr.isatty() if progress is None else progress
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(paths), desc="checking scans", unit="file", disable=not show) as bar:
        found = []
        for message in pool.map(problem, range(len(paths))):
            bar.update(1)
            found.append(message)
    return found


def nifti_info(table, *, labels: bool = True, classes=None, num_classes=None, check: bool = False,
               orientation=None, spacing=None) -> NiftiInfo:
    """Validate a NIfTI table and summarise it, reading every file's header (not its voxels).

    Args:
      table: a CSV file (``path``, ``label`` columns) or a folder (see the module's doc).
      labels: False for a table without labels (prediction): a CSV needs only ``path``,
        a folder may hold the files at its top level.
      classes: the class names in index order, to map name labels the same way for every
        split (pass ``nifti_info(train_table).class_names`` for val/test tables).
      num_classes: labels must be in ``[0, num_classes)``.
      check: also read every file's voxels once (parallel; a progress bar on a terminal)
        and raise ONE ValueError listing every file that cannot be used (truncated,
        unreadable, NaN/Inf voxels), each with its CSV line. Costs one pass of decoding.
      orientation, spacing: the shapes are given as read with them (see :func:`read_scan`).

    Raises FileNotFoundError or ValueError naming the table and, where it applies, the
    file and CSV line: table missing, empty, missing columns, empty cells, a file missing
    or not NIfTI, non-numeric voxels, a label outside ``[0, num_classes)`` or not among
    ``classes``, files with different channel counts.
    """
    table = os.fspath(table)
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes")
    rows, folders = _table_rows(table, labels)
    classes = folders if classes is None else classes
    paths = tuple(os.path.abspath(p) for p, _, _ in rows)
    where = tuple(w for _, _, w in rows)
    label_array = names = None
    count = num_classes
    if labels:
        label_array, names, count = _labels([v for _, v, _ in rows], where, table, classes, num_classes)
    if check:
        bad = check_files(paths, where, orientation=orientation, spacing=spacing)
        if bad:
            raise ValueError(f"table {table!r}: {len(bad)} of {len(paths)} files cannot be used:\n  "
                             + ";\n  ".join(bad))
    grid = (geometry.check_orientation(orientation), geometry.check_spacing(spacing))
    shapes = _header_shapes(paths, where, *grid)
    same = all(s == shapes[0] for s in shapes)
    return NiftiInfo(table=table, paths=paths, where=where, labels=label_array, class_names=names,
                     num_classes=count, n=len(paths), volume_shape=shapes[0] if same else None, shapes=shapes,
                     geometry=grid)


# ------------------------------------------------------------------- reading
def read_scan(path, *, orientation=None, spacing=None, where=None):
    """The file side of a reading: one NIfTI file or DICOM series folder as ``(voxels,
    affine)``, float32 ``(D, H, W, C)`` and the float64 4x4 RAS+ affine of that grid,
    reoriented to ``orientation`` and resampled to ``spacing`` mm when they are given
    (``wrn3d_tl.data.geometry``). Raises ValueError naming the file (``where``):
    unreadable, non-numeric, NaN/Inf voxels."""
    path = os.fspath(path)
    where = where or repr(path)
    orientation, spacing = geometry.check_orientation(orientation), geometry.check_spacing(spacing)
    img = _load_whole(path, where)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # voxels cut short
        raise ValueError(f"{where}: cannot read the voxels of {path!r}: {_one_line(e)}") from e
    if data.ndim == 3:
        data = data[..., None]
    if not np.isfinite(data).all():
        raise ValueError(f"{where}: {path!r} contains NaN or Inf voxels")
    affine = np.asarray(img.affine, np.float64)
    check_geometry(affine, _placed(img), path, where, orientation, spacing)
    if orientation is not None:
        data, affine = geometry.reorient(data, affine, orientation)
    if spacing is not None:
        data, affine = geometry.resample(data, affine, spacing)
    return data, affine


def scan_grids(path, reading, where=None):
    """Where a file's voxels and the network's input voxels are in the world, from the
    header: ``(scan shape (i, j, k), scan affine, network grid shape (D, H, W), network grid
    affine)`` for the file read with ``reading`` (orientation, spacing, crop/pad)."""
    path = os.fspath(path)
    reading = check_preprocessing(reading) or preprocessing_of(None, None)
    shape, affine, placed = _header(path, where or repr(path))
    check_geometry(affine, placed, path, where or repr(path), reading.get("orientation"), reading.get("spacing"),
                   purpose="overlaid (a map goes onto the scan's grid through its affine)")
    grid, grid_affine = geometry.grid_of(shape, affine, reading.get("orientation"), reading.get("spacing"))
    if reading["target_shape"] is not None:
        grid_affine = geometry.shifted(grid_affine, fit_offsets(grid, reading["target_shape"]))
        grid = tuple(reading["target_shape"])
    return shape[:3], np.asarray(affine, np.float64), grid, grid_affine


def read_nifti(path, *, intensity="zscore", target_shape=None, orientation=None, spacing=None,
               where=None) -> np.ndarray:
    """One NIfTI file (or DICOM series folder) as a float32 ``(D, H, W, C)`` array, read as
    described in the module's doc (``orientation``, ``spacing``, ``intensity``, then centre
    crop / zero pad to ``target_shape``).

    ``intensity``: ``"zscore"`` (per volume and channel, over all voxels: ``(x - mean) /
    std``; std 1 for a constant volume), ``"zscore_nonzero"`` (the same over the non-zero
    voxels, zeros stay 0: skull-stripped MRI), ``("window", lo, hi)`` (CT: clip to
    ``[lo, hi]`` in stored units, e.g. Hounsfield, and scale to ``[0, 1]``), or None.
    ``orientation`` (e.g. ``"RAS"``) and ``spacing`` (mm ``(d, h, w)``): see :func:`read_scan`.
    Raises ValueError naming the file (``where``): unreadable, non-numeric, NaN/Inf voxels.
    """
    reading = preprocessing_of(intensity, target_shape, orientation, spacing)
    data, _ = read_scan(path, orientation=orientation, spacing=spacing, where=where)
    return apply_reading(data[None], reading)[0]


def _one_scan(path):
    """Whether ``path`` is one scan: a NIfTI file, or a folder of one DICOM series' files."""
    return (is_nifti_path(path) and os.path.isfile(path)) or _series_folder(path)


def _as_read(info, reading):
    """``info`` with the shapes of its files as read with ``reading``'s orientation and spacing."""
    shapes = _header_shapes(info.paths, info.where, reading.get("orientation"), reading.get("spacing"))
    return dataclasses.replace(info, shapes=shapes, volume_shape=shapes[0] if len(set(shapes)) == 1 else None,
                               geometry=(reading.get("orientation"), check_spacing(reading.get("spacing"))))


def _output_shape(info, target_shape):
    if target_shape is not None:
        return tuple(target_shape) + (info.channels,)
    if info.volume_shape is None:
        first = info.shapes[0]
        i = next(i for i, s in enumerate(info.shapes) if s != first)
        raise ValueError(f"{info.where[i]}: shape {info.shapes[i]} differs from {info.where[0]}'s {first}; "
                         "pass target_shape=(D, H, W) to centre-crop / zero-pad every volume to one shape")
    return info.volume_shape


class NiftiVolumes:
    """The volumes of a NIfTI table as a read-only array-like ``(N, D, H, W, C)`` float32:
    ``len``, ``shape``, ``dtype`` and ``[i]`` / ``[start:stop]`` (files read on demand, a
    slice's files in parallel threads). What ``predict`` and ``nifti_to_hdf5`` read from.

    ``table``: a table (see :func:`nifti_info`; ``labels=False`` accepts unlabelled ones),
    a :class:`NiftiInfo` (its shapes are recomputed for another ``orientation`` or ``spacing``), or one
    ``.nii``/``.nii.gz`` file. ``reading`` is the record (:func:`preprocessing_of`) the
    files are read with.
    """

    def __init__(self, table, *, intensity="zscore", target_shape=None, labels=False, classes=None,
                 num_classes=None, threads=None, check=False, orientation=None, spacing=None):
        self.reading = preprocessing_of(intensity, target_shape, orientation, spacing)
        self.intensity = check_intensity(intensity)
        self.target_shape = check_target_shape(target_shape)
        self.orientation, self.spacing = self.reading.get("orientation"), check_spacing(spacing)
        if isinstance(table, NiftiInfo):
            info = table if table.geometry == (self.orientation, self.spacing) else _as_read(table, self.reading)
        elif isinstance(table, (str, os.PathLike)) and _one_scan(table):
            path = os.path.abspath(os.fspath(table))
            shape = _read_shape(path, repr(path), self.orientation, self.spacing)
            info = NiftiInfo(table=path, paths=(path,), where=(repr(path),), labels=None, class_names=None,
                             geometry=(self.orientation, self.spacing),
                             num_classes=None, n=1, volume_shape=shape, shapes=(shape,))
        else:
            info = nifti_info(table, labels=labels, classes=classes, num_classes=num_classes, check=check,
                              orientation=self.orientation, spacing=self.spacing)
        self.info = info
        self.shape = (info.n,) + _output_shape(info, self.target_shape)
        self.dtype = np.dtype(np.float32)
        self.threads = threads or min(8, os.cpu_count() or 1)

    @classmethod
    def from_reading(cls, table, reading, **kwargs):
        """The volumes of ``table`` read as the record ``reading`` (:func:`preprocessing_of`) says."""
        reading = check_preprocessing(reading)
        return cls(table, intensity=reading["intensity"], target_shape=reading["target_shape"],
                   orientation=reading.get("orientation"), spacing=reading.get("spacing"), **kwargs)

    def __len__(self):
        return self.shape[0]

    def read(self, i) -> np.ndarray:
        """Volume ``i`` as float32 ``(D, H, W, C)``."""
        out = read_nifti(self.info.paths[i], intensity=self.intensity, target_shape=self.target_shape,
                         orientation=self.orientation, spacing=self.spacing, where=self.info.where[i])
        if out.shape != self.shape[1:]:
            raise ValueError(f"{self.info.where[i]}: shape {out.shape} differs from the table's "
                             f"{self.shape[1:]}; pass target_shape=(D, H, W)")
        return out

    def __getitem__(self, item):
        if isinstance(item, slice):
            idx = range(*item.indices(len(self)))
            if len(idx) <= 1 or self.threads == 1:
                parts = [self.read(i) for i in idx]
            else:
                with ThreadPoolExecutor(self.threads) as pool:
                    parts = list(pool.map(self.read, idx))
            return np.stack(parts) if parts else np.empty((0,) + self.shape[1:], np.float32)
        if is_int(item):
            i = int(item) + (len(self) if item < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {item} is out of range for {len(self)} volumes")
            return self.read(i)
        raise TypeError(f"NiftiVolumes indices are ints or slices, got {item!r}")


# ------------------------------------------------------------------ pipelines
def nifti_dataset(table, *, batch_size: int, training: bool = False, target_shape=None, intensity="zscore",
                  seed: int = 0, repeat: bool = False, shuffle=None, augment=None, num_classes=None,
                  classes=None, drop_remainder: bool = False, check: bool = True, orientation=None,
                  spacing=None) -> tf.data.Dataset:
    """Stream labelled NIfTI volumes as ``tf.data`` batches.

    Every file's header is checked up front (:func:`nifti_info`); voxels are read per
    sample inside a parallel ``tf.data`` map (nibabel in a ``tf.numpy_function``), so the
    dataset is never held in memory. For many epochs over a large table, convert once with
    :func:`nifti_to_hdf5` and stream with ``hdf5_dataset`` (gzip decoding is the cost).

    Args:
      table: CSV file or class-per-folder folder (see the module's doc).
      batch_size: positive int.
      training: default for ``shuffle`` (augmentation is never on by default: say which
        transforms suit the anatomy with ``augment=Augment3D(...)``).
      target_shape: ``(D, H, W)``: centre crop / zero pad each volume to it. None: every
        file must have the same shape (else ValueError naming the first that differs).
      intensity: see :func:`read_nifti`.
      orientation: None (axes as stored) or axis codes such as ``"RAS"``: reorder/flip each
        scan's axes by its affine (no interpolation). Recommended when scans come from
        more than one scanner: the same anatomy then gives the same array.
      spacing: None (voxels as stored) or ``(d, h, w)`` mm in the output axis order:
        resample each scan linearly to that voxel size (before ``target_shape``); for many
        epochs, do it once with :func:`nifti_to_hdf5`.
      seed, repeat, shuffle, drop_remainder: as in ``make_dataset`` (same seed, same
        batches; shuffling is a fresh deterministic permutation per epoch).
      augment: None/False, or an :class:`Augment3D` or callable ``(volume, seed [2]) ->
        volume``, applied to each preprocessed volume.
      num_classes, classes: see :func:`nifti_info`.

    Returns:
      ``tf.data.Dataset`` of ``(float32 (B, D, H, W, C), int64 (B,))``, tagged as carrying
      no dataset-level normalisation (the per-volume ``intensity`` step replaces it).
      ``dataset.wrn3d_class_names`` holds the class names (or None) and
      ``dataset.wrn3d_preprocessing`` the reading (:func:`preprocessing_of`), which a
      ``Trainer`` stores in its checkpoints for ``predict``.

    ``check`` (default True): read every file once before returning (``nifti_info(...,
    check=True)``), so truncated files and NaN/Inf voxels are all listed in one ValueError
    before any training step; False skips that pass. Errors while reading a file later on
    surface when the batch is produced; a ``Trainer`` re-raises them as ValueError with the
    reader's one-line message (``wrn3d_tl.data.data_errors`` does it for other loops).
    """
    batch_size = check_int(batch_size, "batch_size")
    training, augment, shuffle, _, drop_remainder, repeat, seed, _ = _check_pipeline_flags(
        training, False if augment is None else augment, shuffle, False, drop_remainder, repeat, seed, 0)
    if augment is True:
        raise ValueError("nifti_dataset: augment=True has no meaning for scans; pass augment=Augment3D(...) "
                         "naming the flips/rotations/crops that suit the anatomy")
    volumes = NiftiVolumes(table, intensity=intensity, target_shape=target_shape, labels=True, classes=classes,
                           num_classes=num_classes, check=check, orientation=orientation, spacing=spacing)
    info, shape = volumes.info, volumes.shape[1:]
    n = info.n
    if drop_remainder and not repeat and n < batch_size:
        raise ValueError(f"table {info.table!r}: drop_remainder=True with batch_size={batch_size} > N={n} "
                         "yields no batches")
    labels = tf.constant(info.labels)
    augmenter = _augmenter(augment, 0, False) if augment else None

    read = marked_errors(lambda i: volumes.read(int(i)))

    def load(index, epoch):
        volume = tf.numpy_function(read, [index], tf.float32, stateful=False)
        volume = tf.ensure_shape(volume, shape)
        if augmenter is not None:
            volume = tf.cast(augmenter(volume, _element_seed(seed, epoch, index)), tf.float32)
        return volume, tf.gather(labels, index)

    def build(pipeline):
        ds = _sample_order(pipeline, seed, shuffle).map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        return _finish(ds.batch(pipeline.replica_batch, drop_remainder=drop_remainder), pipeline)

    return _tagged(build, n, batch_size, drop_remainder, repeat, None, wrn3d_class_names=info.class_names,
                   wrn3d_preprocessing=volumes.reading)


def nifti_to_hdf5(table, out_path, *, target_shape=None, intensity="zscore", classes=None, num_classes=None,
                  compression=None, x_key="volumes", y_key="labels", progress=False, orientation=None,
                  spacing=None):
    """Read a labelled NIfTI table once (files in parallel threads) and write the
    preprocessed float32 volumes and labels to an HDF5 file that ``hdf5_dataset`` streams
    (with ``normalization=None``: the intensity step is already applied). The class names
    are stored as a JSON attribute of the labels, the reading (:func:`preprocessing_of`,
    which ``hdf5_dataset`` hands on to a ``Trainer``) and the source table as attributes of
    the volumes. ``progress``: a tqdm bar of the volumes written, on stderr (None: when it
    is a terminal). ``orientation`` and ``spacing`` (see :func:`nifti_dataset`) are done
    here, once, rather than at every epoch. Returns the file's ``HDF5Info``."""
    from .hdf5 import hdf5_info, write_hdf5_volumes

    volumes = NiftiVolumes(table, intensity=intensity, target_shape=target_shape, labels=True, classes=classes,
                           num_classes=num_classes, orientation=orientation, spacing=spacing)
    info = volumes.info
    with written_atomically(out_path) as tmp, _Counted(volumes, progress) as counted:  # a bad scan: no half file
        write_hdf5_volumes(tmp, counted, info.labels, x_key=x_key, y_key=y_key, compression=compression,
                           num_classes=info.num_classes,
                           class_names=info.class_names if info.class_names and len(info.class_names) ==
                           info.num_classes else None)
        _describe(tmp, x_key, y_key, info, volumes)
    return hdf5_info(out_path, x_key, y_key)


class _Counted:
    """``volumes`` as an array-like whose slices advance a progress bar."""

    def __init__(self, volumes, progress):
        import sys

        from tqdm.auto import tqdm

        self.volumes, self.shape, self.dtype = volumes, volumes.shape, volumes.dtype
        show = sys.stderr.isatty() if progress is None else bool(progress)
        self.bar = tqdm(total=len(volumes), unit="scan", disable=not show, file=sys.stderr, dynamic_ncols=True)

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, item):
        out = self.volumes[item]
        self.bar.update(len(out) if isinstance(item, slice) else 1)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _describe(path, x_key, y_key, info, volumes):
    import json

    import h5py

    with h5py.File(path, "a") as f:
        f[x_key].attrs["source"] = json.dumps({"table": os.path.abspath(info.table), "intensity": volumes.intensity,
                                               "target_shape": volumes.target_shape,
                                               **{k: volumes.reading[k] for k in FILE_SIDE if k in volumes.reading}})
        f[x_key].attrs["preprocessing"] = json.dumps(volumes.reading)
