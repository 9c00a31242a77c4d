"""wrn3d_tl: 3D (and 2D) Wide Residual Networks on TensorFlow 2 + TensorLayer 2.

Modules, in data-flow order: ``data`` (CIFAR, tiling, augmentation, HDF5),
``layers`` and ``model`` (``WRNConfig``, ``build_wrn``), ``train`` (``Trainer``).

Importing the package before TensorFlow turns TensorFlow's oneDNN kernels on where it
leaves them off (AVX2-only CPUs; see ``wrn3d_tl.cpu``); ``TF_ENABLE_ONEDNN_OPTS=0`` is
respected.
"""

from wrn3d_tl import cpu as _cpu

__version__ = "0.1.0"

_cpu.enable_onednn()
_cpu.warn_if_onednn_left_off()
