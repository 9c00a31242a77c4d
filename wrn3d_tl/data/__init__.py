"""Data loading and ``tf.data`` input pipelines for 3D Wide ResNets.

Layouts: images ``NHWC``, volumes ``NDHWC`` (batch, depth, height, width,
channels). This package imports only TensorFlow, NumPy, h5py, nibabel (NIfTI
files), SciPy (resampling), pydicom (DICOM series, an optional extra), each imported when
used, and the standard library.

Public API:
  load_cifar, synthetic_cifar                  -- CIFAR-10/100 as uint8 NHWC
  tile_to_volume                               -- 2D images -> 3D volumes
  Normalization, compute_normalization         -- per-channel mean/std
  as_normalization                             -- validate stats from anywhere
  augment_image, augment_volume                -- WRN crop + flip (stateless)
  make_dataset                                 -- in-memory tf.data pipeline
  normalization_of                             -- the stats a pipeline applies
  data_errors                                  -- a reader's error in tf.data as its one line
  starting_at, input_share, Share              -- resume position; one worker's share
  write_hdf5_volumes, hdf5_info, hdf5_dataset  -- HDF5 volume files
  Augment3D                                    -- flips / rotations / crops / jitter
  nifti_info, nifti_dataset, nifti_to_hdf5     -- NIfTI scans listed in a CSV or folders
  read_nifti, NiftiVolumes                     -- the same reading, for prediction
  read_scan                                    -- a file's voxels and affine, reoriented/resampled
  load_medmnist3d, MEDMNIST3D                  -- MedMNIST-3D's official .npz files
  synthetic_blobs, orthant_of                  -- class = where a blob sits (explanations)
  stratified_split, balanced_class_weights     -- a seeded per-class hold-out; loss weights
"""

from .augment import Augment3D
from .blobs import orthant_of, synthetic_blobs
from .cifar import load_cifar, synthetic_cifar
from .hdf5 import HDF5Info, hdf5_dataset, hdf5_info, write_hdf5_volumes
from .medmnist import MEDMNIST3D, load_medmnist3d
from .nifti import NiftiInfo, NiftiVolumes, nifti_dataset, nifti_info, nifti_to_hdf5, read_nifti, read_scan
from .pipeline import data_errors, make_dataset, normalization_of
from .shards import Share, input_share, starting_at
from .splits import balanced_class_weights, class_counts, stratified_split
from .transforms import (TILE_MODES, Normalization, as_normalization, augment_image, same_normalization,
                         augment_volume, compute_normalization, tile_to_volume)

__all__ = [
    "load_cifar",
    "synthetic_cifar",
    "tile_to_volume",
    "TILE_MODES",
    "Normalization",
    "compute_normalization",
    "as_normalization",
    "same_normalization",
    "augment_image",
    "augment_volume",
    "make_dataset",
    "normalization_of",
    "data_errors",
    "starting_at",
    "input_share",
    "Share",
    "write_hdf5_volumes",
    "hdf5_info",
    "hdf5_dataset",
    "HDF5Info",
    "Augment3D",
    "nifti_info",
    "nifti_dataset",
    "nifti_to_hdf5",
    "read_nifti",
    "read_scan",
    "NiftiInfo",
    "NiftiVolumes",
    "load_medmnist3d",
    "MEDMNIST3D",
    "synthetic_blobs",
    "orthant_of",
    "stratified_split",
    "class_counts",
    "balanced_class_weights",
]
