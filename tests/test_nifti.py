"""Tests for wrn3d_tl.data.nifti (NIfTI tables -> volumes, tf.data, HDF5) and the NIfTI
input of wrn3d_tl.predict.

Every test writes real ``.nii`` / ``.nii.gz`` files with nibabel into ``tmp_path`` and runs
the real reading code on them. Volumes are tiny (4x6x6, 8x8x8 for the one training run).
"""

import csv
import gzip
import json
import os
import re

import h5py
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.data import (
    Augment3D,
    NiftiVolumes,
    data_errors,
    hdf5_dataset,
    nifti_dataset,
    nifti_info,
    nifti_to_hdf5,
    normalization_of,
    read_nifti,
)
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.predict import Predictor, predict
from wrn3d_tl.commands.predict import main as predict_main
from wrn3d_tl.train import Trainer

SHAPE = (4, 6, 6)


# ---------------------------------------------------------------------- helpers
def save(path, data, affine=None, slope_inter=None):
    """Write ``data`` as a NIfTI-1 file at ``path`` (folders created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, path)
    return path


def volume(rng, shape=SHAPE, scale=50.0, offset=300.0):
    return (rng.normal(size=shape) * scale + offset).astype(np.float32)


def write_csv(path, rows, header=("path", "label")):
    with open(path, "w", newline="") as fh:
        fh.writelines(",".join(str(v) for v in row) + "\n" for row in [header, *rows])
    return os.fspath(path)


def zscore(x):
    """Reference: (x - mean) / std per channel over all voxels of a DHWC array (float64)."""
    x = x.astype(np.float64)
    return (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))


def batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return xs, ys


@pytest.fixture
def table(tmp_path, rng):
    """Six 3-D volumes (4x6x6) with name labels in a CSV; returns (csv, raw volumes, labels)."""
    raws, rows = [], []
    names = ["cyst", "tumor", "normal", "tumor", "cyst", "normal"]
    for i, name in enumerate(names):
        raw = volume(rng)
        raw[0, 0, 0] = 1000 + i          # an id that survives intensity=None
        raws.append(raw)
        save(tmp_path / "scans" / f"s{i}.nii.gz", raw)
        rows.append((f"scans/s{i}.nii.gz", name))
    return write_csv(tmp_path / "table.csv", rows), raws, names


# ------------------------------------------------------------ reading one file
def test_3d_image_reads_as_dhw1_float32_in_stored_order(tmp_path, rng):
    raw = volume(rng)
    x = read_nifti(save(tmp_path / "a.nii.gz", raw), intensity=None)
    assert x.dtype == np.float32 and x.shape == SHAPE + (1,)
    np.testing.assert_array_equal(x[..., 0], raw)


def test_4d_image_is_channels_last(tmp_path, rng):
    raw = volume(rng, SHAPE + (3,))
    raw[..., 1] += 1000                  # channels differ, so a transposed read cannot pass
    x = read_nifti(save(tmp_path / "a.nii", raw), intensity=None)
    assert x.shape == SHAPE + (3,) and x.dtype == np.float32
    np.testing.assert_array_equal(x, raw)
    assert nifti_info(write_csv(tmp_path / "t.csv", [("a.nii", 0)])).volume_shape == SHAPE + (3,)


def test_scl_slope_and_inter_are_applied(tmp_path):
    raw = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    path = save(tmp_path / "ct.nii.gz", raw, slope_inter=(2.0, -5.0))
    stored = nib.load(path)
    assert stored.get_data_dtype() == np.int16                       # the file really holds scaled ints
    assert (stored.dataobj.slope, stored.dataobj.inter) == (2.0, -5.0)
    np.testing.assert_array_equal(np.asarray(stored.dataobj.get_unscaled()), raw)
    x = read_nifti(path, intensity=None)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 0], 2.0 * raw.astype(np.float32) - 5.0)
    # the window is in stored (scaled) units: -5 is the low end, 2 * 143 - 5 = 281 the top
    w = read_nifti(path, intensity=("window", -5.0, 281.0))
    np.testing.assert_allclose(w[..., 0], (2.0 * raw - 5.0 + 5.0) / 286.0, rtol=1e-6)


def test_affine_does_not_change_the_voxel_order(tmp_path, rng):
    raw = volume(rng)
    # axes permuted and flipped: i -> z, j -> -y, k -> -x, with anisotropic spacing
    affine = np.array([[0, 0, -1.5, 10], [0, -3.0, 0, 20], [2.0, 0, 0, -7], [0, 0, 0, 1]])
    path = save(tmp_path / "oblique.nii.gz", raw, affine=affine)
    canonical = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    assert canonical.shape != raw.shape            # applying the affine WOULD reorder the voxels
    x = read_nifti(path, intensity=None)
    np.testing.assert_array_equal(x[..., 0], raw)  # axes i, j, k -> D, H, W, as stored


# ---------------------------------------------------------------------- tables
def test_csv_table_paths_extra_columns_blank_lines_and_info(tmp_path, rng):
    raws = [volume(rng) for _ in range(3)]
    save(tmp_path / "data" / "sub" / "a.nii.gz", raws[0])
    absolute = save(tmp_path / "elsewhere" / "b.nii", raws[1])
    save(tmp_path / "data" / "c.nii.gz", raws[2])
    table = tmp_path / "data" / "labels.csv"
    table.write_text("patient,path,age,label\n"
                     "p1,sub/a.nii.gz,40,1\n"
                     "\n"
                     f"p2,{absolute},51,0\n"
                     ",,,\n"
                     "p3, c.nii.gz ,60,2\n"
                     "\n")
    info = nifti_info(table)
    assert info.n == 3 and info.table == os.fspath(table)
    assert info.paths == (str(tmp_path / "data" / "sub" / "a.nii.gz"), absolute, str(tmp_path / "data" / "c.nii.gz"))
    assert info.labels.dtype == np.int64 and info.labels.tolist() == [1, 0, 2]
    assert info.class_names is None and info.num_classes == 3
    assert info.volume_shape == SHAPE + (1,) and info.channels == 1 and info.shapes == (SHAPE + (1,),) * 3
    assert "line 2" in info.where[0] and "line 4" in info.where[1] and "line 6" in info.where[2]
    assert nifti_info(table, num_classes=5).num_classes == 5
    vols = NiftiVolumes(info, intensity=None)
    for i in range(3):
        np.testing.assert_array_equal(vols[i][..., 0], raws[i])


def test_folder_table_sorted_class_folders(tmp_path, rng):
    root = tmp_path / "scans"
    save(root / "tumor" / "t2.nii.gz", volume(rng))
    save(root / "tumor" / "t1.nii", volume(rng))
    save(root / "normal" / "n1.nii.gz", volume(rng))
    save(root / "cyst" / "c1.nii.gz", volume(rng))
    (root / "tumor" / "notes.txt").write_text("not a scan")
    (root / "tumor" / "t3.nii.gz.bak").write_text("not a scan")
    info = nifti_info(root)
    assert info.class_names == ("cyst", "normal", "tumor") and info.num_classes == 3
    assert [os.path.relpath(p, root) for p in info.paths] == [
        os.path.join("cyst", "c1.nii.gz"), os.path.join("normal", "n1.nii.gz"),
        os.path.join("tumor", "t1.nii"), os.path.join("tumor", "t2.nii.gz")]
    assert info.labels.tolist() == [0, 1, 2, 2] and info.labels.dtype == np.int64
    # unlabelled (prediction): loose files allowed; labelled: refused, naming the file
    save(root / "loose.nii.gz", volume(rng))
    unlabelled = nifti_info(root, labels=False)
    assert unlabelled.labels is None and unlabelled.n == 5 and unlabelled.paths[0].endswith("loose.nii.gz")
    with pytest.raises(ValueError, match="loose.nii.gz"):
        nifti_info(root)


def test_name_labels_sorted_and_classes_pin_the_mapping(tmp_path, table):
    path, _, names = table
    info = nifti_info(path)
    assert info.class_names == ("cyst", "normal", "tumor") and info.num_classes == 3
    assert info.labels.tolist() == [["cyst", "normal", "tumor"].index(n) for n in names]
    # a test table without "normal": sorted mapping alone would shift tumor to 1
    test_csv = write_csv(os.path.join(os.path.dirname(path), "test.csv"),
                         [("scans/s0.nii.gz", "cyst"), ("scans/s1.nii.gz", "tumor")])
    assert nifti_info(test_csv).labels.tolist() == [0, 1]
    pinned = nifti_info(test_csv, classes=info.class_names)
    assert pinned.labels.tolist() == [0, 2] and pinned.class_names == info.class_names and pinned.num_classes == 3
    assert nifti_dataset(test_csv, batch_size=2, classes=info.class_names).wrn3d_class_names == info.class_names


def test_different_shapes_give_no_volume_shape(tmp_path, rng):
    save(tmp_path / "a.nii.gz", volume(rng, (4, 6, 6)))
    save(tmp_path / "b.nii.gz", volume(rng, (5, 6, 7)))
    info = nifti_info(write_csv(tmp_path / "t.csv", [("a.nii.gz", 0), ("b.nii.gz", 1)]))
    assert info.volume_shape is None and info.shapes == ((4, 6, 6, 1), (5, 6, 7, 1)) and info.channels == 1


# ---------------------------------------------------------------------- errors
def test_missing_and_empty_tables(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv.*does not exist"):
        nifti_info(tmp_path / "nope.csv")
    empty = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match="empty.csv.*lists no NIfTI files"):
        nifti_info(empty)
    (tmp_path / "blank.csv").write_text("path,label\n\n\n")
    with pytest.raises(ValueError, match="blank.csv.*lists no NIfTI files"):
        nifti_info(tmp_path / "blank.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder.*lists no NIfTI files"):
        nifti_info(tmp_path / "folder")


def test_missing_columns_message_lists_the_header(tmp_path):
    t = write_csv(tmp_path / "t.csv", [("a.nii.gz", 0)], header=("file", "label", "age"))
    with pytest.raises(ValueError, match=re.escape("no 'path' column; the header is ['file', 'label', 'age']")):
        nifti_info(t)
    t = write_csv(tmp_path / "u.csv", [("a.nii.gz", 0)], header=("path", "class"))
    with pytest.raises(ValueError, match=re.escape("no 'label' column; the header is ['path', 'class']")):
        nifti_info(t)
    with pytest.raises(ValueError, match=re.escape("no 'path' or 'label' column")):
        nifti_info(write_csv(tmp_path / "v.csv", [("x",)], header=("name",)))


def test_empty_cells_name_the_line(tmp_path, rng):
    save(tmp_path / "a.nii.gz", volume(rng))
    t = write_csv(tmp_path / "t.csv", [("a.nii.gz", 0), ("", 1)])
    with pytest.raises(ValueError, match=r"t\.csv' line 3: empty path"):
        nifti_info(t)
    t = write_csv(tmp_path / "u.csv", [("a.nii.gz", 0), ("a.nii.gz", "")])
    with pytest.raises(ValueError, match=r"u\.csv' line 3: empty label for 'a\.nii\.gz'"):
        nifti_info(t)
    assert nifti_info(t, labels=False).n == 2      # no labels wanted: the empty label cell is fine


def test_missing_file_names_the_file_and_the_line(tmp_path, rng):
    save(tmp_path / "a.nii.gz", volume(rng))
    (tmp_path / "t.csv").write_text("path,label\na.nii.gz,0\n\nghost.nii.gz,1\n")
    with pytest.raises(FileNotFoundError, match=r"t\.csv' line 4 \('ghost\.nii\.gz'\): file .*ghost\.nii\.gz"):
        nifti_info(tmp_path / "t.csv")


def test_garbage_and_truncated_files_name_the_file(tmp_path, rng):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"garbage\.nii\.gz.*not a readable NIfTI file"):
        read_nifti(garbage)
    with pytest.raises(ValueError, match=r"line 2 \('garbage\.nii\.gz'\).*not a readable NIfTI file"):
        nifti_info(write_csv(tmp_path / "t.csv", [("garbage.nii.gz", 0)]))
    # plain gzip of non-NIfTI bytes: a valid .gz, not a NIfTI
    with gzip.open(tmp_path / "text.nii.gz", "wb") as fh:
        fh.write(b"hello, not a scan " * 40)
    with pytest.raises(ValueError, match=r"text\.nii\.gz.*not a readable NIfTI file"):
        read_nifti(tmp_path / "text.nii.gz")
    # truncated download: the header survives, the voxels do not (nifti_info reads headers only)
    full = save(tmp_path / "full.nii.gz", rng.normal(size=(16, 16, 16)).astype(np.float32))
    with open(full, "rb") as fh:
        data = fh.read()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    assert nifti_info(write_csv(tmp_path / "c.csv", [("cut.nii.gz", 0)])).volume_shape == (16, 16, 16, 1)
    with pytest.raises(ValueError, match=r"cut\.nii\.gz.*(cannot read the voxels|not a readable NIfTI file)"):
        read_nifti(tmp_path / "cut.nii.gz")
    # cut inside the header
    (tmp_path / "stub.nii.gz").write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"stub\.nii\.gz"):
        read_nifti(tmp_path / "stub.nii.gz")


def test_non_numeric_voxels_are_refused(tmp_path):
    save(tmp_path / "complex.nii.gz", np.ones(SHAPE, np.complex64))
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    save(tmp_path / "rgb.nii.gz", rgb)
    with pytest.raises(ValueError, match=r"complex\.nii\.gz' holds complex64 voxels; only real numbers"):
        read_nifti(tmp_path / "complex.nii.gz")
    with pytest.raises(ValueError, match=r"rgb\.nii\.gz' holds .*voxels; only real numbers"):
        read_nifti(tmp_path / "rgb.nii.gz")
    with pytest.raises(ValueError, match=r"line 2 \('rgb\.nii\.gz'\).*only real numbers"):
        nifti_info(write_csv(tmp_path / "t.csv", [("rgb.nii.gz", 0)]))


def test_label_errors_name_the_line(tmp_path, rng):
    for name in "abc":
        save(tmp_path / f"{name}.nii.gz", volume(rng))
    t = write_csv(tmp_path / "t.csv", [("a.nii.gz", 0), ("b.nii.gz", 3), ("c.nii.gz", 1)])
    assert nifti_info(t).num_classes == 4
    with pytest.raises(ValueError, match=re.escape("line 3 ('b.nii.gz'): label 3 is outside [0, num_classes=3)")):
        nifti_info(t, num_classes=3)
    with pytest.raises(ValueError, match=re.escape("line 3 ('b.nii.gz'): label 3 is outside [0, num_classes=2)")):
        nifti_dataset(t, batch_size=2, num_classes=2)
    t = write_csv(tmp_path / "neg.csv", [("a.nii.gz", 0), ("b.nii.gz", 1), ("c.nii.gz", -1)])
    with pytest.raises(ValueError, match=re.escape("line 4 ('c.nii.gz'): label -1 is negative")):
        nifti_info(t)
    t = write_csv(tmp_path / "names.csv", [("a.nii.gz", "cyst"), ("b.nii.gz", "polyp")])
    with pytest.raises(ValueError, match=re.escape("line 3 ('b.nii.gz'): label 'polyp' is not one of the classes "
                                                   "['cyst', 'tumor']")):
        nifti_info(t, classes=["cyst", "tumor"])
    with pytest.raises(ValueError, match="2 classes .* but num_classes=1"):
        nifti_info(t, num_classes=1)
    with pytest.raises(ValueError, match="classes must be distinct"):
        nifti_info(t, classes=["cyst", "cyst", "polyp"])


def test_nan_voxels_name_the_file(tmp_path, rng):
    good, bad = volume(rng), volume(rng)
    bad[1, 2, 3] = np.nan
    save(tmp_path / "good.nii.gz", good)
    save(tmp_path / "bad.nii.gz", bad)
    with pytest.raises(ValueError, match=r"bad\.nii\.gz' contains NaN or Inf voxels"):
        read_nifti(tmp_path / "bad.nii.gz")
    table = write_csv(tmp_path / "t.csv", [("good.nii.gz", 0), ("bad.nii.gz", 1)])
    with pytest.raises(ValueError, match=r"1 of 2 files cannot be used:\n  .*line 3 \('bad\.nii\.gz'\).*contains NaN"):
        nifti_dataset(table, batch_size=1)                  # the check pass, before any batch
    ds = nifti_dataset(table, batch_size=1, check=False)
    it = iter(ds)
    assert next(it)[0].shape == (1,) + SHAPE + (1,)        # the good file streams; the bad one fails when read
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"line 3 \('bad\.nii\.gz'\).*contains NaN"):
        next(it)
    with pytest.raises(ValueError) as e, data_errors():   # ... and comes out as the reader's one line
        next(iter(ds.skip(1)))
    assert str(e.value) == (f"{str(table)!r} line 3 ('bad.nii.gz'): {str(tmp_path / 'bad.nii.gz')!r} contains NaN "
                            "or Inf voxels")


def test_different_shapes_without_target_shape_name_the_file(tmp_path, rng):
    save(tmp_path / "a.nii.gz", volume(rng, (4, 6, 6)))
    save(tmp_path / "b.nii.gz", volume(rng, (4, 6, 6)))
    save(tmp_path / "c.nii.gz", volume(rng, (4, 6, 5)))
    t = write_csv(tmp_path / "t.csv", [("a.nii.gz", 0), ("b.nii.gz", 1), ("c.nii.gz", 0)])
    with pytest.raises(ValueError, match=r"line 4 \('c\.nii\.gz'\): shape \(4, 6, 5, 1\) differs .*target_shape"):
        nifti_dataset(t, batch_size=2)
    with pytest.raises(ValueError, match=r"c\.nii\.gz.*differs"):
        NiftiVolumes(t)
    ds = nifti_dataset(t, batch_size=3, target_shape=(4, 6, 6))
    assert [x.shape for x, _ in ds] == [(3, 4, 6, 6, 1)]


def test_different_channel_counts_are_refused(tmp_path, rng):
    save(tmp_path / "a.nii.gz", volume(rng, SHAPE + (2,)))
    save(tmp_path / "b.nii.gz", volume(rng, SHAPE))
    t = write_csv(tmp_path / "t.csv", [("a.nii.gz", 0), ("b.nii.gz", 1)])
    with pytest.raises(ValueError, match=r"line 3 \('b\.nii\.gz'\): 1 channel\(s\) .*line 2 \('a\.nii\.gz'\) has 2"):
        nifti_info(t)


def test_bad_rank_is_refused(tmp_path, rng):
    save(tmp_path / "flat.nii.gz", volume(rng, (6, 6)))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz' has shape \(6, 6\); expected a 3-D"):
        read_nifti(tmp_path / "flat.nii.gz")


# ------------------------------------------------------- target_shape, intensity
def reference_fit(x, target):
    """Centre crop / zero pad with explicit slicing (numpy reference for _fit)."""
    out = x
    for axis, want in enumerate(target):
        have = out.shape[axis]
        if have >= want:
            start = (have - want) // 2
            out = np.moveaxis(np.moveaxis(out, axis, 0)[start:start + want], 0, axis)
        else:
            before = (want - have) // 2
            shape = list(out.shape)
            shape[axis] = want
            padded = np.zeros(shape, out.dtype)
            idx = [slice(None)] * out.ndim
            idx[axis] = slice(before, before + have)
            padded[tuple(idx)] = out
            out = padded
    return out


@pytest.mark.parametrize("target", [(2, 9, 5),      # D crop 3 (odd), H pad 3 (odd), W crop 2 (even)
                                    (8, 4, 10),     # D pad 3 (odd), H crop 2 (even), W pad 3 (odd)
                                    (6, 8, 7)])     # D pad 1, H pad 2 (even), W same
def test_target_shape_centre_crop_and_zero_pad(tmp_path, rng, target):
    raw = volume(rng, (5, 6, 7, 2))
    path = save(tmp_path / "v.nii.gz", raw)
    x = read_nifti(path, target_shape=target)
    assert x.shape == target + (2,) and x.dtype == np.float32
    np.testing.assert_allclose(x, reference_fit(zscore(raw), target), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(read_nifti(path, intensity=None, target_shape=target),
                                  reference_fit(raw, target))
    # explicit check of the first case's geometry
    if target == (2, 9, 5):
        np.testing.assert_array_equal(read_nifti(path, intensity=None, target_shape=target)[:, 1:7],
                                      raw[1:3, :, 1:6])
    # padding comes after zscore: padded voxels are exactly 0 (raw values are ~300)
    pad_mask = reference_fit(np.ones_like(raw), target) == 0
    if pad_mask.any():
        assert np.all(x[pad_mask] == 0)
        assert np.all(x[~pad_mask] != 0)


def test_target_shape_is_validated(tmp_path, rng):
    path = save(tmp_path / "v.nii.gz", volume(rng))
    for bad in [(4, 6), (4, 6, 0), (4, 6, 6.0), "466", (4, -1, 6)]:
        with pytest.raises(ValueError, match="target_shape must be None or three positive ints"):
            read_nifti(path, target_shape=bad)


def test_intensity_zscore_per_volume_and_channel(tmp_path, rng):
    raw = np.stack([volume(rng, scale=5, offset=-40), volume(rng, scale=300, offset=1000)], axis=-1)
    x = read_nifti(save(tmp_path / "v.nii.gz", raw))                       # "zscore" is the default
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), [0, 0], atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), [1, 1], atol=1e-5)
    np.testing.assert_allclose(x, zscore(raw), rtol=1e-5, atol=1e-5)
    # a constant volume is centred, not divided by ~0
    flat = read_nifti(save(tmp_path / "flat.nii.gz", np.full(SHAPE, 7.0, np.float32)))
    np.testing.assert_array_equal(flat, np.zeros(SHAPE + (1,), np.float32))


def test_intensity_zscore_nonzero_keeps_zeros(tmp_path, rng):
    raw = volume(rng)
    raw[:, :2] = 0.0                                     # "background" after skull stripping
    x = read_nifti(save(tmp_path / "v.nii.gz", raw), intensity="zscore_nonzero")[..., 0]
    assert np.all(x[:, :2] == 0)
    fg = x[:, 2:]
    assert np.all(fg != 0)
    np.testing.assert_allclose([fg.mean(), fg.std()], [0, 1], atol=1e-5)
    sel = raw[:, 2:].astype(np.float64)
    np.testing.assert_allclose(fg, (sel - sel.mean()) / sel.std(), rtol=1e-5, atol=1e-5)
    # plain zscore moves the zeros (the stats include them)
    assert np.all(read_nifti(tmp_path / "v.nii.gz")[:, :2] != 0)


def test_intensity_window_and_none(tmp_path, rng):
    raw = rng.uniform(-1500, 1500, SHAPE).astype(np.float32)
    path = save(tmp_path / "ct.nii.gz", raw)
    x = read_nifti(path, intensity=("window", -1000, 400))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], (np.clip(raw, -1000, 400) + 1000) / 1400, rtol=1e-6, atol=1e-7)
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.all(x[..., 0][raw <= -1000] == 0) and np.all(x[..., 0][raw >= 400] == 1)
    assert np.array_equal(read_nifti(path, intensity=["window", -1000, 400]), x)   # a list works too
    np.testing.assert_array_equal(read_nifti(path, intensity=None)[..., 0], raw)


@pytest.mark.parametrize("bad", ["minmax", "ZSCORE", ("window", 5, 1), ("window", 1, 1), ("window", 0, np.inf),
                                 ("window", "0", 1), ("window", True, 2), ("window", 0), ("level", 0, 1), 3])
def test_invalid_intensity_values(tmp_path, rng, bad):
    path = save(tmp_path / "v.nii.gz", volume(rng))
    with pytest.raises(ValueError, match="intensity must be 'zscore', 'zscore_nonzero', None or"):
        read_nifti(path, intensity=bad)
    with pytest.raises(ValueError, match="intensity must be"):
        NiftiVolumes(path, intensity=bad)


# ------------------------------------------------------------------ nifti_dataset
def test_dataset_batches_in_table_order(table):
    path, raws, names = table
    ds = nifti_dataset(path, batch_size=4)
    assert ds.wrn3d_class_names == ("cyst", "normal", "tumor")
    assert normalization_of(ds) == (True, None)
    assert int(ds.cardinality()) == 2
    xs, ys = batches(ds)
    assert [x.shape for x in xs] == [(4,) + SHAPE + (1,), (2,) + SHAPE + (1,)]
    assert all(x.dtype == np.float32 for x in xs) and all(y.dtype == np.int64 for y in ys)
    expected = np.stack([read_nifti(os.path.join(os.path.dirname(path), "scans", f"s{i}.nii.gz")) for i in range(6)])
    np.testing.assert_array_equal(np.concatenate(xs), expected)
    np.testing.assert_allclose(np.concatenate(xs), np.stack([zscore(r[..., None]) for r in raws]), atol=1e-5)
    assert np.concatenate(ys).tolist() == [["cyst", "normal", "tumor"].index(n) for n in names]


def ids(x):
    """The volume ids written at [0, 0, 0] by the ``table`` fixture (intensity=None)."""
    return (np.asarray(x)[:, 0, 0, 0, 0] - 1000).astype(int).tolist()


def test_dataset_shuffle_is_seeded_and_differs_per_epoch(table):
    path, _, names = table
    label_of = [["cyst", "normal", "tumor"].index(n) for n in names]
    ds = nifti_dataset(path, batch_size=6, training=True, intensity=None, seed=3)
    epochs = [next(iter(ds)) for _ in range(3)]
    orders = [ids(x) for x, _ in epochs]
    assert all(sorted(o) == list(range(6)) for o in orders)          # each epoch is a permutation
    assert len({tuple(o) for o in orders}) == 3                      # ... a different one each epoch
    assert orders[0] != list(range(6))
    for order, (_, y) in zip(orders, epochs):
        assert y.numpy().tolist() == [label_of[i] for i in order]     # labels travel with their volume
    again = nifti_dataset(path, batch_size=6, training=True, intensity=None, seed=3)
    assert [ids(next(iter(again))[0]) for _ in range(3)] == orders    # same seed, same batches
    other = nifti_dataset(path, batch_size=6, training=True, intensity=None, seed=4)
    assert ids(next(iter(other))[0]) != orders[0]
    # repeat: endless, epochs back to back
    rep = nifti_dataset(path, batch_size=6, shuffle=True, intensity=None, seed=3, repeat=True)
    assert int(rep.cardinality()) == tf.data.INFINITE_CARDINALITY
    assert [ids(x) for x, _ in rep.take(3)] == orders
    # no shuffle: table order every epoch
    plain = nifti_dataset(path, batch_size=6, intensity=None)
    assert [ids(next(iter(plain))[0]) for _ in range(2)] == [list(range(6))] * 2


def test_dataset_cardinality_and_drop_remainder(table):
    path = table[0]
    ds = nifti_dataset(path, batch_size=4, drop_remainder=True)
    assert int(ds.cardinality()) == 1
    assert [x.shape[0] for x, _ in ds] == [4]
    assert int(nifti_dataset(path, batch_size=5).cardinality()) == 2
    with pytest.raises(ValueError, match="drop_remainder=True with batch_size=7 > N=6 yields no batches"):
        nifti_dataset(path, batch_size=7, drop_remainder=True)
    with pytest.raises(ValueError, match="batch_size"):
        nifti_dataset(path, batch_size=0)


def test_dataset_augment(table):
    path = table[0]
    with pytest.raises(ValueError, match="augment=True has no meaning for scans"):
        nifti_dataset(path, batch_size=2, augment=True)
    aug = Augment3D(flip_axes="W")
    plain = np.concatenate(batches(nifti_dataset(path, batch_size=3))[0])
    runs = [np.concatenate(batches(nifti_dataset(path, batch_size=3, augment=aug, seed=11))[0]) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])                      # same seed -> same augmentation
    flipped = []
    for got, orig in zip(runs[0], plain):
        if np.array_equal(got, orig):
            flipped.append(False)
        else:
            np.testing.assert_array_equal(got, orig[:, :, ::-1])         # a W flip, nothing else
            flipped.append(True)
    assert any(flipped) and not all(flipped)
    # augment=False is accepted (no augmentation)
    np.testing.assert_array_equal(np.concatenate(batches(nifti_dataset(path, batch_size=3, augment=False))[0]), plain)


# -------------------------------------------------------------------- HDF5 copy
def test_nifti_to_hdf5_matches_nifti_dataset(tmp_path, table):
    path = table[0]
    out = tmp_path / "scans.h5"
    h5info = nifti_to_hdf5(path, out, target_shape=(4, 5, 8), compression="gzip")
    assert h5info.n == 6 and h5info.volume_shape == (4, 5, 8, 1)
    ref_x, ref_y = batches(nifti_dataset(path, batch_size=4, target_shape=(4, 5, 8)))
    got_x, got_y = batches(hdf5_dataset(out, batch_size=4, normalization=None))
    assert len(got_x) == len(ref_x) == 2
    for a, b in zip(got_x, ref_x):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got_y, ref_y):
        assert a.dtype == np.int64
        np.testing.assert_array_equal(a, b)
    with h5py.File(out, "r") as f:
        assert f["labels"][:].tolist() == nifti_info(path).labels.tolist()
        assert json.loads(f["labels"].attrs["class_names"]) == ["cyst", "normal", "tumor"]
        assert int(f["labels"].attrs["num_classes"]) == 3
        source = json.loads(f["volumes"].attrs["source"])
        assert source["intensity"] == "zscore" and source["target_shape"] == [4, 5, 8]


# ------------------------------------------------------------------ NiftiVolumes
def test_nifti_volumes_array_like(table):
    path, raws, _ = table
    files = [os.path.join(os.path.dirname(path), "scans", f"s{i}.nii.gz") for i in range(6)]
    vols = NiftiVolumes(path, intensity="zscore_nonzero", target_shape=(3, 6, 7))
    assert vols.shape == (6, 3, 6, 7, 1) and len(vols) == 6 and vols.dtype == np.float32
    expected = np.stack([read_nifti(f, intensity="zscore_nonzero", target_shape=(3, 6, 7)) for f in files])
    np.testing.assert_array_equal(vols[2], expected[2])
    np.testing.assert_array_equal(vols[-1], expected[5])
    np.testing.assert_array_equal(vols[1:5], expected[1:5])
    np.testing.assert_array_equal(vols[::2], expected[::2])
    np.testing.assert_array_equal(vols[:], expected)
    assert vols[4:4].shape == (0, 3, 6, 7, 1)
    serial = NiftiVolumes(path, intensity="zscore_nonzero", target_shape=(3, 6, 7), threads=1)
    np.testing.assert_array_equal(serial[0:6], vols[0:6])
    with pytest.raises(IndexError, match="index 6 is out of range for 6 volumes"):
        vols[6]
    with pytest.raises(TypeError, match="ints or slices"):
        vols[[0, 1]]
    one = NiftiVolumes(files[3], intensity=None)                     # a single file
    assert one.shape == (1,) + SHAPE + (1,)
    np.testing.assert_array_equal(one[0][..., 0], raws[3])


# ---------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A freshly initialised WRN-10-1 for (4, 6, 6, 1) volumes, saved by Trainer.save; its
    train_data (a nifti_dataset) says the batches carry no dataset-level normalisation."""
    root = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(7)
    save(root / "x.nii.gz", volume(rng))
    train = nifti_dataset(write_csv(root / "t.csv", [("x.nii.gz", 0)]), batch_size=1)
    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=2, input_shape=SHAPE + (1,)))
    trainer = Trainer(model, train, lr=0.01, verbose=False)
    assert trainer.normalization is None and trainer.normalization_known
    return trainer.save(os.fspath(root / "wrn.h5"))


@pytest.fixture
def scans(tmp_path, rng):
    """A folder of 5 unlabelled scans of shape (5, 7, 6) (bigger than the model's input)."""
    folder = tmp_path / "new_scans"
    files = [save(folder / f"p{i}.nii.gz", volume(rng, (5, 7, 6), scale=30 + 10 * i)) for i in range(5)]
    return folder, files


def test_predict_nifti_folder_csv_and_file(tmp_path, checkpoint, scans):
    folder, files = scans
    kw = {"intensity": "zscore", "target_shape": SHAPE}
    stack = np.stack([read_nifti(f, **kw) for f in files])
    model = Predictor(checkpoint)                 # loaded once for the reference predictions
    ref = predict(model, stack, batch_size=2, preprocessed=True)   # read already
    out = predict(checkpoint, folder, batch_size=2, **kw)      # from the checkpoint file
    assert out["path"] == files
    for key in ("class", "probability", "top_k_classes", "top_k_probabilities", "logits", "probabilities"):
        np.testing.assert_array_equal(out[key], ref[key])
        assert out[key].dtype == ref[key].dtype
    assert "path" not in ref
    # a CSV with only a path column (reversed order) and a single file
    table = write_csv(tmp_path / "p.csv", [(f,) for f in files[::-1]], header=("path",))
    by_csv = predict(model, table, **kw)
    assert by_csv["path"] == files[::-1]
    np.testing.assert_array_equal(by_csv["logits"], predict(model, stack[::-1], preprocessed=True)["logits"])
    single = predict(model, files[2], **kw)
    assert single["path"] == [files[2]]
    np.testing.assert_array_equal(single["logits"], predict(model, stack[2:3], preprocessed=True)["logits"])
    # intensity and target_shape are forwarded: raw volumes give other logits than z-scored ones
    raw = predict(model, folder, intensity=None, target_shape=SHAPE)
    raw_stack = np.stack([read_nifti(f, intensity=None, target_shape=SHAPE) for f in files])
    np.testing.assert_array_equal(raw["logits"], predict(model, raw_stack, preprocessed=True)["logits"])
    assert not np.array_equal(raw["logits"], ref["logits"])
    # without target_shape the (5, 7, 6) scans do not fit the model: the error names the input
    with pytest.raises(ValueError, match="new_scans.*spatial shape"):
        predict(model, folder)


def test_predict_cli_nifti(tmp_path, checkpoint, scans, capsys):
    folder, files = scans
    out_csv = tmp_path / "preds.csv"
    code = predict_main(["--checkpoint", checkpoint, "--nifti", str(folder), "--target-shape", "4,6,6",
                         "--intensity", "window:250:350", "--out", str(out_csv), "--top-k", "2"])
    assert code == 0, capsys.readouterr().err
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == files
    assert [r["index"] for r in rows] == ["0", "1", "2", "3", "4"]
    stack = np.stack([read_nifti(f, intensity=("window", 250, 350), target_shape=SHAPE) for f in files])
    ref = predict(checkpoint, stack, top_k=2, preprocessed=True)
    assert [int(r["class"]) for r in rows] == ref["class"].tolist()
    np.testing.assert_allclose([float(r["probability"]) for r in rows], ref["probability"], atol=1e-6)
    assert "5 prediction(s)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--intensity", "minmax"), ("--intensity", "window:5:1"),
                                         ("--intensity", "window:a:b"), ("--target-shape", "4,6"),
                                         ("--target-shape", "4,0,6"), ("--target-shape", "4,x,6")])
def test_predict_cli_bad_nifti_flags(tmp_path, checkpoint, scans, capsys, flag, value):
    out_csv = tmp_path / "preds.csv"
    code = predict_main(["--checkpoint", checkpoint, "--nifti", str(scans[0]), flag, value, "--out", str(out_csv)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrn3d-predict: error:")
    assert flag in lines[0] and repr(value) in lines[0]
    assert not out_csv.exists()


def test_predict_cli_bad_nifti_input(tmp_path, checkpoint, capsys):
    (tmp_path / "scan.nii.gz").write_bytes(b"not a scan at all" * 30)
    code = predict_main(["--checkpoint", checkpoint, "--nifti", str(tmp_path / "scan.nii.gz"),
                         "--out", str(tmp_path / "p.csv")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "--nifti" in lines[0] and "scan.nii.gz" in lines[0] and "not a readable NIfTI file" in lines[0]


def test_checkpoint_remembers_how_nifti_was_read(tmp_path, scans, capsys):
    """A trainer fed by nifti_dataset (or by hdf5_dataset on a nifti_to_hdf5 file) stores the
    reading in its checkpoint; predict and wrn3d-predict then read new scans the same way
    without being told, and an explicit argument still wins."""
    folder, files = scans                       # (5, 7, 6) scans: only the stored crop makes them fit
    window = ("window", 250.0, 350.0)
    table = write_csv(tmp_path / "t.csv", [(f, i % 2) for i, f in enumerate(files)])
    train = nifti_dataset(table, batch_size=2, target_shape=SHAPE, intensity=window)
    stored = {"reader": "nifti", "intensity": list(window), "target_shape": list(SHAPE)}
    assert train.wrn3d_preprocessing == stored
    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=2, input_shape=SHAPE + (1,)))
    trainer = Trainer(model, train, lr=0.01, verbose=False)
    path = trainer.save(os.fspath(tmp_path / "wrn.h5"))
    assert Trainer.restore(path, verbose=False).preprocessing == stored
    stack = np.stack([read_nifti(f, intensity=window, target_shape=SHAPE) for f in files])
    ref = predict(trainer, stack, preprocessed=True)["logits"]
    np.testing.assert_array_equal(predict(path, folder)["logits"], ref)
    assert not np.array_equal(predict(path, folder, intensity="zscore")["logits"], ref)
    out_csv = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", path, "--nifti", str(folder), "--out", str(out_csv)]) == 0, \
        capsys.readouterr().err
    with open(out_csv, newline="") as fh:
        assert [int(r["class"]) for r in csv.DictReader(fh)] == np.argmax(ref, axis=1).tolist()
    # the same record travels through an HDF5 conversion
    h5 = nifti_to_hdf5(table, tmp_path / "v.h5", target_shape=SHAPE, intensity=window)
    assert h5.preprocessing == stored
    assert Trainer(model, hdf5_dataset(h5.path, batch_size=2, normalization=None), lr=0.01,
                   verbose=False).preprocessing == stored


# ------------------------------------------------------------- one learnable run
def slab_volumes(rng, n):
    """8x8x8 noise with a bright 2-slice slab in the first (class 0) or second (class 1)
    half of the depth axis, in scanner-like units (* 50 + 300)."""
    xs, ys = [], []
    for i in range(n):
        label = i % 2
        x = rng.normal(size=(8, 8, 8))
        start = rng.integers(0, 3) + 4 * label
        x[start:start + 2] += 3.0
        xs.append((x * 50 + 300).astype(np.float32))
        ys.append(label)
    return xs, ys


def test_training_on_nifti_learns(tmp_path):
    rng = np.random.default_rng(0)
    names = ("early", "late")
    tables = {}
    for split, n in (("train", 48), ("test", 16)):
        xs, ys = slab_volumes(rng, n)
        rows = [(save(tmp_path / split / f"{split}{i:02d}.nii.gz", x), names[y])
                for i, (x, y) in enumerate(zip(xs, ys))]
        tables[split] = write_csv(tmp_path / f"{split}.csv", rows)
    info = nifti_info(tables["train"])
    assert info.class_names == names and info.volume_shape == (8, 8, 8, 1) and info.n == 48
    train_ds = nifti_dataset(tables["train"], batch_size=8, training=True, repeat=True, seed=1)
    test_ds = nifti_dataset(tables["test"], batch_size=16, classes=info.class_names)
    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=2, input_shape=info.volume_shape))
    trainer = Trainer(model, train_ds, eval_data=test_ds, lr=0.05, total_steps=40, verbose=False)
    trainer.fit(40, progress=False)
    result = trainer.evaluate(log=False)
    assert result["samples"] == 16
    assert result["accuracy"] >= 0.9, result
    assert result["auc"] >= 0.9, result
    assert trainer.normalization is None      # per-volume intensity; nothing dataset-level stored


def test_empty_class_folder_keeps_the_numbering(tmp_path, rng):
    """Classes of a folder table are its sub-folders, empty ones included: a split that lacks
    a class keeps the training split's numbering."""
    for split, present in (("train", "ABC"), ("val", "AC")):
        for name in "ABC":
            (tmp_path / split / name).mkdir(parents=True)
        for name in present:
            save(tmp_path / split / name / "x.nii.gz", volume(rng))
    train, val = nifti_info(tmp_path / "train"), nifti_info(tmp_path / "val")
    assert train.class_names == val.class_names == ("A", "B", "C")
    assert train.labels.tolist() == [0, 1, 2] and val.labels.tolist() == [0, 2] and val.num_classes == 3


def test_nifti_to_hdf5_failure_leaves_the_old_file(tmp_path, rng):
    good = write_csv(tmp_path / "good.csv", [(save(tmp_path / "a.nii.gz", volume(rng)), 0)])
    out = tmp_path / "out.h5"
    before = nifti_to_hdf5(good, out)
    bad_volume = volume(rng)
    bad_volume[0, 0, 0] = np.nan
    bad = write_csv(tmp_path / "bad.csv", [(tmp_path / "a.nii.gz", 0), (save(tmp_path / "b.nii.gz", bad_volume), 1)])
    data = out.read_bytes()
    with pytest.raises(ValueError, match=r"b\.nii\.gz.*NaN"):
        nifti_to_hdf5(bad, out)
    assert out.read_bytes() == data and before.n == 1
    assert sorted(os.listdir(tmp_path)) == sorted(["a.nii.gz", "b.nii.gz", "good.csv", "bad.csv", "out.h5"])


def test_readings_are_validated_and_compared(tmp_path, rng, scans):
    import h5py

    with pytest.raises(ValueError, match=r"Trainer\(preprocessing=...\) must be None or"):
        Trainer(build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=2, input_shape=SHAPE + (1,))),
                preprocessing="zscore", verbose=False)
    folder, files = scans
    table = write_csv(tmp_path / "t.csv", [(f, i % 2) for i, f in enumerate(files)])
    h5 = nifti_to_hdf5(table, tmp_path / "v.h5", target_shape=SHAPE)
    with h5py.File(h5.path, "a") as f:
        f["volumes"].attrs["preprocessing"] = '{"reader": "nifti", "intensity": "zcore", "target_shape": null}'
    with pytest.raises(ValueError, match=r"v\.h5.*bad preprocessing attribute.*zcore"):
        hdf5_dataset(h5.path, batch_size=2)
    trainer = Trainer(build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=2, input_shape=SHAPE + (1,))),
                      nifti_dataset(table, batch_size=2, target_shape=SHAPE), lr=0.01, verbose=False)
    other = nifti_dataset(table, batch_size=2, target_shape=SHAPE, intensity=None)
    with pytest.raises(ValueError, match="evaluate: the pipeline reads its files with"):
        trainer.evaluate(other)
    # NiftiVolumes read another way than the checkpoint says are refused, not silently used
    path = trainer.save(os.fspath(tmp_path / "c.h5"))
    with pytest.raises(ValueError, match="NiftiVolumes read files with"):
        predict(path, NiftiVolumes(folder, intensity=None, target_shape=SHAPE))


def test_predict_cli_nifti_flags_need_nifti_input(tmp_path, checkpoint, capsys):
    np.save(tmp_path / "v.npy", np.zeros((1,) + SHAPE + (1,), np.float32))
    code = predict_main(["--checkpoint", checkpoint, "--npy", str(tmp_path / "v.npy"), "--intensity", "none",
                         "--out", str(tmp_path / "p.csv")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--intensity" in lines[0] and "--nifti inputs only" in lines[0]


def test_converted_scans_are_not_augmented_unless_asked(tmp_path, rng):
    """hdf5_dataset(training=True) on a nifti_to_hdf5 file: no WRN crop/flip by default (a flip
    may swap left and right organs), as in nifti_dataset; augment=True still applies it."""
    rows = [(save(tmp_path / f"{i}.nii.gz", volume(rng, (4, 8, 8))), i % 2) for i in range(4)]
    h5 = nifti_to_hdf5(write_csv(tmp_path / "t.csv", rows), tmp_path / "v.h5")

    def first(**kw):
        ds = hdf5_dataset(h5.path, batch_size=4, training=True, shuffle=False, normalization=None, **kw)
        return next(iter(ds))[0].numpy()

    plain = next(iter(hdf5_dataset(h5.path, batch_size=4, normalization=None)))[0].numpy()
    np.testing.assert_array_equal(first(), plain)
    assert not np.array_equal(first(augment=True, crop_padding=2), plain)
