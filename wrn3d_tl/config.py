"""The configuration of a WRN-d-k (``WRNConfig``) and its block plan (``WRNConfig.blocks``).

Pure Python, no TensorFlow: command lines validate their flags with it at once, and
everything that needs the architecture (``build_wrn``, the Keras twin, FLOP and memory
counts, the PyTorch reference) reads the same plan.
"""

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import NamedTuple

from wrn3d_tl.validate import ensure_tuple_rep, is_int, layout, same_output_shape

__all__ = ["WRNConfig", "BlockSpec", "STEM_WIDTH", "GROUP_WIDTHS", "PADDINGS", "PRECISIONS", "INFERENCE_PRECISIONS",
           "check_precision", "check_mixed_precision", "STEM", "HEAD_BN", "HEAD_POOL", "HEAD_LOGITS", "GROUPS",
           "TOP_LAYERS"]

PADDINGS = ("same", "symmetric")
# One precision vocabulary: what a network's convolutions compute in. Training takes all
# three ("bf16"/"fp16" as mixed precision over float32 weights), inference the first two;
# the command lines offer the same words.
PRECISIONS = ("fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("fp32", "bf16")
# The network's layer names, one place: weights are stored under "<layer>/<variable>" (e.g.
# "group2/block1/conv1/kernel"), Grad-CAM, conversion, freezing and the Keras twin use them.
STEM, HEAD_BN, HEAD_POOL, HEAD_LOGITS = "stem/conv", "head/bn", "head/pool", "head/logits"
GROUPS = ("group1", "group2", "group3")
TOP_LAYERS = ("stem", *GROUPS, "head")   # the first component of every layer name
STEM_WIDTH = 16
GROUP_WIDTHS = (16, 32, 64)  # times the widening factor k


def check_precision(value, what="precision", allowed=PRECISIONS):
    """``value`` when it is one of ``allowed`` (a subset of ``PRECISIONS``), else ValueError
    naming ``what``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_mixed_precision(value, what="mixed_precision"):
    """Training's precision as ``Trainer`` stores it: None for float32 (None or "fp32"
    given), else "bf16" or "fp16"; ValueError naming ``what`` otherwise."""
    if value is None or value == "fp32":
        return None
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{what} must be None or one of {', '.join(map(repr, PRECISIONS))}, got {value!r}")
    return value


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
        padding: "same" (TensorFlow's: a 3-wide stride-2 convolution pads 0 before and 1
            after) or "symmetric" (Torch's and the paper's code: 1 on each side). Shapes,
            parameters and FLOPs are the same; the outputs differ at stride 2. Weights
            imported from PyTorch (``wrn3d_tl.convert``) need "symmetric". Checkpoints
            written before this field existed load as "same", which they were.
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
    padding: str = "same"

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
        if self.padding not in PADDINGS:
            bad("padding", f"one of {PADDINGS}")

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
                out = same_output_shape(spatial, strides)
                projection = channels != width or any(s != 1 for s in strides)
                plan.append(BlockSpec(f"{GROUPS[g - 1]}/block{i}", g, i, spatial, out, channels, width, strides,
                                      projection))
                spatial, channels = out, width
        return plan

    def feature_layers(self):
        """The layers whose output is a feature map, in network order (as timm's
        ``feature_info``): ``"stem/conv"``, every block (``"group2/block1"``) and
        ``"head/bn"`` (group3 after BN-ReLU)."""
        return [STEM] + [b.name for b in self.blocks()] + [HEAD_BN]

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
