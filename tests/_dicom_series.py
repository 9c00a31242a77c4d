"""A DICOM series written with pydicom from a known volume (shared by the DICOM and docs tests):
an oblique, non-axial orientation, shuffled file order, rescale slope and intercept."""

import os

import numpy as np

SLOPE, INTERCEPT = 0.5, -1024.0
# An oblique sagittal-ish orientation with short exact decimals: rows run along -y tilted by a
# 3-4-5 rotation, columns along -z tilted the other way; rows 0.7 mm apart, columns 0.8 mm, slices 2.5 mm.
ROW = np.array([0.0, 0.6, -0.8])            # LPS direction cosines: i (column index) grows along it
COL = np.array([0.0, 0.8, 0.6])             # j (row index) grows along it
SPACING = (0.7, 0.8, 2.5)                   # (between rows, between columns, between slices): unequal
ORIGIN = np.array([-30.5, 12.25, 40.0])     # LPS position of the first slice's first pixel


def volume(shape=(7, 6, 5), seed=0):
    """Known HU-like voxels (i, j, k) exactly representable through slope and intercept."""
    stored = np.random.default_rng(seed).integers(-500, 3000, size=shape)
    return (stored * SLOPE + INTERCEPT).astype(np.float32)


def lps_affine(shape):
    normal = np.cross(ROW, COL)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = ROW * SPACING[1], COL * SPACING[0]
    affine[:3, 2], affine[:3, 3] = normal * SPACING[2], ORIGIN
    return affine


def ras_affine(shape):
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(shape)


def write_series(folder, data, *, uid=None, shuffle=True, edit=None, syntax=None, names=None):
    """One file per slice of ``data`` (i, j, k), named ``IM0000``... in a shuffled order
    (``names(k)`` to choose), uncompressed unless ``syntax`` (a transfer syntax UID) says
    otherwise; ``edit(k, ds)`` may spoil a slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    syntax = syntax or ExplicitVRLittleEndian
    os.makedirs(folder, exist_ok=True)
    uid = uid or generate_uid()
    affine = lps_affine(data.shape)
    order = np.random.default_rng(1).permutation(data.shape[2]) if shuffle else range(data.shape[2])
    for n, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = uid, "CT"
        ds.ImageOrientationPatient = [f"{v:g}" for v in np.concatenate([ROW, COL])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (affine @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [f"{SPACING[0]:g}", f"{SPACING[1]:g}"]
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{SLOPE:g}", f"{INTERCEPT:g}"
        stored = np.round((data[:, :, k].T - INTERCEPT) / SLOPE).astype(np.int16)    # (rows, columns)
        ds.PixelData = stored.tobytes()
        if syntax.is_compressed:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
        if edit is not None:
            edit(k, ds)
        name = names(k) if names else f"IM{n:04d}"        # file names in shuffled order
        ds.save_as(os.path.join(folder, name), enforce_file_format=True)
    return os.fspath(folder)
