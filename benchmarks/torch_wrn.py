"""A PyTorch WRN-d-k with the same architecture as ``wrn3d_tl.model.build_wrn``: the
benchmark's reference competitor. PyTorch is NOT a dependency of wrn3d_tl; this file is
only imported by ``benchmarks/bench_train.py`` when ``torch`` is importable.

One code path builds 2D (input (H, W, C)) and 3D (input (D, H, W, C)) networks: the
spatial rank picks ``Conv2d``/``Conv3d`` and ``BatchNorm2d``/``BatchNorm3d``.

    stem    conv 3 (16 channels)
    groupG  n pre-activation wide basic blocks, width 16k/32k/64k, the first with the
            group's stride: BN-ReLU -> conv 3 (stride) -> BN-ReLU -> [dropout] -> conv 3,
            plus a 1-per-axis projection shortcut (with the stride) fed from the first
            BN-ReLU output when the shape changes, else the identity
    head    BN-ReLU -> global average pool -> linear (with bias)

Convolutions are bias-free with Kaiming-normal (fan-in) weights, as in the paper's code.
BN uses ``momentum = 1 - config.bn_decay`` and ``config.bn_epsilon``. The only intended
difference from wrn3d_tl is padding at stride 2: PyTorch pads 1 on both sides where
TensorFlow's "SAME" pads 0 before and 1 after; shapes, parameters and FLOPs are equal.

Tensors are logically N C [D] H W as PyTorch wants; the benchmark keeps them in the
channels-last memory format (``channels_last_3d`` for 3D), which is exactly the layout
of a permuted NDHWC/NHWC array, so no copy is needed.
"""

import torch
from torch import nn

__all__ = ["TorchWRN", "build_torch_wrn", "count_torch_params", "stage_params"]


def _layers(rank):
    if rank == 2:
        return nn.Conv2d, nn.BatchNorm2d
    if rank == 3:
        return nn.Conv3d, nn.BatchNorm3d
    raise ValueError(f"spatial rank must be 2 or 3, got {rank}")


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block (see the module docstring)."""

    def __init__(self, rank, c_in, c_out, stride, projection, dropout, bn_momentum, bn_eps):
        super().__init__()
        conv, bn = _layers(rank)
        self.bn1 = bn(c_in, momentum=bn_momentum, eps=bn_eps)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = bn(c_out, momentum=bn_momentum, eps=bn_eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = conv(c_in, c_out, 1, stride=stride, bias=False) if projection else None

    def forward(self, x):
        preact = torch.relu(self.bn1(x))
        y = self.conv1(preact)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        return y + (self.shortcut(preact) if self.shortcut is not None else x)


class TorchWRN(nn.Module):
    """WRN-d-k for a ``wrn3d_tl.model.WRNConfig``; submodules ``stem``, ``group1..3``, ``head``."""

    def __init__(self, config):
        super().__init__()
        rank = config.spatial_rank
        conv, bn = _layers(rank)
        bn_args = dict(bn_momentum=1.0 - config.bn_decay, bn_eps=config.bn_epsilon)
        self.stem = conv(config.input_shape[-1], config.stem_width, 3, padding=1, bias=False)
        for g in range(1, 4):
            blocks = [WideBasicBlock(rank, b.in_channels, b.out_channels, b.strides, b.projection, config.dropout,
                                     **bn_args) for b in config.blocks() if b.group == g]
            setattr(self, f"group{g}", nn.Sequential(*blocks))
        c = config.widths[-1]
        self.head_bn = bn(c, momentum=1.0 - config.bn_decay, eps=config.bn_epsilon)
        self.head_fc = nn.Linear(c, config.num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.group3(self.group2(self.group1(self.stem(x))))
        x = torch.relu(self.head_bn(x))
        return self.head_fc(torch.flatten(x.mean(dim=tuple(range(2, x.dim()))), 1))


def build_torch_wrn(config, channels_last=True):
    """``TorchWRN(config)``, in the channels-last memory format unless told otherwise."""
    model = TorchWRN(config)
    if channels_last:
        fmt = torch.channels_last_3d if config.spatial_rank == 3 else torch.channels_last
        model = model.to(memory_format=fmt)
    return model


def count_torch_params(model):
    """Number of trainable scalars (an int)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def stage_params(model):
    """Trainable scalars per stage, named like the rows of ``wrn3d_tl.model.group_shapes``."""
    stages = {"stem": [model.stem], "group1": [model.group1], "group2": [model.group2],
              "group3": [model.group3], "head": [model.head_bn, model.head_fc]}
    return {name: sum(count_torch_params(m) for m in mods) for name, mods in stages.items()}
