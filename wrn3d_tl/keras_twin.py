"""A plain Keras 3 twin of ``build_wrn`` and weight transfer in both directions.

``build_keras_wrn(config)`` builds the same WRN-d-k as ``wrn3d_tl.model.build_wrn``
from stock Keras layers, 2D (NHWC = batch, height, width, channels) or 3D
(NDHWC = batch, depth, height, width, channels) from ``config.input_shape``.
``tl_to_keras`` / ``keras_to_tl`` copy every weight, batch-norm moving statistics
included, so both models give the same inference logits (to float32 round-off).

Layer-name mapping. Keras 3 forbids "/" in layer names, so a TensorLayer layer
``a/b/c`` becomes the Keras layer ``a_b_c``. TensorLayer's ``BatchNorm`` has the
ReLU fused in; in Keras it is a ``BatchNormalization`` plus a separate ``ReLU``
whose name gets a ``_relu`` suffix:

    TensorLayer                 Keras
    input                       input (keras.Input)
    input/check                 (none: keras.Input checks the batch shape itself)
    stem/conv                   stem_conv                    Conv{2,3}D
    group2/block1/bn1           group2_block1_bn1            BatchNormalization
                                group2_block1_bn1_relu       ReLU
    group2/block1/conv1         group2_block1_conv1          Conv{2,3}D
    group2/block1/bn2           group2_block1_bn2 (+ _relu)
    group2/block1/dropout       group2_block1_dropout        Dropout (only if dropout > 0)
    group2/block1/conv2         group2_block1_conv2          Conv{2,3}D
    group2/block1/shortcut      group2_block1_shortcut       Conv{2,3}D 1-per-axis (if needed)
    group2/block1/add           group2_block1_add            Add
    head/bn                     head_bn (+ head_bn_relu)
    head/pool                   head_pool                    GlobalAveragePooling{2,3}D
    head/logits                 head_logits                  Dense

Variable mapping within a layer (TensorLayer -> Keras): ``kernel -> kernel``,
``gamma -> gamma``, ``beta -> beta``, ``moving_mean -> moving_mean``,
``moving_var -> moving_variance``, ``weights -> kernel``, ``biases -> bias``.
Kernel layouts are identical ((k..., C_in, C_out) and (C_in, C_out)), so no transpose.

Known differences that do not affect inference: Keras' ``he_normal`` is a truncated
normal (same variance) where ``layers.HeNormal`` is an untruncated one; and in training
mode Keras updates ``moving_variance`` with the biased batch variance where the
TensorLayer ``BatchNorm`` (fused kernel) uses the unbiased one.
"""

import math

import keras
import numpy as np

from wrn3d_tl.layers import leaf_layers
from wrn3d_tl.config import HEAD_BN, STEM, WRNConfig

__all__ = ["build_keras_wrn", "keras_layer_name", "tl_to_keras", "keras_to_tl", "count_keras_params"]

# TensorLayer variable suffix -> Keras variable name, per layer.
_VAR_TL_TO_KERAS = {"weights": "kernel", "biases": "bias", "moving_var": "moving_variance"}


def keras_layer_name(tl_name):
    """Keras name of the TensorLayer layer ``tl_name``: "/" replaced by "_" (a str)."""
    return tl_name.replace("/", "_")


def build_keras_wrn(config, name=None):
    """Build the WRN-d-k of ``config`` as a functional ``keras.Model``.

    Input: float32 of shape (N,) + config.input_shape, i.e. NDHWC (batch, depth, height,
    width, channels) for a 3D config or NHWC for a 2D one. Output: float32 logits
    (N, config.num_classes). Call ``model(x, training=True|False)``.

    Same architecture as ``build_wrn``: bias-free He-normal convolutions, "same"-padded or,
    with ``config.padding="symmetric"``, a ``ZeroPadding`` layer (``<conv>_pad``) and "valid",
    pre-activation wide basic blocks with ``config.group_strides`` (per group, per axis),
    dropout between the two convolutions when ``config.dropout > 0``, a 1-per-axis
    projection shortcut from the block's first BN-ReLU output when the shape changes,
    ``BatchNormalization(momentum=config.bn_decay, epsilon=config.bn_epsilon,
    synchronized=config.sync_bn)``, a BN-ReLU-pool head and a dense layer with bias.
    Layer names follow the mapping in the module docstring; the config is kept as
    ``model.wrn_config``. ``name`` defaults to e.g. ``"WRN-16-4-3d"``.
    """
    if not isinstance(config, WRNConfig):
        raise TypeError(f"config must be a WRNConfig, got {type(config).__name__}")
    L = keras.layers
    rank = config.spatial_rank
    conv_cls = L.Conv2D if rank == 2 else L.Conv3D
    pool_cls = L.GlobalAveragePooling2D if rank == 2 else L.GlobalAveragePooling3D

    pad_cls = L.ZeroPadding2D if rank == 2 else L.ZeroPadding3D

    def conv(x, filters, kernel_size, strides, tl_name):
        padding = "same"
        if config.padding == "symmetric" and kernel_size > 1:  # Torch's: 1 on both sides, then "valid"
            x = pad_cls(kernel_size // 2, name=keras_layer_name(tl_name) + "_pad")(x)
            padding = "valid"
        return conv_cls(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                        kernel_initializer="he_normal", name=keras_layer_name(tl_name))(x)

    def bn_relu(x, tl_name):
        x = L.BatchNormalization(momentum=config.bn_decay, epsilon=config.bn_epsilon,
                                 synchronized=config.sync_bn, name=keras_layer_name(tl_name))(x)
        return L.ReLU(name=keras_layer_name(tl_name) + "_relu")(x)

    inputs = keras.Input(shape=config.input_shape, name="input")
    x = conv(inputs, config.stem_width, 3, 1, STEM)
    for b in config.blocks():
        preact = bn_relu(x, f"{b.name}/bn1")
        y = conv(preact, b.out_channels, 3, b.strides, f"{b.name}/conv1")
        y = bn_relu(y, f"{b.name}/bn2")
        if config.dropout > 0:
            y = L.Dropout(config.dropout, name=keras_layer_name(f"{b.name}/dropout"))(y)
        y = conv(y, b.out_channels, 3, 1, f"{b.name}/conv2")
        shortcut = conv(preact, b.out_channels, 1, b.strides, f"{b.name}/shortcut") if b.projection else x
        x = L.Add(name=keras_layer_name(f"{b.name}/add"))([y, shortcut])
    x = bn_relu(x, HEAD_BN)
    x = pool_cls(name="head_pool")(x)
    logits = L.Dense(config.num_classes, kernel_initializer="he_normal", bias_initializer="zeros",
                     name="head_logits")(x)
    model = keras.Model(inputs, logits, name=name or f"{config.name}-{rank}d")
    model.wrn_config = config
    return model


def count_keras_params(keras_model):
    """Number of trainable scalars of a Keras model (an int).

    Equal to ``wrn3d_tl.model.count_params(build_wrn(config))`` for ``build_keras_wrn(config)``;
    unlike ``keras.Model.count_params`` it leaves out the BN moving statistics.
    """
    return int(sum(math.prod(w.shape) for w in keras_model.trainable_weights))


def _tl_var_name(var):
    """'group1/block1/bn1/moving_var:0' -> 'moving_var'."""
    return var.name.split(":")[0].rsplit("/", 1)[-1]


def _transfer(tl_model, keras_model, to_keras):
    """Validate the two models against each other, then copy source -> destination.

    Common layers are checked first in network order (strides, epsilon, weight names and
    shapes), then layers present on one side only; every check runs before anything is
    written, so a failed transfer changes nothing.
    """
    if not isinstance(keras_model, keras.Model) or not hasattr(tl_model, "all_layers"):
        raise TypeError(f"expected a TensorLayer model and a keras.Model, got {type(tl_model).__name__} and "
                        f"{type(keras_model).__name__} (tl_to_keras(tl, keras) / keras_to_tl(keras, tl))")
    src_side, dst_side = ("TensorLayer", "Keras") if to_keras else ("Keras", "TensorLayer")
    tl_layers = {}
    for layer in leaf_layers(tl_model):
        weights = list(layer.trainable_weights) + list(layer.nontrainable_weights)
        if weights:
            tl_layers[layer.name] = (layer, weights)
    keras_layers = {layer.name: layer for layer in keras_model.layers if layer.weights}

    pairs = []
    for tl_name, (tl_layer, tl_weights) in tl_layers.items():
        k_layer = keras_layers.get(keras_layer_name(tl_name))
        if k_layer is None:
            continue
        where = f"layer {tl_name!r} (Keras {k_layer.name!r})"
        # Structure that changes inference but not the weight shapes.
        tl_strides = getattr(tl_layer, "_strides", None)
        if tl_strides is not None and tuple(tl_strides) != tuple(k_layer.strides):
            raise ValueError(f"{where}: strides differ, TensorLayer {tuple(tl_strides)} vs Keras "
                             f"{tuple(k_layer.strides)}; the configs' group_strides or ranks differ")
        tl_eps = getattr(tl_layer, "epsilon", None)
        if tl_eps is not None and not math.isclose(tl_eps, k_layer.epsilon, rel_tol=1e-6):
            raise ValueError(f"{where}: batch-norm epsilon differs, TensorLayer {tl_eps} vs Keras "
                             f"{k_layer.epsilon}")
        k_vars = {v.name.rsplit("/", 1)[-1]: v for v in k_layer.weights}
        wanted = {_VAR_TL_TO_KERAS.get(_tl_var_name(v), _tl_var_name(v)) for v in tl_weights}
        if wanted != set(k_vars):
            raise ValueError(f"{where}: TensorLayer weights {[_tl_var_name(v) for v in tl_weights]} do not "
                             f"match Keras weights {sorted(k_vars)}")
        for tl_var in tl_weights:
            short = _tl_var_name(tl_var)
            k_var = k_vars[_VAR_TL_TO_KERAS.get(short, short)]
            src, dst = (tl_var, k_var) if to_keras else (k_var, tl_var)
            expected, given = tuple(dst.shape), tuple(src.shape)
            if expected != given:
                raise ValueError(f"{where}, weight {short!r}: shape mismatch, expected {expected} "
                                 f"({dst_side} destination) but given {given} ({src_side} source); "
                                 f"the configs differ")
            pairs.append((src, dst))

    missing = [n for n in tl_layers if keras_layer_name(n) not in keras_layers]
    extra = [n for n in keras_layers if n not in {keras_layer_name(t) for t in tl_layers}]
    if missing:
        raise ValueError(f"layer {missing[0]!r}: in the TensorLayer model but the Keras model has no layer "
                         f"{keras_layer_name(missing[0])!r} with weights (TensorLayer-only layers: {missing}); "
                         f"the configs differ")
    if extra:
        raise ValueError(f"layer {extra[0]!r}: in the Keras model but not in the TensorLayer model "
                         f"(Keras-only layers: {extra}); the configs differ")

    values = [np.array(src.numpy(), dtype=np.float32) for src, _ in pairs]
    for (_, dst), value in zip(pairs, values):
        dst.assign(value)


def tl_to_keras(tl_model, keras_model):
    """Copy every weight of a ``build_wrn`` TensorLayer model into a ``build_keras_wrn`` model.

    Matches layers by name ("/" -> "_"): conv kernels (k..., C_in, C_out) float32, batch-norm
    gamma/beta/moving_mean/moving_var (C,) float32, dense weights (C, classes) and biases
    (classes,). Raises ValueError naming the layer (and the expected and given shape) when
    the models' configs differ; nothing is written then. Returns ``keras_model``.
    """
    _transfer(tl_model, keras_model, to_keras=True)
    return keras_model


def keras_to_tl(keras_model, tl_model):
    """Copy every weight of a ``build_keras_wrn`` Keras model into a ``build_wrn`` model.

    The inverse of ``tl_to_keras`` (same matching, shapes, dtypes and errors; nothing is
    written when a check fails). Returns ``tl_model``.
    """
    _transfer(tl_model, keras_model, to_keras=False)
    return tl_model
