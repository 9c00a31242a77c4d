"""Start from pretrained weights: PyTorch WRN checkpoints in (``from_torch``), 2D -> 3D
(``inflate``, the I3D recipe of Carreira & Zisserman 2017); the ``wrn3d-convert`` command
is ``wrn3d_tl.commands.convert``.

Weight layouts (PyTorch, NCHW tensors) and where they go (TensorFlow, channels-last):

    conv  (C_out, C_in, kh, kw)  -> kernel (kh, kw, C_in, C_out)   (transpose 2, 3, 1, 0)
    bn    weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_var
          (num_batches_tracked is ignored)
    fc    weight (classes, C), bias -> head/logits weights (C, classes), biases

Key names of the two public layouts (``layout="auto"`` tells them apart):

    wrn3d_tl                 RobustBench / xternalz           szagoruyko
    stem/conv                conv1                            conv0
    groupG/blockB/bn1        block{G}.layer.{B-1}.bn1         group{G-1}.block{B-1}.bn0
    groupG/blockB/conv1      block{G}.layer.{B-1}.conv1       group{G-1}.block{B-1}.conv0
    groupG/blockB/bn2        block{G}.layer.{B-1}.bn2         group{G-1}.block{B-1}.bn1
    groupG/blockB/conv2      block{G}.layer.{B-1}.conv2       group{G-1}.block{B-1}.conv1
    groupG/blockB/shortcut   block{G}.layer.{B-1}.convShortcut group{G-1}.block{B-1}.convdim
    head/bn                  bn1                              bn
    head/logits              fc                               fc

(RobustBench's WideResNet built with ``sub_block1=True`` registers a ``sub_block1`` its
forward pass never reads: those keys are skipped. Built with ``bias_last=False`` it has no
``fc.bias``: a zero bias.) Both networks pad every convolution
by 1 on each side, as Torch does, so imported models are built with
``WRNConfig(padding="symmetric")``: with TensorFlow's "SAME" a stride-2 convolution would
pad (0, 1) and the logits would differ.

``.pt``/``.pth`` files need PyTorch (``pip install wrn3d_tl[torch]``); they are read with
``torch.load(..., weights_only=True)``, never unpickled otherwise. Nothing else in the
library imports torch.
"""

import os
import re

import numpy as np

from wrn3d_tl.config import GROUP_WIDTHS, HEAD_BN, HEAD_LOGITS, STEM, WRNConfig
from wrn3d_tl.layers import variable_name
from wrn3d_tl.loading import resolve
from wrn3d_tl.model import build_wrn

__all__ = ["from_torch", "inflate", "load_state_dict", "LAYOUTS", "ConversionError"]


class ConversionError(ValueError):
    """A weight file or model that cannot be converted; the message names the tensor."""


# Per layout: wrn3d_tl layer name -> source prefix, for the stem, one block and the head.
LAYOUTS = {
    "robustbench": {
        "stem": "conv1", "head_bn": "bn1", "fc": "fc",
        "block": lambda g, b: f"block{g}.layer.{b - 1}",
        "parts": {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "conv2": "conv2", "shortcut": "convShortcut"},
        "conv_suffix": ".weight", "ignore": re.compile(r"^sub_block1\.|\.num_batches_tracked$"),
        "block_key": re.compile(r"^block(\d)\.layer\.(\d+)\.conv1\.weight$"), "first_group": 1,
    },
    "szagoruyko": {
        "stem": "conv0", "head_bn": "bn", "fc": "fc",
        "block": lambda g, b: f"group{g - 1}.block{b - 1}",
        "parts": {"bn1": "bn0", "conv1": "conv0", "bn2": "bn1", "conv2": "conv1", "shortcut": "convdim"},
        "conv_suffix": "", "ignore": re.compile(r"\.num_batches_tracked$"),
        "block_key": re.compile(r"^group(\d)\.block(\d+)\.conv0$"), "first_group": 0,
    },
}
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}


# ------------------------------------------------------------------ reading
def load_state_dict(source):
    """``{name: float32 numpy array}`` from a ``.pt``/``.pth`` file (PyTorch needed), an
    ``.npz`` file, or a mapping of names to arrays/tensors. Wrappers ``{"state_dict": ...}``,
    ``{"params": ...}`` (with BN statistics in ``"stats"``, as szagoruyko's older runs save
    them) and a ``module.`` prefix (DataParallel) are unwrapped."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path!r} does not exist")
        if path.lower().endswith(".npz"):
            try:
                with np.load(path, allow_pickle=False) as f:
                    source = {k: f[k] for k in f.files}
            except (ValueError, OSError) as e:
                raise ConversionError(f"{path!r} is not a readable .npz file: {e}") from e
        else:
            source = _torch_load(path)
    if not isinstance(source, dict):
        raise ConversionError(f"expected a mapping of tensor names to arrays, got {type(source).__name__}")
    if isinstance(source.get("params"), dict) and isinstance(source.get("stats"), dict):
        source = {**source["params"], **source["stats"]}  # szagoruyko's older runs keep BN statistics apart
    else:
        for wrapper in ("state_dict", "params", "model"):
            if isinstance(source.get(wrapper), dict):
                source = source[wrapper]
                break
    out = {}
    for key, value in source.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy()
        out[key[len("module."):] if key.startswith("module.") else key] = np.asarray(value, np.float32)
    return out


def _torch_load(path):
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path!r} needs PyTorch (pip install 'wrn3d_tl[torch]', or torch itself); "
                          "an .npz of the state dict needs nothing more") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a foreign or damaged file
        raise ConversionError(f"{path!r} is not a PyTorch weights file torch.load(weights_only=True) can read: "
                              f"{' '.join(str(e).split())[:300]}") from e


def _detect(state, layout):
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ConversionError(f"layout must be 'auto' or one of {sorted(LAYOUTS)}, got {layout!r}")
        return layout
    found = [name for name, spec in LAYOUTS.items() if spec["stem"] + spec["conv_suffix"] in state
             and any(spec["block_key"].match(k) for k in state)]
    if len(found) != 1:
        raise ConversionError("cannot tell the layout of these weights (keys like "
                              f"{sorted(state)[:4]}...); pass layout='robustbench' or 'szagoruyko'")
    return found[0]


def _infer_config(state, spec, input_shape):
    blocks = {}
    for key in state:
        m = spec["block_key"].match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    groups = sorted(blocks)
    first = spec["first_group"]
    if groups != [first, first + 1, first + 2] or len({len(b) for b in blocks.values()}) != 1:
        raise ConversionError(f"expected 3 groups of equally many blocks, found groups {groups} with "
                              f"{[len(blocks[g]) for g in groups]} blocks")
    n = len(blocks[first])
    stem = state[spec["stem"] + spec["conv_suffix"]]
    width = state[spec["block"](1, 1) + "." + spec["parts"]["conv1"] + spec["conv_suffix"]].shape[0]
    if width % GROUP_WIDTHS[0]:
        raise ConversionError(f"group 1 has {width} channels, not a multiple of {GROUP_WIDTHS[0]}")
    classes = state[spec["fc"] + ".weight"].shape[0]
    shape = tuple(input_shape)
    if shape[-1] != stem.shape[1]:
        raise ConversionError(f"input_shape {shape} has {shape[-1]} channels, the weights' stem takes {stem.shape[1]}")
    return WRNConfig(depth=6 * n + 4, widen_factor=width // GROUP_WIDTHS[0], num_classes=classes, input_shape=shape,
                     padding="symmetric")


def _source_names(config, spec):
    """wrn3d_tl variable name -> (source key, kind) for every variable of ``config``."""
    names = {f"{STEM}/kernel": (spec["stem"] + spec["conv_suffix"], "conv")}
    for b in config.blocks():
        base = spec["block"](b.group, b.index)
        for part in ("bn1", "conv1", "bn2", "conv2") + (("shortcut",) if b.projection else ()):
            src = f"{base}.{spec['parts'][part]}"
            if part.startswith("bn"):
                names.update({f"{b.name}/{part}/{v}": (f"{src}.{t}", "bn") for v, t in _BN.items()})
            else:
                names[f"{b.name}/{part}/kernel"] = (src + spec["conv_suffix"], "conv")
    names.update({f"{HEAD_BN}/{v}": (f"{spec['head_bn']}.{t}", "bn") for v, t in _BN.items()})
    names[f"{HEAD_LOGITS}/weights"] = (spec["fc"] + ".weight", "fc")
    names[f"{HEAD_LOGITS}/biases"] = (spec["fc"] + ".bias", "bias")
    return names


def _to_tf(array, kind):
    if kind == "conv":
        return np.transpose(array, (2, 3, 1, 0))
    if kind == "fc":
        return array.T
    return array


def from_torch(source, *, layout="auto", input_shape=(32, 32, 3)):
    """A 2D ``build_wrn`` model holding the weights of a PyTorch WRN (BN moving statistics
    included). Depth, widening factor and classes come from the tensors; the model is
    built with ``padding="symmetric"`` (Torch's). Input NHWC ``(N,) + input_shape``.

    Args:
        source: a ``.pt``/``.pth`` path (``torch.save``; needs PyTorch), an ``.npz`` path or
            a dict of name -> array (see ``load_state_dict``).
        layout: "auto", "robustbench" (also xternalz/WideResNet-pytorch) or "szagoruyko".
        input_shape: (H, W, C) of one image.

    Strict: a missing, unexpected or mis-shaped tensor raises ``ConversionError`` naming it.
    """
    state = load_state_dict(source)
    spec = LAYOUTS[_detect(state, layout)]
    config = _infer_config(state, spec, input_shape)
    if spec["fc"] + ".bias" not in state:  # RobustBench's bias_last=False: a head without bias is a zero bias
        state[spec["fc"] + ".bias"] = np.zeros(config.num_classes, np.float32)
    names = _source_names(config, spec)
    unexpected = sorted(k for k in set(state) - {src for src, _ in names.values()} if not spec["ignore"].search(k))
    if unexpected:
        raise ConversionError(f"unexpected tensor {unexpected[0]!r} in the weights (all unexpected: {unexpected}); "
                              f"it has no place in a {config.name}")
    model = build_wrn(config)
    values = []
    for var in model.all_weights:
        src, kind = names[variable_name(var)]
        if src not in state:
            raise ConversionError(f"missing tensor {src!r} (for {variable_name(var)}) in the weights of a "
                                  f"{config.name}")
        value = _to_tf(state[src], kind)
        if value.shape != tuple(var.shape):
            raise ConversionError(f"tensor {src!r} has shape {state[src].shape}; {variable_name(var)} needs "
                                  f"{tuple(var.shape)} after the layout change")
        values.append(value)
    for var, value in zip(model.all_weights, values):
        var.assign(value)
    return model


# ---------------------------------------------------------------- inflation
def _source_model(source):
    return resolve(source, "inflate's model_2d").model


def inflate(model_2d, *, volume_depth, mode="centre", depth_kernel=3, in_channels=None, num_classes=None,
            group_strides=None):
    """A 3D ``build_wrn`` model (input NDHWC ``(N, volume_depth, H, W, C)``) from a 2D one.

    Args:
        model_2d: a 2D ``build_wrn``/``from_torch`` model or a wrn3d_tl checkpoint path.
        volume_depth: D of the 3D input.
        mode: "centre" (each 3x3 kernel becomes 3x3x3 with the 2D kernel in the middle
            depth slice and zeros elsewhere: a volume of one image repeated gives the 2D
            model's logits, at any depth, with any depth strides) or "mean" (I3D: the kernel
            repeated over depth and divided by 3: on a depth-constant volume, slices whose
            depth receptive field stays inside the volume reproduce the 2D activations;
            zero padding at the first and last slice scales those by 2/3, so logits differ).
        depth_kernel: 3, the network's (its convolutions are 3 on every axis).
        in_channels: None (the source's) or 1: the stem kernel summed over its input
            channels, so a grey volume gives the logits of the RGB model on that grey
            repeated in three channels.
        num_classes: None (the source's head) or K: a fresh He-initialised head with K
            outputs; everything else carried over.
        group_strides: per-group strides of the 3D network (default: the source's on H, W
            and the same on depth; ``(1, (1, 2, 2), (1, 2, 2))`` keeps the depth).

    BN statistics and parameters and the head's batch norm are copied unchanged.
    """
    src = _source_model(model_2d)
    cfg = src.wrn_config
    if cfg.spatial_rank != 2:
        raise ValueError(f"inflate needs a 2D model, got {cfg.name} on input {cfg.input_shape}")
    if mode not in ("centre", "mean"):
        raise ValueError(f"mode must be 'centre' or 'mean', got {mode!r}")
    if depth_kernel != 3:
        raise ValueError(f"depth_kernel must be 3 (the network's convolutions are 3 on every axis), got {depth_kernel}")
    if in_channels not in (None, 1):
        raise ValueError(f"in_channels must be None (the source's {cfg.input_shape[-1]}) or 1, got {in_channels!r}")
    channels = cfg.input_shape[-1] if in_channels is None else 1
    strides = group_strides or tuple((s[0],) + s for s in cfg.group_strides)
    cfg3 = WRNConfig(depth=cfg.depth, widen_factor=cfg.widen_factor, num_classes=num_classes or cfg.num_classes,
                     input_shape=(int(volume_depth),) + cfg.input_shape[:-1] + (channels,), dropout=cfg.dropout,
                     group_strides=strides, bn_decay=cfg.bn_decay, bn_epsilon=cfg.bn_epsilon, sync_bn=cfg.sync_bn,
                     padding=cfg.padding)
    model = build_wrn(cfg3)
    source = {variable_name(v): v.numpy() for v in src.all_weights}
    fresh_head = num_classes is not None and num_classes != cfg.num_classes
    for var in model.all_weights:
        name = variable_name(var)
        if fresh_head and name.startswith(f"{HEAD_LOGITS}/"):
            continue  # build_wrn's initialisation: He-normal weights, zero biases
        value = source[name]
        if value.ndim == 4:  # a conv kernel (kh, kw, C_in, C_out) -> (kd, kh, kw, C_in, C_out)
            if name == f"{STEM}/kernel" and in_channels == 1:
                value = value.sum(axis=2, keepdims=True)
            value = _inflate_kernel(value, mode)
        var.assign(value)
    return model


def _inflate_kernel(kernel, mode):
    if kernel.shape[0] == 1:  # 1x1 shortcut: 1x1x1
        return kernel[None]
    if mode == "centre":
        out = np.zeros((3,) + kernel.shape, kernel.dtype)
        out[1] = kernel
        return out
    return np.repeat(kernel[None], 3, axis=0) / 3.0
