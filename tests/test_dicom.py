"""DICOM series folders (issue 27): a series written here with pydicom from a known volume
(shuffled file order, an oblique non-axial orientation, rescale slope and intercept) reads
as that volume with the affine of its NIfTI, through tables and class folders too; every
refused case is refused naming the folder."""

import os
import sys

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")       # in the [test] extra; a clear skip elsewhere

from pydicom.uid import JPEGLSLossless  # noqa: E402

from _dicom_series import ras_affine, volume, write_series  # noqa: E402
from wrn3d_tl.data.dicom import series_files  # noqa: E402
from wrn3d_tl.data import nifti_dataset, nifti_info  # noqa: E402
from wrn3d_tl.data.dicom import read_series  # noqa: E402
from wrn3d_tl.data.nifti import NiftiVolumes, read_nifti, read_scan  # noqa: E402

def test_a_series_reads_as_its_volume_with_the_affine_of_its_nifti(tmp_path):
    data = volume()
    folder = write_series(tmp_path / "series", data)
    nifti = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(data, ras_affine(data.shape)), nifti)
    voxels, affine, shape = read_series(folder)
    np.testing.assert_array_equal(voxels, data)
    assert shape == data.shape and voxels.dtype == np.float32
    np.testing.assert_allclose(affine, nib.load(nifti).affine, atol=1e-4)
    assert nib.aff2axcodes(affine)[2] in "LR"          # sagittal slices: not axial
    # the reading is the same for both files, orientation and spacing included
    for kwargs in ({}, {"orientation": "RAS", "spacing": (1.0, 1.0, 1.0)}):
        a, affine_a = read_scan(folder, **kwargs)
        b, affine_b = read_scan(nifti, **kwargs)
        np.testing.assert_allclose(a, b, atol=1e-3)
        np.testing.assert_allclose(affine_a, affine_b, atol=1e-4)
    # one voxel by hand from the tags of its slice file (DICOM PS3.3 C.7.6.2.1.1): the pixel in
    # row j, column i lies at IPP + i * column spacing * row cosines + j * row spacing * column cosines
    files = [pydicom.dcmread(p) for p in series_files(folder)]
    iop = np.asarray(files[0].ImageOrientationPatient, float)
    k, i, j = 3, 4, 2               # the 4th slice along the normal; column 4, row 2
    ds = sorted(files, key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float),
                                                  np.cross(iop[:3], iop[3:]))))[k]
    ipp = np.asarray(ds.ImagePositionPatient, float)
    lps = ipp + i * float(ds.PixelSpacing[1]) * iop[:3] + j * float(ds.PixelSpacing[0]) * iop[3:]
    np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], lps * [-1, -1, 1], atol=1e-4)
    assert voxels[i, j, k] == ds.pixel_array[j, i] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # the header pass gives the shape and affine without pixels
    none, header_affine, header_shape = read_series(folder, pixels=False)
    assert none is None and header_shape == data.shape and np.allclose(header_affine, affine)


def test_series_folders_in_tables_and_class_folders(tmp_path):
    a, b = volume(seed=1), volume(seed=2)
    root = tmp_path / "classes"
    write_series(root / "benign" / "patient1", a)
    write_series(root / "malignant" / "patient2", b)
    info = nifti_info(root)
    assert info.class_names == ("benign", "malignant") and info.volume_shape == a.shape + (1,)
    x, y = next(iter(nifti_dataset(root, batch_size=2, intensity=None)))
    np.testing.assert_array_equal(x.numpy()[..., 0], np.stack([a, b]))
    assert y.numpy().tolist() == [0, 1]
    table = tmp_path / "t.csv"
    table.write_text(f"path,label\n{root / 'malignant' / 'patient2'},1\n")
    np.testing.assert_array_equal(NiftiVolumes(table, labels=True, intensity=None)[0][..., 0], b)
    # one series folder given to predict's reader on its own
    one = NiftiVolumes(os.fspath(root / "benign" / "patient1"), intensity=None)
    assert len(one) == 1
    np.testing.assert_array_equal(one[0][..., 0], a)
    # a folder of series folders, unlabelled (wrn3d-predict --nifti): each series is a scan
    unlabelled = NiftiVolumes(os.fspath(root / "benign"), intensity=None)
    assert unlabelled.info.paths == (os.fspath(root / "benign" / "patient1"),)
    # a sub-folder of NIfTI files in a class folder (masks, say) is not a series: ignored as before
    (root / "benign" / "masks").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((7, 6, 5), np.float32), np.eye(4)), root / "benign" / "masks" / "m.nii.gz")
    assert nifti_info(root).paths == info.paths


def test_several_series_in_one_folder_are_named(tmp_path):
    folder = write_series(tmp_path / "mixed", volume(), uid="1.2.3.4")
    write_series(folder, volume(seed=3), uid="1.2.3.5", names=lambda k: f"B{k}")
    with pytest.raises(ValueError, match=r"holds 2 DICOM series: 1\.2\.3\.4 \(5 files\); 1\.2\.3\.5 \(5 files\)"
                                         r".*folder of their own"):
        read_nifti(folder)


@pytest.mark.parametrize("tag, value, words", [
    ("PixelSpacing", ["0.8", "0.75"], "inconsistent PixelSpacing"),
    ("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"], "inconsistent ImageOrientationPatient"),
])
def test_inconsistent_slices_are_refused(tmp_path, tag, value, words):
    def spoil(k, ds):
        if k == 3:
            setattr(ds, tag, value)

    folder = write_series(tmp_path / "s", volume(), edit=spoil)
    with pytest.raises(ValueError, match=words + r".*IM\d{4}"):
        read_nifti(folder)


def _set(tag, value, slice_index=3):
    def edit(k, ds):
        if k == slice_index:
            if value is None:
                delattr(ds, tag)
            else:
                setattr(ds, tag, value)
    return edit


@pytest.mark.parametrize("edit, words", [
    (_set("ImagePositionPatient", None), r"IM\d{4}' has no ImagePositionPatient: not a slice of a volume"),
    (_set("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"]), "malformed geometry: ImageOrientationPatient"),
    (_set("PixelSpacing", ["0.7"]), "malformed geometry"),
    (_set("NumberOfFrames", 2), "is a multi-frame or colour image"),
])
def test_slices_without_usable_geometry_are_refused_naming_the_file(tmp_path, edit, words):
    folder = write_series(tmp_path / "s", volume(), edit=edit)
    with pytest.raises(ValueError, match=words):
        read_nifti(folder)


def test_duplicate_positions_and_slice_sizes_are_refused(tmp_path):
    folder = write_series(tmp_path / "dup", volume(), shuffle=False)
    write_series(folder, volume(shape=(7, 6, 1), seed=4), shuffle=False, names=lambda k: "ZZ",
                 uid=pydicom.dcmread(os.path.join(folder, "IM0000")).SeriesInstanceUID)
    with pytest.raises(ValueError, match=r"two slices at one position \(.*IM0000.* and .*ZZ.*\).*one volume per folder"):
        read_nifti(folder)
    other = write_series(tmp_path / "size", volume(shape=(7, 6, 4)), shuffle=False)
    write_series(other, volume(shape=(8, 6, 5)), uid=pydicom.dcmread(os.path.join(other, "IM0000")).SeriesInstanceUID,
                 names=lambda k: f"B{k}", edit=lambda k, ds: None, shuffle=False)
    with pytest.raises(ValueError, match=r"has slices of 6x8 pixels in .*B0' and 6x7 in .*IM0000'"):
        read_nifti(other)


def test_missing_slices_are_refused(tmp_path):
    folder = write_series(tmp_path / "s", volume(shape=(7, 6, 8)), shuffle=False)
    os.remove(os.path.join(folder, "IM0004"))
    with pytest.raises(ValueError, match=r"is missing slices: a 5 mm gap between .*IM0003.* and .*IM0005.*median "
                                         r"step of 2\.5 mm"):
        read_nifti(folder)
    folder = write_series(tmp_path / "u", volume(), shuffle=False,
                          edit=lambda k, ds: setattr(ds, "ImagePositionPatient",
                                                     [str(float(v) + (0.4 if k == 4 else 0)) for v in
                                                      ds.ImagePositionPatient]))
    with pytest.raises(ValueError, match="uneven slice steps"):
        read_nifti(folder)


@pytest.mark.skipif(pydicom.pixels.get_decoder(JPEGLSLossless).is_available, reason="a JPEG-LS decoder is installed")
def test_compressed_series_without_a_decoder_names_what_to_install(tmp_path):
    folder = write_series(tmp_path / "s", volume(), syntax=JPEGLSLossless)
    with pytest.raises(ValueError, match=r"is compressed \(JPEG-LS Lossless Image Compression\) and no decoder for "
                                         r"it is installed; install one of: .*pylibjpeg-libjpeg"):
        read_nifti(folder)
    # the header pass does not decode: shapes are known, the check pass lists the file
    table = tmp_path / "t.csv"
    table.write_text(f"path,label\n{folder},0\n")
    assert nifti_info(table).volume_shape == (7, 6, 5, 1)
    with pytest.raises(ValueError, match="(?s)1 of 1 files cannot be used:.*no decoder"):
        nifti_info(table, check=True)


def test_without_pydicom_a_series_asks_for_the_extra(tmp_path, monkeypatch):
    folder = write_series(tmp_path / "s", volume())
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ValueError, match=r"read as one DICOM series, which needs pydicom: pip install "
                                         r"'wrn3d_tl\[dicom\]'"):
        read_nifti(folder)


def test_not_dicom_files_and_one_slice_are_refused(tmp_path):
    folder = write_series(tmp_path / "s", volume())
    (tmp_path / "s" / "notes.txt").write_text("scanned on Tuesday")
    with pytest.raises(ValueError, match="notes.txt' in the DICOM series folder is not a DICOM file"):
        read_nifti(folder)
    one = write_series(tmp_path / "one", volume(shape=(7, 6, 1)))
    with pytest.raises(ValueError, match="holds one slice"):
        read_nifti(one)
