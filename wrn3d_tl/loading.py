"""The front door to a network: ``create_wrn("WRN-16-4", ...)`` by name (with weights from a
checkpoint if given), and loading a trained network from a checkpoint file, for inference or
to start from: the model (``build_wrn`` of the stored config, its weights assigned by name
with their shapes checked), its normalisation, its reading and its class names.

Beside ``build_wrn`` in the data flow (data -> layers/model -> loading -> train ->
export/predict/explain): the inference side loads models without importing the trainer.
"""

import os
from typing import NamedTuple

import tensorflow as tf

from wrn3d_tl.checkpoint import CheckpointError, read_checkpoint
from wrn3d_tl.data import as_normalization
from wrn3d_tl.data.reading import check_class_names, check_preprocessing
from wrn3d_tl.layers import variable_name
from wrn3d_tl.model import WRNConfig, build_wrn

__all__ = ["create_wrn", "resolve", "Loaded", "load_model", "load_for_inference", "assign_checked", "stored_config_and_normalization"]


def stored_config_and_normalization(ck, path):
    """The ``WRNConfig`` and the validated normalisation (or None) a read checkpoint holds;
    CheckpointError naming the file when either is malformed."""
    try:
        config = WRNConfig.from_dict(ck["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds an invalid config: {e}") from e
    try:
        norm = as_normalization(ck["normalization"], config.input_shape[-1], "its config's input")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds invalid normalization stats: {e}") from e
    return config, norm


def assign_checked(pairs, path):
    """``(variable, table, name)`` triples: check that every name is in its table with the
    variable's shape, then assign them all (nothing is assigned when a check fails)."""
    for var, table, name in pairs:
        if name not in table:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} lacks {name!r}")
        if tuple(table[name].shape) != tuple(var.shape):
            raise CheckpointError(f"checkpoint {os.fspath(path)!r}: {name!r} has shape "
                                  f"{table[name].shape}, the model expects {tuple(var.shape)}")
    for var, table, name in pairs:
        var.assign(table[name])


def load_model(path, *, strategy=None, recompute=False):
    """The network a checkpoint file holds: ``(model, config, normalization)``, with the
    weights (BN moving statistics included) loaded and the normalisation (a ``{"mean",
    "std"}`` dict in raw units, or None) validated; for inference, or to start a training
    run from (the model is built inside ``strategy``'s scope, with ``recompute``). The
    optimizer state is not read. Raises FileNotFoundError or CheckpointError naming the file.
    """
    return _load(path, strategy, recompute)[:3]


def load_for_inference(path):
    """``(model, config, normalization, preprocessing, class_names)`` from ONE read of a
    checkpoint: what ``load_model`` gives plus the stored reading (``Trainer.preprocessing``,
    validated; None when the training data did not say) and the class names (a tuple of
    str, or None: checkpoints from before they were stored load without them)."""
    return _load(path, None, False)


def _load(path, strategy, recompute):
    ck = read_checkpoint(path)
    config, norm = stored_config_and_normalization(ck, path)
    try:
        reading = check_preprocessing(ck["trainer"].get("preprocessing"), "its stored preprocessing")
        names = check_class_names(ck["trainer"].get("class_names"), config.num_classes, "its stored class_names")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: {e}") from e
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_wrn(config, recompute=recompute)
    assign_checked([(v, ck["weights"], variable_name(v)) for v in model.all_weights], path)
    return model, config, None if norm is None else norm.to_dict(), reading, names


def create_wrn(name, *, input_shape, num_classes, weights=None, **config):
    """A WRN by the paper's name, as ``timm.create_model``/``keras.applications`` do.

    Args:
      name: ``"WRN-d-k"`` (depth d = 6n + 4, widening factor k), e.g. ``"WRN-16-4"``.
      input_shape: one sample's shape: ``(D, H, W, C)`` for a 3D network on NDHWC
        batches, ``(H, W, C)`` for a 2D one on NHWC batches.
      num_classes: the number of logits.
      weights: None (He-initialised) or a wrn3d_tl checkpoint path whose network has this
        architecture: every weight (BN moving statistics included) is loaded by name, its
        shape checked; nothing is loaded when one does not fit (CheckpointError naming the
        file and the weight).
      **config: the other ``WRNConfig`` fields (``dropout``, ``group_strides``, ...).

    Returns the ``build_wrn`` model: float32 logits ``(N, num_classes)`` from float32 input
    ``(N,) + input_shape``. ValueError names the argument that does not fit.
    """
    model = build_wrn(WRNConfig.from_name(name, num_classes=num_classes, input_shape=input_shape, **config))
    if weights is not None:
        ck = read_checkpoint(weights)
        assign_checked([(v, ck["weights"], variable_name(v)) for v in model.all_weights], weights)
    return model


class Loaded(NamedTuple):
    """A network and what travels with it (``resolve``): ``normalization`` a ``{"mean",
    "std"}`` dict or None, ``preprocessing`` the stored reading or None, ``class_names`` a
    tuple or None, ``source`` "model", "trainer" or the checkpoint's path."""

    model: object
    config: WRNConfig
    normalization: object
    preprocessing: object
    class_names: object
    source: str


def resolve(source, what="model"):
    """The one place that turns what a caller hands in into a network: a ``build_wrn`` model
    (its inputs already normalised: no stats, no reading), anything holding ``model`` and
    ``config`` (a ``Trainer`` or a ``Predictor``: theirs), or a checkpoint path (read once:
    FileNotFoundError or CheckpointError naming the file). TypeError naming ``what`` else."""
    if isinstance(getattr(source, "wrn_config", None), WRNConfig):
        return Loaded(source, source.wrn_config, None, None, None, "model")
    if hasattr(source, "model") and isinstance(getattr(source, "config", None), WRNConfig):
        return Loaded(source.model, source.config, getattr(source, "normalization", None),
                      getattr(source, "preprocessing", None), getattr(source, "class_names", None), "trainer")
    if isinstance(source, (str, os.PathLike)):
        return Loaded(*load_for_inference(source), os.fspath(source))
    raise TypeError(f"{what} must be a checkpoint path, a wrn3d_tl Trainer or Predictor, or a model built by "
                    f"wrn3d_tl.model.build_wrn, got {type(source).__name__}")
