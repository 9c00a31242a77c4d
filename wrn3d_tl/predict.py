"""Class predictions from a checkpoint, in batches: ``Predictor`` and ``predict()``; the
``wrn3d-predict`` command (``wrn3d_tl.commands.predict``) runs them from the shell.

    from wrn3d_tl.predict import predict
    out = predict("runs/ckpt-00010000.h5", volumes)          # raw NDHWC numpy array
    out = predict("runs/last.h5", "test.h5", key="volumes")  # or an HDF5 file (or a .npy)
    out["class"], out["probability"], out["top_k_classes"], out["top_k_probabilities"]

    wrn3d-predict --checkpoint c.h5 --hdf5 data.h5 [--key volumes] --out preds.csv [--batch-size N]
    wrn3d-predict --checkpoint c.h5 --npy data.npy --out preds.csv
    wrn3d-predict --checkpoint c.h5 --nifti scans/ [--intensity zscore] [--target-shape D,H,W] --out preds.csv
    wrn3d-predict ... --cam-dir cams/      # also a Grad-CAM montage per volume (wrn3d_tl.explain)

Volumes are RAW (the units the training data had before normalisation, e.g. 0..255),
shaped (N,) + the checkpoint's ``input_shape``: NDHWC (batch, depth, height, width,
channels) for 3D models, NHWC for 2D ones. The checkpoint's normalisation
``(x - mean) / std`` is applied here, exactly as in training. Any real dtype is
accepted and converted to float32 batch by batch (float64 is rounded to float32; ints and
uints are converted exactly up to 2**24; bool, complex and non-numeric arrays are
refused). Inference mode: moving batch-norm statistics, no dropout.

NIfTI inputs (a ``.nii``/``.nii.gz`` file, a folder of them or a DICOM series folder, or a
CSV with a ``path`` column) are read exactly as ``wrn3d_tl.data.nifti_dataset`` read them
for training: the orientation and spacing the checkpoint stored from its training data
(``Trainer.preprocessing``), and its ``intensity`` and ``target_shape`` unless given; the
output gains a ``path`` per volume. Raw arrays carry no affine: they are taken as already
in the stored orientation and spacing.

Errors (wrong rank, spatial shape or channels, NaN/Inf, values so large that the logits
overflow, empty input, missing file or key, a file that is not a checkpoint) raise
``ValueError``/``FileNotFoundError`` naming the input;
``wrn3d_tl.checkpoint.CheckpointError`` (a ValueError) for checkpoints. The CLI
prints them as one line ``wrn3d-predict: error: ...`` and exits with status 2.
"""

import csv
import json
import os

import h5py
import numpy as np

from wrn3d_tl.files import written_atomically
from wrn3d_tl.validate import check_int

__all__ = ["Predictor", "as_predictor", "predict", "write_csv", "load_npy", "is_nifti_input", "FROM_CHECKPOINT"]

FROM_CHECKPOINT = "checkpoint"   # NIfTI reading: as the checkpoint's training data was read


def _one_line(exc):
    return " ".join(str(exc).split())


class Predictor:
    """A checkpoint's model and normalisation, loaded once for many ``predict`` calls.

    ``checkpoint``: a checkpoint path (verified: format, checksum, config), a
    ``wrn3d_tl.train.Trainer`` (its current weights and normalisation are used) or a bare
    ``build_wrn`` model (no normalisation: its inputs are taken as already normalised).
    ``precision``: "fp32" (default) or "bf16": the network computes in bfloat16 on a copy
    of the weights with bfloat16 convolution kernels (``wrn3d_tl.model.inference_copy``: a
    snapshot, taken here, of a trainer's or model's weights); normalisation, logits and
    probabilities stay float32. Faster on CPUs with AMX/AVX512_BF16; the README gives the
    measured speed-up and change in predictions.
    Attributes: ``config`` (WRNConfig), ``normalization`` (dict or None),
    ``preprocessing`` (the stored reading, ``wrn3d_tl.data.reading``, or None),
    ``class_names`` (tuple of str, or None), ``model``, ``precision``.
    """

    def __init__(self, checkpoint, precision="fp32"):
        import tensorflow as tf

        from wrn3d_tl.loading import resolve
        from wrn3d_tl.model import graph_function, inference_copy, inference_dtype

        dtype = inference_dtype(precision)
        (self.model, self.config, self.normalization, self.preprocessing, self.class_names,
         self.source) = resolve(checkpoint, "checkpoint")
        self.precision = precision
        if precision != "fp32":
            self.model = inference_copy(self.model, precision)
        mean, std = self.normalization_arrays()
        model = self.model
        spec = tf.TensorSpec((None,) + self.config.input_shape, tf.float32)

        @graph_function(input_signature=[spec])
        def infer(x):
            if mean is not None:
                x = (x - mean) / std
            logits = tf.cast(model(tf.cast(x, dtype), is_train=False), tf.float32)
            return logits, tf.nn.softmax(logits, axis=-1)

        self._infer = infer

    @property
    def inference_graph(self):
        """The traced inference function (a ``tf.types.experimental.ConcreteFunction``):
        float32 ``(N,) + input_shape`` raw-normalised volumes -> ``(logits, probabilities)``;
        its ops show the precision the network computes in."""
        return self._infer.get_concrete_function()

    def normalization_arrays(self):
        """``(mean, std)`` float32 ``(C,)`` arrays of the stored normalisation, or ``(None, None)``."""
        if self.normalization is None:
            return None, None
        return (np.asarray(self.normalization["mean"], np.float32),
                np.asarray(self.normalization["std"], np.float32))

    # ----------------------------------------------------------------- inputs
    def array_reading(self, volumes, preprocessed=False):
        """The reading (``wrn3d_tl.data.reading``) to apply to the array-like ``volumes``, or
        None: the checkpoint's stored one for raw arrays; None when ``preprocessed`` is True,
        when the model stored none, for ``NiftiVolumes`` (read with it already) and for an
        HDF5 dataset written by ``nifti_to_hdf5`` with the same reading (its
        ``preprocessing`` attribute; a different one is a ValueError)."""
        from wrn3d_tl.data.reading import check_preprocessing

        if not isinstance(preprocessed, bool):
            raise ValueError(f"preprocessed must be True or False, got {preprocessed!r}")
        if hasattr(volumes, "info") and self.preprocessing is not None:
            self._check_file_side(volumes)
        if preprocessed or self.preprocessing is None or hasattr(volumes, "info"):
            return None
        if isinstance(volumes, h5py.Dataset) and "preprocessing" in volumes.attrs:
            where = f"HDF5 dataset {volumes.name!r} of {volumes.file.filename!r}"
            stored = check_preprocessing(json.loads(volumes.attrs["preprocessing"]), f"{where}'s preprocessing")
            if stored != self.preprocessing:
                raise ValueError(f"{where} holds volumes read with {stored}, but the model's training data was read "
                                 f"with {self.preprocessing}; read them the same way")
            return None
        return self.preprocessing

    def _check_file_side(self, volumes):
        """NiftiVolumes must be read in the orientation and spacing the model learnt on:
        otherwise every answer (and every map) is of mirrored or stretched scans."""
        from wrn3d_tl.data.reading import FILE_SIDE

        given = {k: volumes.reading.get(k) for k in FILE_SIDE}
        stored = {k: self.preprocessing.get(k) for k in FILE_SIDE}
        if given != stored:
            raise ValueError(f"NIfTI table {volumes.info.table!r}: these NiftiVolumes read files with {given}, but the "
                             f"model was trained on scans read with {stored}; build them with "
                             "NiftiVolumes.from_reading(table, predictor.nifti_reading()), or pass the path")

    def check_volumes(self, volumes, what="volumes", reading=None):
        """Validate the shape and dtype of an array-like (numpy, memmap, h5py.Dataset)
        without reading it; raises ValueError naming ``what``. With a ``reading`` that
        crops/pads, any spatial shape is accepted."""
        shape = tuple(getattr(volumes, "shape", ()))
        dtype = np.dtype(getattr(volumes, "dtype", np.float32))
        want = self.config.input_shape
        layout = self.config.layout
        if dtype.kind not in "iuf":
            raise ValueError(f"{what}: volumes must be real numbers (float or int), got dtype {dtype}")
        if len(shape) != len(want) + 1:
            hint = " (a single volume? add a batch axis: x[None])" if len(shape) == len(want) else ""
            if len(shape) == len(want) and want[-1] == 1 and reading is not None:
                hint = " (scans as read, without a channel axis? add one: x[..., None])"
            raise ValueError(f"{what}: expected a {len(want) + 1}-D {layout} array of shape (N,) + {want}, "
                             f"got {len(shape)}-D shape {shape}{hint}")
        if shape[-1] != want[-1]:
            raise ValueError(f"{what}: volumes have {shape[-1]} channel(s) (last axis of shape {shape}) but the "
                             f"model expects {want[-1]} ({layout})")
        if shape[1:-1] != want[:-1] and (reading is None or reading["target_shape"] is None):
            raise ValueError(f"{what}: spatial shape {shape[1:-1]} (of shape {shape}) does not match the model's "
                             f"{want[:-1]} ({layout}, input_shape {want})")
        if shape[0] == 0:
            raise ValueError(f"{what}: no volumes (shape {shape})")
        return shape

    def batches(self, volumes, batch_size=32, what="volumes", reading=None):
        """Yield (start index, float32 batch) over an array-like, checking for NaN/Inf and
        applying ``reading`` (see ``array_reading``) to each raw volume."""
        from wrn3d_tl.data.reading import apply_reading

        n = self.check_volumes(volumes, what, reading)[0]
        batch_size = check_int(batch_size, "batch_size")
        for start in range(0, n, batch_size):
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range float64 -> inf, reported below
                x = np.asarray(volumes[start:start + batch_size]).astype(np.float32, copy=False)
            finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if not finite.all():
                i = start + int(np.argmin(finite))
                raise ValueError(f"{what}: volume {i} contains NaN or Inf"
                                 + (" (or a value beyond the float32 range)"
                                    if np.dtype(volumes.dtype).itemsize > 4 else ""))
            yield start, (x if reading is None else apply_reading(x, reading))

    # -------------------------------------------------------------- inference
    def nifti_reading(self, intensity=FROM_CHECKPOINT, target_shape=FROM_CHECKPOINT, like=None):
        """The reading (``wrn3d_tl.data.reading.preprocessing_of``) for NIfTI inputs:
        ``intensity`` and ``target_shape`` as given, or, when ``"checkpoint"``, what the
        checkpoint stored from its NIfTI training data (else ``like``'s, a reading, else
        the defaults of ``nifti_dataset``: ``"zscore"``, None). Orientation and spacing are
        always the stored ones (or ``like``'s when none is stored): the network learnt on
        that grid."""
        from wrn3d_tl.data.reading import FILE_SIDE, preprocessing_of

        stored = self.preprocessing if (self.preprocessing or {}).get("reader") == "nifti" else like or {}
        if intensity == FROM_CHECKPOINT:
            intensity = stored.get("intensity", "zscore")
        if isinstance(target_shape, str) and target_shape == FROM_CHECKPOINT:
            target_shape = stored.get("target_shape")
        return preprocessing_of(intensity, target_shape, *(stored.get(k) for k in FILE_SIDE))

    def open(self, volumes, *, key="volumes", intensity=FROM_CHECKPOINT, target_shape=FROM_CHECKPOINT):
        """Context manager giving ``(array-like, description)`` for any input ``predict``
        takes (files opened lazily; NIfTI read as the checkpoint says unless overridden)."""
        # NiftiVolumes for a model whose data did not say how it was read: theirs is the reading
        reading = self.nifti_reading(intensity, target_shape, like=getattr(volumes, "reading", None))
        return _open_volumes(volumes, key, reading)

    def predict(self, volumes, *, key="volumes", batch_size=32, top_k=5, intensity=FROM_CHECKPOINT,
                target_shape=FROM_CHECKPOINT, preprocessed=False):
        """See ``wrn3d_tl.predict.predict``."""
        top_k = check_int(top_k, "top_k")
        k = min(top_k, self.config.num_classes)
        with self.open(volumes, key=key, intensity=intensity, target_shape=target_shape) as (array, what):
            if preprocessed and hasattr(array, "info"):
                raise ValueError(f"{what}: preprocessed=True applies to arrays; files are always read raw")
            reading = self.array_reading(array, preprocessed)
            n = self.check_volumes(array, what, reading)[0]
            logits = np.empty((n, self.config.num_classes), np.float32)
            probs = np.empty_like(logits)
            for start, x in self.batches(array, batch_size, what, reading):
                lg, pr = self._infer(x)
                lg = lg.numpy()
                finite = np.isfinite(lg).all(axis=1)
                if not finite.all():
                    raise ValueError(f"{what}: volume {start + int(np.argmin(finite))} gives non-finite logits "
                                     "(values far outside the training data's range?)")
                logits[start:start + len(x)] = lg
                probs[start:start + len(x)] = pr.numpy()
            files = hasattr(array, "info")    # NiftiVolumes: each file read with its reading
            applied = array.reading if files else reading
        # Stable sort on -p: ties go to the lower class index, as argmax does.
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(probs, order, axis=1)
        out = {"class": order[:, 0].astype(np.int64), "probability": top_p[:, 0].copy(),
               "top_k_classes": order.astype(np.int64), "top_k_probabilities": top_p,
               "logits": logits, "probabilities": probs,
               "reading": {"preprocessing": applied, "normalization": self.normalization}}
        if self.class_names is not None:
            out["class_name"] = [self.class_names[int(c)] for c in out["class"]]
        if files:
            out["path"] = list(array.info.paths)
        return out


def as_predictor(model, precision=None):
    """``model`` itself when it is a ``Predictor``, else ``Predictor(model, precision)``
    (None: "fp32"). A Predictor of another precision than a given one is a ValueError."""
    if not isinstance(model, Predictor):
        return Predictor(model, "fp32" if precision is None else precision)
    if precision is not None and precision != model.precision:
        raise ValueError(f"precision={precision!r}, but the Predictor given computes in {model.precision!r}: "
                         f"pass precision=None to use it, or make a Predictor with precision={precision!r}")
    return model


def load_npy(path):
    """Memory-map a ``.npy`` file (never unpickling); ValueError naming the file when it is
    not one (numpy's format starts with the bytes ``\\x93NUMPY``) or cannot be read."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{path!r} is not a .npy file (it does not start with numpy's magic bytes \\x93NUMPY; "
                         "save arrays with numpy.save)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path!r} is not a readable .npy array: {_one_line(e)}") from e


def is_nifti_input(path):
    """Whether ``path`` is read as NIfTI: a ``.nii``/``.nii.gz`` file, a folder or a ``.csv`` table."""
    path = os.fspath(path)
    return path.lower().endswith((".nii", ".nii.gz", ".csv")) or os.path.isdir(path)


class _open_volumes:
    """Context manager: (array-like, description) for a numpy array, a .npy path, an
    HDF5 path + key or a NIfTI input. Files are opened lazily (memory-mapped / h5py /
    nibabel), read batch by batch."""

    def __init__(self, volumes, key, reading):
        self.volumes, self.key, self._file = volumes, key, None
        self.reading = reading

    def __enter__(self):
        # TensorFlow comes with it: not at module import
        from wrn3d_tl.data.nifti import NiftiVolumes

        v, reading = self.volumes, self.reading
        if isinstance(v, NiftiVolumes):
            if v.reading != reading:
                raise ValueError(f"NIfTI table {v.info.table!r}: these NiftiVolumes read files with {v.reading}, but "
                                 f"the model's NIfTI data was read with {reading}; build them with the same "
                                 "reading, or pass the path instead")
            return v, f"NIfTI table {v.info.table!r}"
        if isinstance(v, (str, os.PathLike)):
            path = os.fspath(v)
            if not os.path.exists(path):
                raise FileNotFoundError(f"volumes file {path!r} does not exist")
            if is_nifti_input(path):
                return NiftiVolumes.from_reading(path, reading), f"NIfTI input {path!r}"
            if path.lower().endswith(".npy"):
                return load_npy(path), f"{path!r}"
            if not h5py.is_hdf5(path):
                raise ValueError(f"{path!r} is not an HDF5 file (pass a .npy file or an HDF5 file with volumes "
                                 f"at key {self.key!r})")
            try:
                self._file = h5py.File(path, "r")
            except OSError as e:
                raise ValueError(f"{path!r}: cannot open the HDF5 file: {_one_line(e)}") from e
            dset = self._file.get(self.key)
            if not isinstance(dset, h5py.Dataset):
                keys = []
                self._file.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
                self._file.close()
                raise ValueError(f"{path!r}: no dataset at key {self.key!r}; datasets present: {keys}")
            return dset, f"{path!r} key {self.key!r}"
        if isinstance(v, h5py.Dataset):
            return v, f"HDF5 dataset {v.name!r}"
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            try:
                v = np.asarray(v)
            except Exception as e:
                raise ValueError(f"volumes: cannot be read as an array: {_one_line(e)}") from e
        return v, "volumes"

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()
        return False


def predict(checkpoint, volumes, *, key="volumes", batch_size=32, top_k=5, intensity=FROM_CHECKPOINT,
            target_shape=FROM_CHECKPOINT, precision=None, preprocessed=False):
    """Predict the class of every volume, streaming ``batch_size`` volumes at a time.

    Args:
        checkpoint: a checkpoint file written by ``Trainer.save`` (or a ``Trainer``, or a
            ``Predictor`` to reuse a loaded model). Its stored normalisation is applied.
        volumes: RAW volumes (N,) + input_shape, NDHWC for 3D models / NHWC for 2D: a
            numpy array (or memmap, ``h5py.Dataset``, nested list), a ``.npy`` path, an
            HDF5 path with the volumes at ``key``, or a NIfTI input (a ``.nii``/``.nii.gz``
            file, a folder of them, a CSV with a ``path`` column, or a
            ``wrn3d_tl.data.NiftiVolumes``). Any real dtype; converted to float32.
            Arrays are RAW too: a checkpoint whose training data was read from files
            (``preprocessing``, e.g. a NIfTI table's per-volume z-score and crop/pad) applies
            that same reading to each array volume, so scans as nibabel reads them (with a
            channel axis) give the file path's answer; any spatial shape is accepted when the
            reading crops/pads. HDF5 files from ``nifti_to_hdf5`` are recognised as read.
        preprocessed: True when array inputs have had the reading applied already (they
            go to the network after the dataset normalisation only). Files are always
            read raw.
        key: the HDF5 dataset holding the volumes (HDF5 paths only).
        intensity, target_shape: how NIfTI inputs are preprocessed (as in
            ``wrn3d_tl.data.nifti_dataset``). ``"checkpoint"`` (the default): as the
            model's NIfTI training data was (stored in the checkpoint), else ``"zscore"``
            and None.
        batch_size: volumes per forward pass (memory bound).
        top_k: how many classes to rank per volume; at most ``num_classes`` are returned.
        precision: "fp32" or "bf16" (see ``Predictor``); None: a given Predictor's own,
            else "fp32".

    Returns a dict of numpy arrays, one row per volume, in input order:
        ``class`` (N,) int64 argmax; ``probability`` (N,) float32 softmax of that class;
        ``top_k_classes`` (N, k) int64 and ``top_k_probabilities`` (N, k) float32, best
        first, k = min(top_k, num_classes); ``logits`` and ``probabilities`` (N, num_classes);
        ``reading``: what was applied to the input, ``{"preprocessing": reading dict or
        None, "normalization": {"mean", "std"} or None}``; ``class_name`` (list of str) when
        the checkpoint knows its class names; for NIfTI inputs also ``path``, the file of
        each row.

    Raises ValueError (bad shape, channels, dtype, NaN/Inf, empty input, missing key, not
    HDF5/.npy), FileNotFoundError, or CheckpointError, each naming the input.
    """
    return as_predictor(checkpoint, precision).predict(volumes, key=key, batch_size=batch_size, top_k=top_k,
                                                       intensity=intensity, target_shape=target_shape,
                                                       preprocessed=preprocessed)


def write_csv(predictions, path, top_k=5):
    """Write ``predict`` output to CSV: index, [path (NIfTI inputs),] class, [class_name
    (when the checkpoint knows the names),] probability, top{k} (space-separated classes),
    top{k}_probabilities (space-separated, 6 decimals). Written atomically."""
    path = os.fspath(path)
    paths, names = predictions.get("path"), predictions.get("class_name")
    with written_atomically(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index"] + (["path"] if paths else []) + ["class"] + (["class_name"] if names else [])
                   + ["probability", f"top{top_k}", f"top{top_k}_probabilities"])
        for i, (c, p, tc, tp) in enumerate(zip(predictions["class"], predictions["probability"],
                                               predictions["top_k_classes"],
                                               predictions["top_k_probabilities"])):
            w.writerow([i] + ([paths[i]] if paths else []) + [int(c)] + ([names[i]] if names else []) + [
                f"{float(p):.6f}", " ".join(str(int(v)) for v in tc), " ".join(f"{float(v):.6f}" for v in tp)])
    return path
