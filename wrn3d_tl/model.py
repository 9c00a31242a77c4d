"""WRN-d-k: the configuration (`WRNConfig`) and the builder (`build_wrn`).

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

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import tensorflow as tf
import tensorlayer as tl

from wrn3d_tl.axes import ensure_tuple_rep, is_int, layout
from wrn3d_tl.layers import BatchNorm, Conv, GlobalAvgPool, HeNormal, WideBasicBlock

__all__ = ["WRNConfig", "BlockSpec", "build_wrn", "count_params", "count_flops", "group_shapes", "summary",
           "STEM_WIDTH", "GROUP_WIDTHS"]

STEM_WIDTH = 16
GROUP_WIDTHS = (16, 32, 64)  # times the widening factor k


class BlockSpec(NamedTuple):
    """One wide basic block of the plan (``WRNConfig.blocks()``).

    ``name`` ("group2/block1"), ``group`` (1..3), ``index`` (1..n within the group),
    ``in_spatial``/``out_spatial`` (spatial shape before/after, (D, H, W) or (H, W)),
    ``in_channels``/``out_channels``, ``strides`` (one per spatial axis, on the first
    convolution and the shortcut) and ``projection`` (a 1-per-axis convolution shortcut
    instead of the identity).
    """

    name: str
    group: int
    index: int
    in_spatial: tuple
    out_spatial: tuple
    in_channels: int
    out_channels: int
    strides: tuple
    projection: bool


@dataclass(frozen=True)
class WRNConfig:
    """Hyperparameters of a WRN-d-k; validated on construction (ValueError names the field).

    Attributes:
        depth: total depth d = 6n + 4, n >= 1 blocks per group (10, 16, 22, 28, 40, ...).
        widen_factor: k, an int >= 1; group widths are 16k, 32k, 64k.
        num_classes: >= 2 logits.
        input_shape: one sample's shape without the batch axis: (D, H, W, C) for a 3D
            network on NDHWC batches or (H, W, C) for a 2D network on NHWC batches.
        dropout: dropout probability between the two convolutions of a block, in [0, 1).
        group_strides: one entry per group (3 entries); each an int (every spatial axis)
            or a tuple with one stride per spatial axis. Default (1, 2, 2): the paper's.
            ``(1, (1, 2, 2), (1, 2, 2))`` keeps the depth axis of anisotropic volumes.
            Normalised to a tuple of per-axis tuples.
        bn_decay, bn_epsilon: batch-norm moving-average decay in [0, 1) and epsilon > 0.
        sync_bn: all-reduce batch statistics over the replicas of a tf.distribute strategy.
    """

    depth: int
    widen_factor: int
    num_classes: int = 10
    input_shape: tuple = (8, 32, 32, 3)
    dropout: float = 0.0
    group_strides: tuple = (1, 2, 2)
    bn_decay: float = 0.9
    bn_epsilon: float = 1e-5
    sync_bn: bool = False

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"WRNConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        if not is_int(self.depth) or self.depth < 10 or (self.depth - 4) % 6:
            bad("depth", "an int of the form 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...)")
        if not is_int(self.widen_factor) or self.widen_factor < 1:
            bad("widen_factor", "an int >= 1")
        if not is_int(self.num_classes) or self.num_classes < 2:
            bad("num_classes", "an int >= 2")
        for name in ("depth", "widen_factor", "num_classes"):  # numpy ints become plain ints
            object.__setattr__(self, name, int(getattr(self, name)))
        shape = self.input_shape
        if (not isinstance(shape, (tuple, list)) or len(shape) not in (3, 4)
                or not all(is_int(d) and d >= 1 for d in shape)):
            bad("input_shape", "(D, H, W, C) or (H, W, C) of positive ints")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in shape))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            bad("dropout", "a float in [0, 1)")
        object.__setattr__(self, "group_strides", self._normalise_strides())
        if isinstance(self.bn_decay, bool) or not isinstance(self.bn_decay, (int, float)) \
                or not 0.0 <= self.bn_decay < 1.0:
            bad("bn_decay", "a float in [0, 1)")
        if isinstance(self.bn_epsilon, bool) or not isinstance(self.bn_epsilon, (int, float)) \
                or not self.bn_epsilon > 0:
            bad("bn_epsilon", "a float > 0")
        if not isinstance(self.sync_bn, bool):
            bad("sync_bn", "a bool")

    def _normalise_strides(self):
        strides, rank = self.group_strides, self.spatial_rank
        try:
            if not isinstance(strides, (tuple, list)) or len(strides) != 3:
                raise ValueError
            return tuple(ensure_tuple_rep(s, rank, "each entry") for s in strides)
        except ValueError:
            raise ValueError(f"WRNConfig.group_strides must be 3 entries (one per group), each a positive int or "
                             f"{rank} positive ints (one per spatial axis), got {strides!r}") from None

    @property
    def spatial_rank(self):
        """2 for (H, W, C) inputs, 3 for (D, H, W, C) inputs."""
        return len(self.input_shape) - 1

    @property
    def layout(self):
        """The batch layout: "NDHWC" for 3D configs, "NHWC" for 2D ones."""
        return layout(self.spatial_rank)

    @property
    def stem_width(self):
        """Output channels of the stem convolution (16, the paper's)."""
        return STEM_WIDTH

    @property
    def blocks_per_group(self):
        """n = (depth - 4) / 6."""
        return (self.depth - 4) // 6

    @property
    def widths(self):
        """Output channels of the three groups: (16k, 32k, 64k)."""
        return tuple(w * self.widen_factor for w in GROUP_WIDTHS)

    @property
    def name(self):
        """The paper's name, e.g. ``"WRN-40-4"``."""
        return f"WRN-{self.depth}-{self.widen_factor}"

    @classmethod
    def from_name(cls, name, **overrides):
        """Parse the paper's naming: ``WRNConfig.from_name("WRN-40-4", input_shape=(32, 32, 3))``."""
        m = re.fullmatch(r"\s*wrn-(\d+)-(\d+)\s*", str(name), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"name must look like 'WRN-<depth>-<widen_factor>' (e.g. 'WRN-28-10'), got {name!r}")
        return cls(depth=int(m.group(1)), widen_factor=int(m.group(2)), **overrides)

    def blocks(self):
        """The block plan, one ``BlockSpec`` per wide basic block in network order.

        The paper's rule, written here once: the first block of a group takes the group's
        stride and width; a block whose channels or stride change has a projection
        shortcut. ``build_wrn``, the Keras twin, ``group_shapes``/``count_flops``, the
        memory estimate and the PyTorch reference all read this plan.
        """
        spatial, channels = self.input_shape[:-1], self.stem_width
        plan = []
        for g, (width, group_strides) in enumerate(zip(self.widths, self.group_strides), start=1):
            for i in range(1, self.blocks_per_group + 1):
                strides = group_strides if i == 1 else (1,) * self.spatial_rank
                out = tuple(-(-d // s) for d, s in zip(spatial, strides))  # "SAME": ceil(d / s)
                projection = channels != width or any(s != 1 for s in strides)
                plan.append(BlockSpec(f"group{g}/block{i}", g, i, spatial, out, channels, width, strides,
                                      projection))
                spatial, channels = out, width
        return plan

    def to_dict(self):
        """A JSON-serialisable dict; ``WRNConfig.from_dict`` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d):
        """Rebuild a config from ``to_dict()`` output (lists become tuples)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"WRNConfig.from_dict: unknown fields {sorted(unknown)}")
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        if "group_strides" in d:
            d["group_strides"] = tuple(tuple(s) if isinstance(s, list) else s for s in d["group_strides"])
        return cls(**d)


def build_wrn(config, name=None, recompute=False):
    """Build a WRN-d-k as a static ``tl.models.Model``.

    Input: float32 (or bfloat16/float16 for mixed precision) of shape
    (N,) + config.input_shape, i.e. NDHWC for 3D or NHWC for 2D.
    Output: float32 logits (N, num_classes). Call ``model(x, is_train=True|False)``.
    Layers are named hierarchically: ``stem/conv``, ``group2/block1/conv1``,
    ``group3/block4/shortcut``, ``head/bn``, ``head/logits``; the config is kept
    as ``model.wrn_config``. Each block is one ``WideBasicBlock`` layer; use
    ``wrn3d_tl.layers.leaf_layers(model)`` to reach the individual convolutions and norms.

    ``recompute=True`` recomputes each block's activations in the backward pass
    (``tf.recompute_grad``) instead of keeping them: activation memory drops to about the
    blocks' inputs, at the cost of a second forward pass per block. Needs dropout 0.
    """
    if not isinstance(config, WRNConfig):
        raise TypeError(f"config must be a WRNConfig, got {type(config).__name__}")
    bn = dict(bn_decay=config.bn_decay, bn_epsilon=config.bn_epsilon, sync_bn=config.sync_bn, recompute=recompute)
    inputs = tl.layers.Input((None,) + config.input_shape, name="input")
    x = Conv(config.stem_width, 3, 1, name="stem/conv")(inputs)
    for block in config.blocks():
        x = WideBasicBlock(block.out_channels, block.strides, config.dropout, projection=block.projection,
                           name=block.name, **bn)(x)
    x = BatchNorm(config.bn_decay, config.bn_epsilon, act=tf.nn.relu, sync=config.sync_bn, name="head/bn")(x)
    x = GlobalAvgPool(name="head/pool")(x)
    x = tl.layers.Dense(config.num_classes, W_init=HeNormal(), b_init=tl.initializers.zeros(),
                        name="head/logits")(x)
    model = tl.models.Model(inputs=inputs, outputs=x, name=name)
    model.wrn_config = config
    model.recompute = bool(recompute)
    return model


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
        if rows[-1][0] != f"group{b.group}":
            rows.append((f"group{b.group}", b.out_spatial, b.out_channels, 0, 0))
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
