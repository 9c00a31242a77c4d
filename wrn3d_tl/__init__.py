"""wrn3d_tl: 3D (and 2D) Wide Residual Networks on TensorFlow 2 + TensorLayer 2.

Modules, in data-flow order: ``data`` (CIFAR, tiling, augmentation, HDF5),
``layers`` and ``model`` (``WRNConfig``, ``build_wrn``), ``train`` (``Trainer``).
"""

__version__ = "0.1.0"
