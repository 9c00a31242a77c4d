"""Scans as scanners write them (issue 27): the same anatomy stored in another axis order or
at another voxel size reads to the same array with ``orientation`` and ``spacing``; both
travel in the stored reading to predict, the SavedModel's metadata and Grad-CAM maps that
go back onto the scan's own grid."""

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest

from wrn3d_tl.data import hdf5_dataset, nifti_dataset, nifti_info
from wrn3d_tl.data.geometry import grid_of, reorient, resample, to_scan_grid, voxel_sizes
from wrn3d_tl.data.nifti import NiftiVolumes, read_nifti, read_scan, scan_grids
from wrn3d_tl.data.reading import check_preprocessing, describe_reading, preprocessing_of
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.predict import Predictor, predict
from wrn3d_tl.train import Trainer

RAS_AFFINE = np.array([[1.5, 0, 0, -9.0], [0, 1.0, 0, 4.0], [0, 0, 1.0, -3.5], [0, 0, 0, 1]])


def as_lps(data, affine):
    """The same scan stored in LPS order: axes 0 and 1 reversed, the affine following them."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(data.shape[:2]) - 1
    return np.ascontiguousarray(data[::-1, ::-1]), affine @ flip


def as_stored(data, affine, order):
    """The same scan with its voxel axes stored in ``order`` (a permutation of 0, 1, 2)."""
    perm = np.eye(4)[:, list(order) + [3]]
    return np.ascontiguousarray(np.transpose(data, order)), affine @ perm


def write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return os.fspath(path)


def anatomy(rng, shape=(12, 8, 9)):
    return rng.normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------- orientation
def test_ras_and_lps_files_of_one_anatomy_read_the_same_with_orientation(tmp_path, rng):
    data = anatomy(rng)
    ras = write(tmp_path / "ras.nii.gz", data, RAS_AFFINE)
    lps = write(tmp_path / "lps.nii.gz", *as_lps(data, RAS_AFFINE))
    pil = write(tmp_path / "pil.nii", *as_stored(*as_lps(data, RAS_AFFINE), (1, 2, 0)))   # permuted too
    assert nib.aff2axcodes(nib.load(lps).affine) == ("L", "P", "S")
    assert nib.aff2axcodes(nib.load(pil).affine) == ("P", "S", "L")
    canonical = read_nifti(ras, intensity=None, orientation="RAS")
    np.testing.assert_array_equal(canonical[..., 0], data)
    for other in (lps, pil):
        np.testing.assert_array_equal(read_nifti(other, intensity=None, orientation="ras"), canonical)
    assert not np.array_equal(read_nifti(lps, intensity=None), canonical)     # as stored: mirrored
    assert read_nifti(pil, intensity=None).shape == (8, 9, 12, 1)             # as stored: axes permuted
    # the affine of the reoriented grid is the RAS file's own, and the header alone predicts it
    voxels, affine = read_scan(pil, orientation="RAS")
    np.testing.assert_allclose(affine, RAS_AFFINE, atol=1e-6)
    header = nib.load(pil)
    shape, predicted = grid_of(header.shape, header.affine, "RAS")
    assert shape == voxels.shape[:3] and np.allclose(predicted, affine)
    # any target order: LPS gives the LPS file's array
    np.testing.assert_array_equal(read_nifti(ras, intensity=None, orientation="LPS"),
                                  read_nifti(lps, intensity=None))


def test_orientation_through_tables_datasets_and_headers(tmp_path, rng):
    data = [anatomy(rng) for _ in range(4)]
    rows = ["path,label"]
    for i, d in enumerate(data):
        stored = (d, RAS_AFFINE) if i % 2 else as_stored(*as_lps(d, RAS_AFFINE), (2, 0, 1))
        rows.append(f"{write(tmp_path / f's{i}.nii.gz', *stored)},{i % 2}")
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    as_is = nifti_info(table)
    assert as_is.volume_shape is None                       # stored orders differ: shapes differ
    info = nifti_info(table, orientation="RAS")
    assert info.volume_shape == (12, 8, 9, 1) and info.shapes == ((12, 8, 9, 1),) * 4
    ds = nifti_dataset(table, batch_size=4, orientation="RAS", intensity=None)
    x, y = next(iter(ds))
    np.testing.assert_array_equal(x.numpy()[..., 0], np.stack(data))
    assert ds.wrn3d_preprocessing == {"reader": "nifti", "intensity": None, "target_shape": None,
                                      "orientation": "RAS"}


def test_orientation_codes_are_checked(tmp_path, rng):
    path = write(tmp_path / "a.nii", anatomy(rng), RAS_AFFINE)
    for bad in ("RAR", "RA", "XYZ", 3, ("R", "A", "S")):
        with pytest.raises(ValueError, match="orientation must be None or three axis codes"):
            read_nifti(path, orientation=bad)


# -------------------------------------------------------------------- spacing
def sphere(spacing, shape, centre=(1.3, -2.2, 0.7), radius=10.0):
    """A ball of ``radius`` mm around the world point ``centre``, sampled at voxel centres."""
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)      # grid centred on the origin
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx * np.array(spacing) + affine[:3, 3]
    return (np.linalg.norm(world - np.array(centre), axis=-1) <= radius).astype(np.float32), affine


def ball_stats(voxels, affine):
    """(volume in mm^3, centre of mass in world mm) of a resampled ball."""
    inside = voxels[..., 0] > 0.5
    com = np.argwhere(inside).mean(axis=0)
    return inside.sum() * np.prod(voxel_sizes(affine)), (affine @ np.append(com, 1.0))[:3]


def test_a_ball_at_two_voxel_sizes_resamples_to_one_size_and_place(tmp_path):
    fine = write(tmp_path / "fine.nii.gz", *sphere((0.5, 0.5, 2.0), (80, 80, 20)))
    iso = write(tmp_path / "iso.nii.gz", *sphere((1.0, 1.0, 1.0), (40, 40, 40)))
    (a, affine_a), (b, affine_b) = (read_scan(p, spacing=(1, 1, 1)) for p in (fine, iso))
    assert a.shape == b.shape == (40, 40, 40, 1)
    np.testing.assert_allclose(voxel_sizes(affine_a), 1.0)
    np.testing.assert_allclose(voxel_sizes(affine_b), 1.0)
    (vol_a, com_a), (vol_b, com_b) = ball_stats(a, affine_a), ball_stats(b, affine_b)
    assert abs(vol_a - vol_b) / vol_b < 0.03, (vol_a, vol_b)
    assert abs(vol_b - 4 / 3 * np.pi * 1000) / vol_b < 0.03
    assert np.linalg.norm(com_a - com_b) <= 1.0, (com_a, com_b)
    assert np.linalg.norm(com_b - np.array([1.3, -2.2, 0.7])) <= 0.5
    # the header alone gives the grid the voxels come out on
    shape, affine = grid_of(nib.load(fine).shape, nib.load(fine).affine, None, (1, 1, 1))
    assert shape == a.shape[:3] and np.allclose(affine, affine_a)


def test_resampling_keeps_a_linear_ramp_and_the_world_position_of_voxels():
    """Linear interpolation reproduces a linear function of world position exactly (inside
    the grid), so each resampled voxel holds the value of its own world point."""
    affine = np.array([[0.9, 0, 0, 5.0], [0, 0.9, 0, -3.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
    shape = (20, 18, 7)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    ramp = (world @ np.array([0.5, -1.0, 0.25])).astype(np.float32)
    out, new = resample(ramp, affine, (1.0, 1.0, 1.0))
    assert out.shape == (18, 16, 21) and out.dtype == np.float32
    new_idx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).astype(np.float64)
    new_world = new_idx @ new[:3, :3].T + new[:3, 3]
    old_idx = (new_world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((old_idx >= 0) & (old_idx <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(out[inside], (new_world @ np.array([0.5, -1.0, 0.25]))[inside], atol=1e-3)


def test_spacing_is_checked_and_kept_in_the_record(tmp_path, rng):
    path = write(tmp_path / "a.nii", anatomy(rng), RAS_AFFINE)
    for bad in ((1, 1), (1, 0, 1), (1, float("nan"), 1), "1,1,1", (True, 1, 1)):
        with pytest.raises(ValueError, match="spacing must be None or three positive"):
            read_nifti(path, spacing=bad)
    record = preprocessing_of("zscore", (8, 8, 8), "ras", (2, 1, 1))
    assert record == {"reader": "nifti", "intensity": "zscore", "target_shape": [8, 8, 8], "orientation": "RAS",
                      "spacing": [2.0, 1.0, 1.0]}
    assert check_preprocessing(json.loads(json.dumps(record))) == record
    assert preprocessing_of("zscore", None) == {"reader": "nifti", "intensity": "zscore", "target_shape": None}
    assert describe_reading(record) == ("reoriented to RAS, resampled to 2x1x1 mm, intensity zscore, "
                                        "crop/pad to 8x8x8")
    with pytest.raises(ValueError, match="orientation"):
        check_preprocessing({**record, "orientation": "up"})
    with pytest.raises(ValueError, match="optionally with 'orientation' and 'spacing'"):
        check_preprocessing({**record, "flip": True})


# ------------------------------------------------ a model trained on RAS scans
NAMES = ("left", "middle", "right")     # where a bright slab lies along the R-L axis (RAS axis 0)
READING = preprocessing_of("zscore", (8, 8, 8), "RAS", (2.0, 1.0, 1.0))


def slab_scan(rng, label):
    """(12, 8, 9) voxels of 1.5 x 1 x 1 mm in RAS order, a slab in the label's third."""
    x = rng.normal(size=(12, 8, 9)).astype(np.float32)
    x[[1, 5, 9][label]:[1, 5, 9][label] + 2] += 4.0
    return x


@pytest.fixture(scope="module")
def slabs(tmp_path_factory):
    root = tmp_path_factory.mktemp("slabs")
    rng = np.random.default_rng(7)
    tables = {}
    for split, n in (("train", 36), ("ras", 6), ("lps", 6)):
        rows = ["path,label"]
        for i in range(n):
            label = i % 3
            data = slab_scan(rng, label) if split != "lps" else None
            if split == "lps":      # the RAS test scans, stored in LPS order
                data = nib.load(os.path.join(root, f"ras{i}.nii.gz")).get_fdata(dtype=np.float32)
                path = write(root / f"lps{i}.nii.gz", *as_lps(data, RAS_AFFINE))
            else:
                path = write(root / f"{split}{i}.nii.gz", data, RAS_AFFINE)
            rows.append(f"{os.path.basename(path)},{NAMES[label]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        tables[split] = os.fspath(root / f"{split}.csv")
    train = nifti_dataset(tables["train"], batch_size=12, training=True, repeat=True, target_shape=(8, 8, 8),
                          orientation="RAS", spacing=(2, 1, 1), seed=0)
    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(8, 8, 8, 1)))
    trainer = Trainer(model, train, lr=0.05, verbose=False)
    trainer.fit(30, progress=False)
    return {"root": root, "tables": tables, "ckpt": trainer.save(os.fspath(root / "wrn.h5")),
            "labels": [i % 3 for i in range(6)]}


def test_a_model_trained_on_ras_scans_predicts_their_lps_copies_alike(slabs):
    predictor = Predictor(slabs["ckpt"])
    assert predictor.preprocessing == READING
    ras = predict(predictor, slabs["tables"]["ras"])
    lps = predict(predictor, slabs["tables"]["lps"])
    assert ras["class"].tolist() == slabs["labels"], "the model should have learnt the slabs"
    assert lps["class"].tolist() == ras["class"].tolist()
    np.testing.assert_allclose(lps["probabilities"], ras["probabilities"], atol=1e-6)
    assert lps["reading"]["preprocessing"] == READING
    # without the orientation step the LPS copies are mirrored: left and right swap
    as_stored_reading = {k: v for k, v in READING.items() if k != "orientation"}
    mirrored = NiftiVolumes.from_reading(slabs["tables"]["lps"], as_stored_reading)[:]
    wrong = predict(predictor, mirrored, preprocessed=True)["class"]
    assert wrong.tolist() == [2 - c for c in slabs["labels"]]


def test_the_saved_model_says_it_expects_reoriented_resampled_volumes(slabs, tmp_path):
    import tensorflow as tf

    from wrn3d_tl.export import export_saved_model

    path = export_saved_model(slabs["ckpt"], os.fspath(tmp_path / "served"))
    meta = json.loads(tf.saved_model.load(path).metadata().numpy())
    assert meta["preprocessing"] == READING
    assert meta["input_expects"] == (
        "volumes (NDHWC) read from scans with axes reoriented to RAS (nibabel axis codes) and voxels resampled "
        "to 2x1x1 mm, e.g. by wrn3d_tl.data.read_scan(path, orientation='RAS', spacing=(2.0, 1.0, 1.0)); the "
        "graph applies the intensity step and crop/pad only")
    # what it says works: read_scan's voxels served give predict's probabilities on the files
    voxels = np.stack([read_scan(os.path.join(slabs["root"], f"lps{i}.nii.gz"), orientation="RAS",
                                 spacing=(2.0, 1.0, 1.0))[0] for i in range(6)])
    served = tf.saved_model.load(path).signatures["serving_default"](volumes=tf.constant(voxels))
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               predict(slabs["ckpt"], slabs["tables"]["lps"])["probabilities"], atol=1e-5)


def test_cam_maps_go_back_onto_the_scans_grid(slabs, tmp_path):
    from wrn3d_tl.explain import grad_cam, write_cam_montages

    volumes = NiftiVolumes.from_reading(slabs["tables"]["lps"], READING)
    out = tmp_path / "maps"
    paths = write_cam_montages(slabs["ckpt"], volumes, tmp_path / "png", nifti_out=out, indices=[0, 2])
    maps = sorted(p for p in paths if p.endswith(".nii.gz"))
    assert [os.path.basename(p) for p in maps] == ["0_0_lps0.nii.gz", "2_2_lps2.nii.gz"]
    cams = grad_cam(slabs["ckpt"], np.stack([volumes[0], volumes[2]]), preprocessed=True)
    for i, (path, cam) in enumerate(zip(maps, cams)):
        scan = volumes.info.paths[2 * i]
        img, source = nib.load(path), nib.load(scan)
        assert img.shape == source.shape and np.allclose(img.affine, source.affine)
        assert img.get_data_dtype() == np.float32
        _, _, grid, grid_affine = scan_grids(scan, READING)
        assert cam.max() > 0 and tuple(grid) == cam.shape
        hot_grid = grid_affine @ np.append(np.unravel_index(np.argmax(cam), cam.shape), 1.0)
        values = np.asarray(img.dataobj)
        hot_scan = img.affine @ np.append(np.unravel_index(np.argmax(values), values.shape), 1.0)
        coarser = max(voxel_sizes(grid_affine).max(), voxel_sizes(img.affine).max())
        assert np.linalg.norm(hot_grid[:3] - hot_scan[:3]) <= coarser, (hot_grid, hot_scan)
        assert 0.99 * cam.max() <= values.max() <= cam.max() + 1e-6


def test_to_scan_grid_puts_a_peak_on_its_world_point():
    """A single hot voxel of a 2 mm RAS grid lands, on a 1 mm LPS grid of the same field,
    on the scan voxel at the same world point."""
    grid_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cam = np.zeros((6, 6, 6), np.float32)
    cam[4, 1, 3] = 1.0
    scan_affine = np.array([[-1.0, 0, 0, 11.0], [0, -1.0, 0, 11.0], [0, 0, 1.0, 0.0], [0, 0, 0, 1]])
    out = to_scan_grid(cam, grid_affine, (12, 12, 12), scan_affine)
    hot = np.unravel_index(np.argmax(out), out.shape)
    np.testing.assert_allclose((scan_affine @ np.append(hot, 1.0))[:3], [8.0, 2.0, 6.0])
    assert out.max() == pytest.approx(1.0) and out.shape == (12, 12, 12)


def test_explain_command_writes_maps_and_refuses_arrays(slabs, tmp_path, capsys):
    from wrn3d_tl.commands.explain import main

    out = tmp_path / "maps"
    assert main(["--checkpoint", slabs["ckpt"], "--nifti", slabs["tables"]["lps"], "--out", os.fspath(tmp_path / "p"),
                 "--indices", "1", "--nifti-out", os.fspath(out)]) == 0
    assert os.listdir(out) == ["1_1_lps1.nii.gz"]
    assert "1 montage(s)" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8, 8, 1), np.float32))
    assert main(["--checkpoint", slabs["ckpt"], "--npy", os.fspath(tmp_path / "x.npy"), "--out",
                 os.fspath(tmp_path / "q"), "--nifti-out", os.fspath(out)]) == 2
    assert "--nifti-out" in capsys.readouterr().err


def test_prepare_reorients_and_resamples_once(slabs, tmp_path):
    from wrn3d_tl.commands.prepare import main

    out = os.fspath(tmp_path / "lps.h5")
    assert main([slabs["tables"]["lps"], "--out", out, "--orientation", "RAS", "--spacing", "2,1,1",
                 "--target-shape", "8,8,8"]) == 0
    with h5py.File(out, "r") as f:
        stored = f["volumes"][:]
        assert json.loads(f["volumes"].attrs["preprocessing"]) == READING
    np.testing.assert_array_equal(stored, NiftiVolumes.from_reading(slabs["tables"]["ras"], READING)[:])
    assert hdf5_dataset(out, batch_size=2, normalization=None).wrn3d_preprocessing == READING


@pytest.mark.parametrize("argv, words", [
    (["--orientation", "RAR"], "--orientation: expected three axis codes"),
    (["--spacing", "1,0,1"], "--spacing: expected voxel sizes in mm"),
    (["--data", "synthetic", "--spacing", "1"], "--spacing: reads scans"),
    (["--data", "synthetic", "--orientation", "RAS"], "--orientation: reads scans"),
])
def test_train_command_reading_flags_are_checked(argv, words, capsys):
    from wrn3d_tl.commands.train import main

    assert main((["--data", "synthetic"] if "--data" not in argv else []) + argv) == 2
    assert words in capsys.readouterr().err


def test_maps_of_scans_read_otherwise_than_the_model_learnt_are_refused(slabs, tmp_path):
    from wrn3d_tl.explain import grad_cam, write_cam_montages

    as_stored = NiftiVolumes(slabs["tables"]["lps"], target_shape=(8, 8, 8), spacing=(2.0, 1.0, 1.0))
    for call in (lambda: grad_cam(slabs["ckpt"], as_stored),
                 lambda: write_cam_montages(slabs["ckpt"], as_stored, tmp_path, nifti_out=tmp_path / "maps")):
        with pytest.raises(ValueError, match=r"lps.csv'.*read files with \{'orientation': None, 'spacing': "
                                             r"\[2\.0, 1\.0, 1\.0\]\}, but the model was trained on scans read with "
                                             r"\{'orientation': 'RAS'"):
            call()
    assert not os.path.exists(tmp_path / "maps")


def test_a_map_keeps_the_scans_header_codes(slabs, tmp_path):
    from wrn3d_tl.explain import save_cam_nifti

    data, affine = as_lps(slab_scan(np.random.default_rng(1), 0), RAS_AFFINE)
    img = nib.Nifti1Image(np.round(data * 100).astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=4)
    img.header.set_slope_inter(0.01, 0)
    scan = tmp_path / "coded.nii.gz"
    nib.save(img, scan)
    cam = np.zeros((8, 8, 8), np.float32)
    cam[1, 4, 4] = 1.0
    out = nib.load(save_cam_nifti(cam, scan, READING, tmp_path / "map.nii.gz"))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 4)
    assert out.get_data_dtype() == np.float32 and out.header.get_slope_inter() == (None, None)
    assert out.shape == (12, 8, 9) and np.allclose(out.affine, affine)
    with pytest.raises(ValueError, match=r"cam: shape \(8, 8\) is not the network grid \(8, 8, 8\)"):
        save_cam_nifti(cam[0], scan, READING, tmp_path / "bad.nii.gz")


def test_a_degenerate_affine_is_an_error_naming_the_file(tmp_path, rng):
    header = nib.Nifti1Header()       # nibabel will not make a qform of it: an sform-only file
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = RAS_AFFINE[0], RAS_AFFINE[1], [0, 0, 0, -3.5]
    path = os.fspath(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(anatomy(rng), None, header=header), path)
    assert read_nifti(path, intensity=None).shape == (12, 8, 9, 1)       # as stored: the affine is not used
    for kwargs in ({"orientation": "RAS"}, {"spacing": (1, 1, 1)}):
        with pytest.raises(ValueError, match=r"flat.nii.gz' has a degenerate affine"):
            read_nifti(path, **kwargs)
        with pytest.raises(ValueError, match=r"flat.nii.gz' has a degenerate affine"):
            NiftiVolumes(path, **kwargs)


def _sform_only(path, srows, data):
    """A NIfTI file whose only placement is an sform of these rows (nibabel will not build a
    qform of a degenerate affine)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = srows
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return os.fspath(path)


def test_files_that_cannot_serve_the_reading_are_all_listed_before_training(tmp_path, rng):
    good = write(tmp_path / "good.nii.gz", anatomy(rng), RAS_AFFINE)
    nan = _sform_only(tmp_path / "nan.nii.gz", (RAS_AFFINE[0], [0, np.nan, 0, 4.0], RAS_AFFINE[2]), anatomy(rng))
    unplaced = nib.Nifti1Image(anatomy(rng), None)         # no qform, no sform: nibabel guesses the axes
    unplaced.header["qform_code"] = unplaced.header["sform_code"] = 0
    nib.save(unplaced, tmp_path / "unplaced.nii.gz")
    table = tmp_path / "t.csv"
    table.write_text("path,label\ngood.nii.gz,0\nnan.nii.gz,1\nunplaced.nii.gz,0\nmissing.nii.gz,1\n")
    with pytest.raises(ValueError) as caught:
        nifti_info(table, check=True, orientation="RAS")
    message = str(caught.value)
    assert "3 of 4 files cannot be used" in message
    assert "line 3 ('nan.nii.gz'): " in message and "has a degenerate affine (not finite)" in message
    assert "line 4 ('unplaced.nii.gz'): " in message and "does not say where its voxels are" in message
    assert "missing.nii.gz' does not exist" in message and ";\n  " in message
    # as stored, or resampled only (the voxel sizes are in the header), the unplaced file is fine
    assert read_nifti(tmp_path / "unplaced.nii.gz", intensity=None).shape == (12, 8, 9, 1)
    assert read_scan(tmp_path / "unplaced.nii.gz", spacing=(2, 2, 2))[0].shape == (6, 4, 5, 1)   # 9 / 2 rounds up
    assert read_scan(good, orientation="RAS")[0].shape == (12, 8, 9, 1)


def test_predict_skips_files_the_models_reading_cannot_place_and_explain_names_them(slabs, tmp_path, rng, capsys):
    from wrn3d_tl.commands.predict import main as predict_main
    from wrn3d_tl.explain import save_cam_nifti

    folder = tmp_path / "new"
    folder.mkdir()
    write(folder / "a.nii.gz", slab_scan(rng, 0), RAS_AFFINE)
    _sform_only(folder / "b.nii.gz", (RAS_AFFINE[0], RAS_AFFINE[1], [0, 0, 0, -3.5]), slab_scan(rng, 1))
    out = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", slabs["ckpt"], "--nifti", os.fspath(folder), "--out", os.fspath(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 files cannot be used: " in err and "b.nii.gz' has a degenerate affine" in err and "--skip-bad" in err
    assert predict_main(["--checkpoint", slabs["ckpt"], "--nifti", os.fspath(folder), "--out", os.fspath(out),
                         "--skip-bad"]) == 0
    assert len(out.read_text().splitlines()) == 2           # header + a.nii.gz
    skipped = tmp_path / "p_skipped.csv"
    assert skipped.exists() and "b.nii.gz" in skipped.read_text() and "degenerate affine" in skipped.read_text()
    # a map cannot be overlaid on a scan whose affine places nothing, whatever the reading
    with pytest.raises(ValueError, match=r"b.nii.gz' has a degenerate affine .*so it cannot be overlaid"):
        save_cam_nifti(np.zeros((8, 8, 8), np.float32), folder / "b.nii.gz", preprocessing_of("zscore", (8, 8, 8)),
                       tmp_path / "map.nii.gz")


def test_train_command_wants_val_and_test_of_the_datas_kind(tmp_path, capsys):
    from wrn3d_tl.commands.train import main

    (tmp_path / "t.csv").write_text("path,label\n")
    (tmp_path / "v.h5").write_bytes(b"")
    assert main(["--data", os.fspath(tmp_path / "t.csv"), "--val", os.fspath(tmp_path / "v.h5")]) == 2
    assert "v.h5: an HDF5 file, but --data" in capsys.readouterr().err
