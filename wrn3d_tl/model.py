"""WRN-d-k: the builder (`build_wrn`, from a `wrn3d_tl.config.WRNConfig`) and its counts.

The network follows Table 1 of Zagoruyko & Komodakis (2016), with the spatial rank
taken from the input shape: (H, W, C) builds a 2D network on NHWC batches,
(D, H, W, C) a 3D network on NDHWC batches.

    group   output size (input 32^2 / 8x32^2)   block                       width
    stem    32x32 / 8x32x32                      conv 3                      16
    group1  32x32 / 8x32x32                      [3, 3] x n                  16k
    group2  16x16 / 4x16x16                      [3, 3] x n, stride s2       32k
    group3  8x8   / 2x8x8                        [3, 3] x n, stride s3       64k
    head    1                                    BN-ReLU, avg pool, dense    classes

with n = (depth - 4) / 6 pre-activation wide basic blocks per group.
"""

import math

import tensorflow as tf
import tensorlayer as tl

from wrn3d_tl.config import (GROUPS, HEAD_BN, HEAD_LOGITS, HEAD_POOL, INFERENCE_PRECISIONS, PRECISIONS, STEM,
                             WRNConfig, check_precision)
from wrn3d_tl.cpu import check_bf16_runs
from wrn3d_tl.layers import BatchNorm, Conv, GlobalAvgPool, HeNormal, InputCheck, WideBasicBlock, variable_name

__all__ = ["WRNConfig", "build_wrn", "count_params", "count_flops", "group_shapes", "summary", "inference_copy",
           "inference_dtype", "PRECISION_DTYPES", "graph_function"]

# The dtype a model's input and convolutions compute in, per precision (wrn3d_tl.config's
# vocabulary). Batch norm statistics, the dense head, logits and probabilities stay float32.
PRECISION_DTYPES = dict(zip(PRECISIONS, (tf.float32, tf.bfloat16, tf.float16)))


def graph_function(fn=None, **kwargs):
    """``tf.function(fn, **kwargs)`` without AutoGraph, as a call or a decorator.

    Every compiled function of ours (the training and evaluation steps, inference, Grad-CAM,
    the SavedModel's signatures) branches on tensors only through ``tf.cond``, so AutoGraph's
    source rewriting changes nothing in the graph; it cost most of a first step's tracing
    (a WRN-10-1 3D step: 2.3 s with it, 0.56 s without, AMD EPYC, 2026-12-07).
    """
    return tf.function(fn, autograph=False, **kwargs)


def build_wrn(config, name=None, recompute=False, kernel_dtype=tf.float32):
    """Build a WRN-d-k as a static ``tl.models.Model``.

    Input: float32 (or bfloat16/float16 for mixed precision) of shape
    (N,) + config.input_shape, i.e. NDHWC for 3D or NHWC for 2D.
    Output: float32 logits (N, num_classes). Call ``model(x, is_train=True|False)``; a
    batch of another shape (e.g. one volume without its batch axis) raises ValueError.
    Layers are named hierarchically: ``stem/conv``, ``group2/block1/conv1``,
    ``group3/block4/shortcut``, ``head/bn``, ``head/logits``; the config is kept
    as ``model.wrn_config``. Each block is one ``WideBasicBlock`` layer; use
    ``wrn3d_tl.layers.leaf_layers(model)`` to reach the individual convolutions and norms.

    ``recompute=True`` recomputes each block's activations in the backward pass
    (``tf.recompute_grad``) instead of keeping them: activation memory drops to about the
    blocks' inputs, at the cost of a second forward pass per block. Needs dropout 0.

    ``kernel_dtype=tf.bfloat16`` stores the convolution kernels in bfloat16: an inference
    copy for bfloat16 input (see ``inference_copy``), not a model to train.
    """
    if not isinstance(config, WRNConfig):
        raise TypeError(f"config must be a WRNConfig, got {type(config).__name__}")
    bn = dict(bn_decay=config.bn_decay, bn_epsilon=config.bn_epsilon, sync_bn=config.sync_bn, recompute=recompute,
              padding=config.padding, kernel_dtype=kernel_dtype)
    inputs = tl.layers.Input((None,) + config.input_shape, name="input")
    x = InputCheck(config.input_shape, name="input/check")(inputs)
    x = Conv(config.stem_width, 3, 1, config.padding, name=STEM, kernel_dtype=kernel_dtype)(x)
    for block in config.blocks():
        x = WideBasicBlock(block.out_channels, block.strides, config.dropout, projection=block.projection,
                           name=block.name, **bn)(x)
    x = BatchNorm(config.bn_decay, config.bn_epsilon, act=tf.nn.relu, sync=config.sync_bn, name=HEAD_BN)(x)
    x = GlobalAvgPool(name=HEAD_POOL)(x)
    x = tl.layers.Dense(config.num_classes, W_init=HeNormal(), b_init=tl.initializers.zeros(),
                        name=HEAD_LOGITS)(x)
    model = tl.models.Model(inputs=inputs, outputs=x, name=name)
    model.wrn_config = config
    model.recompute = bool(recompute)
    return model


def inference_dtype(precision, what="precision"):
    """The tf dtype of an inference precision ("fp32" or "bf16"); ValueError naming ``what``."""
    return PRECISION_DTYPES[check_precision(precision, what, INFERENCE_PRECISIONS)]


def inference_copy(model, precision="fp32"):
    """A new ``build_wrn`` model holding a snapshot of ``model``'s current weights, for
    inference in ``precision`` on input of that dtype (NDHWC / NHWC).

    Distributed weights (MirroredVariable etc.) are read cross-replica (their mean), so the
    copy needs no strategy; call it outside ``strategy.scope()``. With "bf16" the
    convolution kernels are stored as bfloat16 (rounded once here, instead of cast on
    every call); batch norm, the dense head and the logits stay float32.
    """
    dtype = inference_dtype(precision)
    if tf.distribute.has_strategy():
        raise RuntimeError("inference_copy: call it outside `strategy.scope()` (the copy is a plain model)")
    if precision == "bf16":
        check_bf16_runs("bf16 inference")
    copy = build_wrn(model.wrn_config, kernel_dtype=dtype)
    pairs = list(zip(copy.all_weights, model.all_weights))
    if len(pairs) != len(model.all_weights) or len(pairs) != len(copy.all_weights) or any(
            variable_name(d) != variable_name(s) or d.shape != s.shape for d, s in pairs):
        raise ValueError(f"inference_copy: model's weights are not those of build_wrn({model.wrn_config.name}) "
                         "(names or shapes differ)")
    for dst, src in pairs:
        dst.assign(tf.cast(src.numpy(), dst.dtype))  # a cross-replica read of distributed values
    return copy


def count_params(model):
    """Number of trainable scalars of a TensorLayer model (an int)."""
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


def group_shapes(config):
    """Per-stage rows ``(stage, output spatial shape, channels, trainable params, forward FLOPs)``.

    Analytic, from the config alone; FLOPs count a multiply-add as 2 and cover the
    convolutions and the dense layer (batch norm, ReLU, additions and pooling are
    elementwise and add well under 1%).
    """
    k3 = 3 ** config.spatial_rank
    spatial = config.input_shape[:-1]

    def conv(spatial_out, k, ci, co):
        return k * ci * co, 2 * math.prod(spatial_out) * k * ci * co

    params, flops = conv(spatial, k3, config.input_shape[-1], config.stem_width)
    rows = [("stem", spatial, config.stem_width, params, flops)]
    for b in config.blocks():
        if rows[-1][0] != GROUPS[b.group - 1]:
            rows.append((GROUPS[b.group - 1], b.out_spatial, b.out_channels, 0, 0))
        p = 2 * b.in_channels + 2 * b.out_channels  # bn1, bn2
        f = 0
        convs = [(k3, b.in_channels), (k3, b.out_channels)] + ([(1, b.in_channels)] if b.projection else [])
        for k, ci in convs:
            cp, cf = conv(b.out_spatial, k, ci, b.out_channels)
            p, f = p + cp, f + cf
        stage, _, _, p0, f0 = rows[-1]
        rows[-1] = (stage, b.out_spatial, b.out_channels, p0 + p, f0 + f)
    c = config.widths[-1]
    head_p = 2 * c + c * config.num_classes + config.num_classes
    rows.append(("head", (), config.num_classes, head_p, 2 * c * config.num_classes))
    return rows


def count_flops(config):
    """Forward-pass FLOPs for one sample (an int; a multiply-add counts as 2).

    Convolutions and the dense layer only; see ``group_shapes``.
    """
    return int(sum(row[4] for row in group_shapes(config)))


def summary(config):
    """A printable table of the stages of ``config``: output shape, width, params, GFLOPs."""
    lines = [f"{config.name}  input {config.input_shape}  ({config.spatial_rank}D, "
             f"{config.blocks_per_group} blocks per group)",
             f"{'stage':<8} {'output shape':<16} {'width':>6} {'params':>12} {'GFLOPs':>9}"]
    for stage, spatial, width, p, f in group_shapes(config):
        shape = "x".join(map(str, spatial)) if spatial else "1"
        lines.append(f"{stage:<8} {shape:<16} {width:>6} {p:>12,} {f / 1e9:>9.3f}")
    total_p = sum(r[3] for r in group_shapes(config))
    lines.append(f"{'total':<8} {'':<16} {'':>6} {total_p:>12,} {count_flops(config) / 1e9:>9.3f}")
    return "\n".join(lines)
