"""wrn3d_tl: 3D (and 2D) Wide Residual Networks on TensorFlow 2 + TensorLayer 2.

The public API, loaded on first use (``import wrn3d_tl`` itself does not import
TensorFlow, so the console scripts' ``--help`` stays fast)::

    from wrn3d_tl import create_wrn, Trainer, Predictor, nifti_dataset
    model = create_wrn("WRN-16-4", input_shape=(32, 64, 64, 1), num_classes=3)

Everything else lives in the modules, in floors (README, "Reference"): ``config``, ``data``,
``model``/``loading``, ``train``/``experiment``, ``predict``/``explain``/``export``/``report``,
``commands``.

Importing the package before TensorFlow turns TensorFlow's oneDNN kernels on where it
leaves them off (AVX2-only CPUs; see ``wrn3d_tl.cpu``); ``TF_ENABLE_ONEDNN_OPTS=0`` is
respected.
"""

import importlib

from wrn3d_tl import cpu as _cpu

__version__ = "0.1.0"

_cpu.enable_onednn()
_cpu.warn_if_onednn_left_off()

# public name -> the module that defines it
_PUBLIC = {
    "WRNConfig": "config",
    "build_wrn": "model", "count_params": "model", "summary": "model",
    "create_wrn": "loading", "load_model": "loading",
    "Normalization": "data", "compute_normalization": "data", "make_dataset": "data", "hdf5_dataset": "data",
    "nifti_dataset": "data", "nifti_to_hdf5": "data", "load_cifar": "data", "load_medmnist3d": "data",
    "Augment3D": "data",
    "classification_metrics": "metrics", "evaluation_report": "evaluation",
    "Trainer": "train", "CheckpointManager": "checkpoint",
    "Predictor": "predict", "grad_cam": "explain", "export_saved_model": "export",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'wrn3d_tl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"wrn3d_tl.{_PUBLIC[name]}"), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
