from setuptools import find_packages, setup

# Tested on TensorFlow 2.21 / Keras 3.15; TensorLayer 2.2.5 is unmaintained, so the
# TensorFlow range stays closed until a newer release has been tried.
TF = "tensorflow>=2.21,<2.22"

setup(
    name="wrn3d_tl",
    version="0.1.0",
    description="3D (and 2D) Wide Residual Networks on TensorFlow 2 + TensorLayer 2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["wrn3d_tl", "wrn3d_tl.*"]),
    python_requires=">=3.10,<3.14",
    install_requires=[
        TF,
        "tensorlayer==2.2.5",
        "numpy>=1.26,<3",
        "h5py>=3.10,<4",
        "nibabel>=5.0",        # NIfTI scans (wrn3d_tl.data.nifti)
        "scikit-learn>=1.3",   # ROC AUC in MedMNIST's definition (wrn3d_tl.metrics)
        "scipy>=1.10",         # resampling scans to a voxel spacing (wrn3d_tl.data.geometry)
        # imported by `import tensorlayer` (tensorlayer.app) but not declared by it
        "opencv-python-headless>=4.8",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "tensorboard>=2.20",  # tf.summary needs it; TensorFlow 2.21 no longer pulls it in
    ],
    extras_require={
        "gpu": [TF.replace("tensorflow", "tensorflow[and-cuda]")],
        "test": ["pytest>=7", "pytest-xdist>=3.5", "psutil>=5.9", "hypothesis>=6.80", "pydicom>=3.0"],
        # DICOM series folders (wrn3d_tl.data.dicom); compressed ones also need a decoder it names
        "dicom": ["pydicom>=3.0"],
        # only wrn3d_tl.convert reads .pt files with it; nothing else imports torch
        "torch": ["torch>=2.1"],
    },
    entry_points={"console_scripts": ["wrn3d-predict = wrn3d_tl.commands.predict:main",
                                      "wrn3d-export = wrn3d_tl.commands.export:main",
                                      "wrn3d-convert = wrn3d_tl.commands.convert:main",
                                      "wrn3d-explain = wrn3d_tl.commands.explain:main",
                                      "wrn3d-train = wrn3d_tl.commands.train:main",
                                      "wrn3d-prepare = wrn3d_tl.commands.prepare:main"]},
)
