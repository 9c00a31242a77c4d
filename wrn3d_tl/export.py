"""Export a trained WRN as a TensorFlow SavedModel that serves without this library.

    from wrn3d_tl.export import export_saved_model
    export_saved_model(trainer, "exported/wrn")          # the trainer's normalisation is baked in

    # anywhere with TensorFlow only (no wrn3d_tl, no TensorLayer):
    served = tf.saved_model.load("exported/wrn")
    out = served.signatures["serving_default"](volumes=tf.constant(raw_float32_volumes))
    out["logits"], out["probabilities"]                   # (N, num_classes) float32 each

The SavedModel holds the model's variables (weights and batch-norm moving statistics) in
a ``tf.Module`` and a graph traced in inference mode (moving statistics, no dropout).
Its signatures take RAW volumes, i.e. in the units of the data as stored (0..255 for
uint8 CIFAR; scans' voxel values as nibabel reads them, with a channel axis), NDHWC
(batch, depth, height, width, channels) for a 3D config or NHWC for a 2D one, with a free
batch size and the config's spatial shape and channels:

    serving_default       volumes: float32 (None,) + input_shape -> {"logits", "probabilities"}
    serving_uint8         volumes: uint8   (None,) + input_shape -> the same (cast to float32 inside)
    serving_preprocessed  volumes: float32 (None,) + input_shape, as the training pipeline fed
                          the network (reading and normalisation applied) -> the same

When the checkpoint stored a reading (``wrn3d_tl.data.reading``: the per-volume intensity
step and crop/pad its NIfTI training data had), the graph applies it to each raw volume
(``apply_reading_tf``), so a raw scan in gives the checkpoint's answer out; with a crop/pad
in it, ``serving_default``/``serving_uint8`` take any spatial shape (``(None, None, None,
None, C)``). Orientation or resampling are not part of the graph: feed volumes in the
voxel order the training files had.
Other dtypes (float64, int16, ...): cast to float32 before calling ``serving_default``.
A volume batch of another rank or shape raises ``InvalidArgumentError`` ("volumes must
have shape (N,) + ...").
``export_saved_model(..., precision="bf16")`` writes a SavedModel whose network computes in
bfloat16 with its convolution kernels stored as bfloat16; its signatures are the same.
Normalisation ``(x - mean) / std`` with the per-channel stats is part of the graph as
constants; without stats the volumes pass to the network unchanged. NaN/Inf inputs are
not checked by the graph: they give NaN outputs.

The loaded object also has ``served.serve(volumes)`` / ``served.serve_uint8(volumes)``
(the same functions) and ``served.metadata()``: a scalar string tensor holding JSON
(``json.loads(served.metadata().numpy())`` gives the dict) with the WRNConfig, the
normalisation, the reading (``preprocessing``), the ``class_names`` (or null), the input
layout and shapes, the signature names and the precision.
"""

import json
import os

import numpy as np
import tensorflow as tf

from wrn3d_tl.data import as_normalization
from wrn3d_tl.data.reading import apply_reading_tf
from wrn3d_tl.layers import checked_shape
from wrn3d_tl.loading import resolve
from wrn3d_tl.model import graph_function, inference_copy, inference_dtype

__all__ = ["export_saved_model", "input_expects", "SIGNATURES"]

SIGNATURES = ("serving_default", "serving_uint8", "serving_preprocessed")


def _resolve(trainer_or_model, normalization):
    """``(model, config, normalisation dict or None, reading or None, class names or None)``
    from a checkpoint path, a Trainer or Predictor, or a build_wrn model
    (``wrn3d_tl.loading.resolve``); ``normalization``, when given, replaces theirs."""
    loaded = resolve(trainer_or_model, "export_saved_model's trainer_or_model")
    if normalization is None:
        normalization = loaded.normalization
        if hasattr(trainer_or_model, "warn_if_normalization_unknown"):
            trainer_or_model.warn_if_normalization_unknown("SavedModel")
    return (loaded.model, loaded.config, _norm_arrays(normalization, loaded.config), loaded.preprocessing,
            loaded.class_names)


def _norm_arrays(normalization, config):
    norm = as_normalization(normalization, config.input_shape[-1], f"input_shape {config.input_shape}")
    return None if norm is None else norm.to_dict()


def _serving_model(model, precision):
    """The model itself, or a plain copy (``inference_copy``) when its variables are
    distributed (a SavedModel needs no strategy) or it is to compute in bf16."""
    distributed = any(isinstance(v, tf.distribute.DistributedValues) for v in model.all_weights)
    if not distributed and precision == "fp32":
        return model
    if tf.distribute.has_strategy():
        raise RuntimeError("export_saved_model: call it outside `strategy.scope()` (the model's variables are "
                           "distributed; they are copied into a plain model for export)")
    return inference_copy(model, precision)


def _shape_check(volumes, rank, channels, spatial, layout):
    """Assert in the graph (signature calls do not enforce the declared shape): rank, the
    channels and, when ``spatial`` is given, the spatial shape."""
    shape = "(N,) + " + (str(tuple(spatial) + (channels,)) if spatial else f"(spatial..., {channels})")
    return checked_shape(volumes, rank, channels, spatial, f"volumes must have shape {shape} ({layout}); got shape:")


class _ServingModule(tf.Module):
    """What gets saved: the variables, the traced serving functions and the metadata."""

    def __init__(self, model, config, norm, reading, metadata, dtype):
        super().__init__(name="wrn3d_serving")
        # Tracked so the SavedModel stores them; the traced graph reads exactly these.
        self.model_variables = list(model.all_weights)
        rank, channels = len(config.input_shape) - 1, config.input_shape[-1]
        free = reading is not None and reading["target_shape"] is not None   # any spatial shape: crop/pad inside
        raw_shape = [None] * (rank + 1) + [channels] if free else [None, *config.input_shape]
        mean = None if norm is None else np.asarray(norm["mean"], np.float32)
        std = None if norm is None else np.asarray(norm["std"], np.float32)
        meta_json = json.dumps(metadata, sort_keys=True)

        def network(x):   # x: what the training pipeline fed the network (read and normalised)
            # TensorLayer's forward is Python that reads layer.is_train: trace in eval mode.
            logits = tf.cast(model(tf.cast(x, dtype), is_train=False), tf.float32)
            return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

        def forward(volumes):
            x = _shape_check(volumes, rank, channels, None if free else config.input_shape[:-1], config.layout)
            if reading is not None:
                x = apply_reading_tf(x, reading)
            if mean is not None:
                x = (x - tf.constant(mean)) / tf.constant(std)
            return network(x)

        @graph_function(input_signature=[tf.TensorSpec(raw_shape, tf.float32, name="volumes")])
        def serve(volumes):
            return forward(volumes)

        @graph_function(input_signature=[tf.TensorSpec(raw_shape, tf.uint8, name="volumes")])
        def serve_uint8(volumes):
            return forward(tf.cast(volumes, tf.float32))

        @graph_function(input_signature=[tf.TensorSpec([None, *config.input_shape], tf.float32, name="volumes")])
        def serve_preprocessed(volumes):
            return network(_shape_check(volumes, rank, channels, config.input_shape[:-1], config.layout))

        @graph_function(input_signature=[])
        def metadata_fn():
            return tf.constant(meta_json)

        self.serve = serve
        self.serve_uint8 = serve_uint8
        self.serve_preprocessed = serve_preprocessed
        self.metadata = metadata_fn


def export_saved_model(trainer_or_model, path, *, normalization=None, precision="fp32"):
    """Write a SavedModel of a trained WRN to the folder ``path``; returns ``path``.

    Args:
        trainer_or_model: a checkpoint path (its weights and stored normalisation), a
            ``wrn3d_tl.train.Trainer`` (its ``model`` is exported and its
            ``normalization`` is used unless ``normalization`` is given) or a
            ``tl.models.Model`` from ``wrn3d_tl.model.build_wrn``.
        path: output folder (created; an existing SavedModel there is overwritten).
        normalization: per-channel stats in raw input units, a
            ``wrn3d_tl.data.Normalization`` or ``{"mean": [...], "std": [...]}``, baked
            into the graph as constants. None (and a trainer without stats): the raw
            volumes go to the network unchanged.
        precision: "fp32" (default) or "bf16": the network computes in bfloat16 and the
            convolution kernels are stored as bfloat16 (about half the file); the
            signatures, normalisation, logits and probabilities stay float32. The README
            gives the measured speed-up and change in predictions.

    Signatures (see the module docstring): ``serving_default`` takes float32 raw volumes
    ``volumes`` of shape (None,) + input_shape (NDHWC, or NHWC for 2D configs);
    ``serving_uint8`` takes uint8 ones; both apply the stored reading first (a checkpoint
    path's or a trainer's ``preprocessing``: its intensity step and crop/pad, as graph ops).
    A reading's orientation and spacing need each file's affine, so they stay on the
    file-reading side: the served model then expects volumes already reoriented and
    resampled (``wrn3d_tl.data.read_scan(path, orientation=..., spacing=...)``), and its
    metadata says so under ``"input_expects"``. ``serving_preprocessed`` takes the network's
    input as the training pipeline gave it. All return ``{"logits", "probabilities"}``,
    float32 (N, num_classes), computed in inference mode (moving batch-norm statistics,
    no dropout); with precision "fp32" in float32 whatever the trainer's mixed precision.
    Loading needs TensorFlow only: ``tf.saved_model.load(path)``.
    """
    inference_dtype(precision)   # checked before anything is loaded
    return _export(_resolve(trainer_or_model, normalization), path, precision)


def input_expects(reading) -> str:
    """What the raw-volume signatures expect, in words, for the SavedModel's metadata: the
    voxel order and size a reading's file-side steps produce, which the graph cannot do."""
    if reading is None:
        return "raw volumes as the training data held them (before its normalisation)"
    orientation, spacing = reading.get("orientation"), reading.get("spacing")
    if orientation is None and spacing is None:
        return "volumes with the voxel order and size of the training scans as stored (NDHWC)"
    parts = [f"axes reoriented to {orientation} (nibabel axis codes)" if orientation else "axes as stored",
             "voxels resampled to {:g}x{:g}x{:g} mm".format(*spacing) if spacing else "voxel size as stored"]
    call = ", ".join(f"{k}={v!r}" for k, v in (("orientation", orientation),
                                               ("spacing", tuple(spacing) if spacing else None)) if v is not None)
    return (f"volumes (NDHWC) read from scans with {' and '.join(parts)}, e.g. by "
            f"wrn3d_tl.data.read_scan(path, {call}); the graph applies the intensity step and crop/pad only")


def _export(resolved, path, precision):
    """Write the SavedModel of ``_resolve``'s ``(model, config, norm, reading, names)``."""
    dtype = inference_dtype(precision)
    model, config, norm, reading, names = resolved
    model = _serving_model(model, precision)
    free = reading is not None and reading["target_shape"] is not None
    metadata = {
        "format": "wrn3d_tl-saved-model",
        "version": 2,
        "config": config.to_dict(),
        "normalization": norm,
        "preprocessing": reading,
        "class_names": None if names is None else list(names),
        "layout": config.layout,
        "input_shape": [None] * len(config.input_shape) + [config.input_shape[-1]] if free
        else [None, *config.input_shape],
        "preprocessed_input_shape": [None, *config.input_shape],
        "signatures": list(SIGNATURES),
        "outputs": ["logits", "probabilities"],
        "precision": precision,
        "input_expects": input_expects(reading),
    }
    # Tracing switches every layer to inference mode; remember the modes to put them back.
    model_mode = model.is_train
    layer_modes = [(layer, layer.is_train) for layer in model.all_layers]
    model.is_train = None
    try:
        module = _ServingModule(model, config, norm, reading, metadata, dtype)
        signatures = {
            "serving_default": module.serve.get_concrete_function(),
            "serving_uint8": module.serve_uint8.get_concrete_function(),
            "serving_preprocessed": module.serve_preprocessed.get_concrete_function(),
        }
        path = os.fspath(path)
        tf.saved_model.save(module, path, signatures=signatures)
    finally:
        model.is_train = model_mode
        for layer, mode in layer_modes:
            layer.is_train = mode
    return path
