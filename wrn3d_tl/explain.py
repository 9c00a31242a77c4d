"""Where in a volume the evidence for a class lies: Grad-CAM maps and slice montages.

    from wrn3d_tl.explain import grad_cam, save_montage
    cams = grad_cam("runs/last.h5", volumes)          # (N, D, H, W) float32 in [0, 1]
    save_montage(volumes[0], "cam0.png", cam=cams[0])  # slices along depth, CAM as a heat overlay

    wrn3d-explain --checkpoint c.h5 --hdf5|--npy|--nifti INPUT --out DIR [--indices 0,5] [--class K]
    wrn3d-explain --checkpoint c.h5 --nifti scans.csv --out DIR --nifti-out DIR  # maps a viewer overlays

Grad-CAM (Selvaraju et al., ICCV 2017): the gradient of the class logit with respect to a
feature map, averaged over space, weights that map's channels; their weighted sum, through a
ReLU, is the class's map, upsampled (linearly) to the input's spatial shape and divided by
its maximum. The default feature map is group3's output after the head's BN-ReLU: the last
map before global pooling, so for it Grad-CAM equals CAM (Zhou et al., CVPR 2016).

A map of a scan read from a file can go back onto the scan's own grid
(:func:`save_cam_nifti`): a NIfTI file with the scan's shape and affine, which ITK-SNAP,
3D Slicer or FSLeyes overlay on the scan with no manual alignment.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from wrn3d_tl.config import GROUPS, HEAD_BN
from wrn3d_tl.files import save_figure, written_atomically
from wrn3d_tl.predict import as_predictor

__all__ = ["grad_cam", "cam_layers", "save_montage", "montage_slices", "write_cam_montages", "save_cam_nifti"]

DEFAULT_LAYER = HEAD_BN


def cam_layers(config):
    """The feature maps ``grad_cam`` can use: ``"stem/conv"``, every block
    (``"group2/block1"``), ``"group1"``..``"group3"`` (a group's last block) and
    ``"head/bn"`` (group3 after BN-ReLU, the default)."""
    names = config.feature_layers()
    groups = {GROUPS[b.group - 1]: b.name for b in config.blocks()}
    return names, groups


def _split(model, config, layer):
    """The model's layers as ``(front, back)`` around the output of ``layer``."""
    names, groups = cam_layers(config)
    target = groups.get(layer, layer)
    if target not in names:
        raise ValueError(f"layer must be one of {names} or a group name {sorted(groups)}, got {layer!r}")
    chain = list(model.all_layers)
    order = [lay.name for lay in chain]
    if target not in order:  # a model not built by build_wrn's chain
        raise ValueError(f"layer {target!r} is not among the model's layers {order}")
    i = order.index(target) + 1
    return chain[:i], chain[i:]


def _resize(cam, spatial):
    """Linear upsampling of (N,) + small spatial maps to (N,) + ``spatial``."""
    import tensorflow as tf

    x = cam[..., None]
    if len(spatial) == 2:
        return tf.image.resize(x, spatial)[..., 0]
    n, d, h, w = tf.unstack(tf.shape(cam))
    x = tf.reshape(x, tf.stack([n * d, h, w, 1]))
    x = tf.image.resize(x, spatial[1:])                                    # H, W per slice
    x = tf.reshape(x, tf.stack([n, d, spatial[1] * spatial[2], 1]))
    x = tf.image.resize(x, (spatial[0], spatial[1] * spatial[2]))          # then depth
    return tf.reshape(x, (-1,) + tuple(spatial))


def grad_cam(model, volumes, *, class_index=None, layer=None, batch_size=16, preprocessed=False):
    """Grad-CAM maps of a WRN for a batch of volumes (or images).

    Args:
      model: a ``build_wrn`` model (inputs already normalised), a ``Trainer`` or a
        checkpoint path (raw inputs: the stored normalisation is applied, as in ``predict``),
        or a ``wrn3d_tl.predict.Predictor``.
      volumes: ``(N,) + input_shape`` array-like: NDHWC for 3D models, NHWC for 2D, raw
        as for ``predict``: a checkpoint's stored reading (per-volume intensity step,
        crop/pad) is applied to arrays first, so any spatial shape is accepted when it
        crops/pads; the maps then align with the volumes AFTER the reading.
      preprocessed: True when the arrays had the reading applied already.
      class_index: None (each volume's predicted class), an int, or an ``(N,)`` int array.
      layer: the feature map (see :func:`cam_layers`); None: ``"head/bn"``.
      batch_size: volumes per compiled call.

    Returns:
      float32 ``(N, D, H, W)`` (3D) or ``(N, H, W)`` (2D), each map in ``[0, 1]`` (all zero
      when no location supports the class), in input order.

    Inference mode (moving BN statistics, no dropout); the weights and statistics are not
    changed. Deterministic. Raises ValueError for a bad shape, NaN/Inf input, a class index
    outside ``[0, num_classes)`` or an unknown layer.
    """
    predictor = as_predictor(model)
    config = predictor.config
    front, back = _split(predictor.model, config, DEFAULT_LAYER if layer is None else layer)
    reading = predictor.array_reading(volumes, preprocessed)
    n = predictor.check_volumes(volumes, reading=reading)[0]
    if class_index is None:
        wanted = np.full(n, -1, np.int64)
    else:
        wanted = np.asarray(class_index)
        wanted = np.broadcast_to(wanted, (n,)) if wanted.ndim == 0 else wanted  # dtype kept: 1.5 is refused
        if wanted.shape != (n,) or wanted.dtype.kind not in "iu":
            raise ValueError(f"class_index must be None, an int or {n} ints, got {np.shape(class_index)} "
                             f"{np.asarray(class_index).dtype}")
        wanted = wanted.astype(np.int64)
        if wanted.min() < 0 or wanted.max() >= config.num_classes:
            raise ValueError(f"class_index must be in [0, {config.num_classes}), got values from {wanted.min()} "
                             f"to {wanted.max()}")
    mean, std = predictor.normalization_arrays()
    spatial = tuple(config.input_shape[:-1])
    axes = tuple(range(1, len(spatial) + 1))
    fn = _compiled(predictor, front, back, mean, std, spatial, axes)
    out = np.empty((n,) + spatial, np.float32)
    mode = predictor.model.is_train
    layer_modes = [(lay, lay.is_train) for lay in _layer_tree(predictor.model.all_layers)]
    predictor.model.is_train = False
    predictor.model._set_mode_for_layers(False)  # direct layer calls read each layer's mode
    try:
        for start, x in predictor.batches(volumes, batch_size, reading=reading):
            out[start:start + len(x)] = fn(x, wanted[start:start + len(x)]).numpy()
    finally:
        # back to the model's own setting (None: the mode comes with each call's is_train);
        # TensorLayer refuses model(x, is_train=True) on a model left in eval()
        predictor.model.is_train = mode
        for lay, lay_mode in layer_modes:      # eval() left every layer in eval; model.train() would not show it
            lay.is_train = lay_mode
    return out


def _layer_tree(layers):
    """Every layer, with the sublayers of composite ones (the wide basic blocks)."""
    for lay in layers:
        yield lay
        yield from _layer_tree(getattr(lay, "_layers", None) or [])


def _compiled(predictor, front, back, mean, std, spatial, axes):
    """One tf.function per (predictor, layer), kept on the predictor."""
    import tensorflow as tf

    from wrn3d_tl.model import graph_function

    key = tuple(lay.name for lay in back[:1])
    cache = predictor.__dict__.setdefault("_cam_fns", {})
    if key in cache:
        return cache[key]
    spec = (tf.TensorSpec((None,) + predictor.config.input_shape, tf.float32), tf.TensorSpec((None,), tf.int64))

    @graph_function(input_signature=spec)
    def fn(x, wanted):
        h = x if mean is None else (x - mean) / std
        for lay in front:
            h = lay(h)
        with tf.GradientTape() as tape:
            tape.watch(h)
            logits = h
            for lay in back:
                logits = lay(logits)
            logits = tf.cast(logits, tf.float32)
            cls = tf.where(wanted < 0, tf.argmax(logits, -1), wanted)
            score = tf.reduce_sum(tf.gather(logits, cls, batch_dims=1))
        grads = tf.cast(tape.gradient(score, h), tf.float32)
        feats = tf.cast(h, tf.float32)
        weights = tf.reduce_mean(grads, axis=axes, keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feats, axis=-1))
        cam = tf.nn.relu(_resize(cam, spatial))
        peak = tf.reduce_max(cam, axis=axes, keepdims=True)
        return tf.math.divide_no_nan(cam, peak)

    cache[key] = fn
    return fn


# ------------------------------------------------------------------- montages
def montage_slices(length, slices=None, most=16):
    """The slice indices a montage shows: ``slices`` as given, else every k-th of
    ``range(length)`` with k chosen so that at most ``most`` tiles remain."""
    if slices is not None:
        idx = [int(i) for i in slices]
        bad = [i for i in idx if not 0 <= i < length]
        if bad or not idx:
            raise ValueError(f"slices must be indices in [0, {length}), got {list(slices)}")
        return idx
    step = max(1, -(-length // most))
    return list(range(0, length, step))


def _display(volume):
    """float32 (..., 1 or 3) in [0, 1] for imshow: channel 0 in grey, or RGB for 3 channels."""
    v = np.asarray(volume, np.float32)
    v = v[..., :3] if v.shape[-1] == 3 else v[..., :1]
    lo, hi = np.nanmin(v), np.nanmax(v)
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def save_montage(volume, path, *, cam=None, axis=0, slices=None, cols=None, title=None, alpha=0.7):
    """Write a PNG grid of slices of one volume, with a Grad-CAM overlay when ``cam`` is given.

    Args:
      volume: ``(D, H, W, C)`` (or one ``(H, W, C)`` image); channel 0 is drawn in grey, or
        channels 0-2 as RGB when C == 3, scaled to the volume's min..max.
      path: the PNG file (its folder is created).
      cam: ``(D, H, W)`` (or ``(H, W)``) map in [0, 1], drawn as a heat map whose opacity
        grows with the value (``alpha * sqrt(cam)``: ``alpha`` at 1, none at 0).
      axis: the spatial axis the slices cut along (0: depth, 1: height, 2: width).
      slices: which slice indices; default every k-th, at most 16 tiles.
      cols: tiles per row (default: about square). ``title``: the figure's title.

    Each tile is labelled with its slice index. Uses matplotlib's object API (no pyplot, no
    backend switch). Returns ``path``.
    """
    from matplotlib.figure import Figure

    v = np.asarray(volume)
    single = v.ndim == 3
    if single:                            # one image: a single tile
        v, axis = v[None], 0
    if v.ndim != 4:
        raise ValueError(f"volume must be (D, H, W, C) or (H, W, C), got shape {np.shape(volume)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (D, H, W), got {axis!r}")
    if cam is not None:
        cam = np.asarray(cam, np.float32).reshape(v.shape[:3])
    idx = montage_slices(v.shape[axis], slices)
    cols = cols or int(np.ceil(np.sqrt(len(idx))))
    rows = -(-len(idx) // cols)
    shown = _display(v)
    fig = Figure(figsize=(2.2 * cols, 2.2 * rows + (0.4 if title else 0)))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, i in zip(axes, idx):
        tile = np.take(shown, i, axis=axis)
        ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        if cam is not None:   # opacity grows with the map: where it is 0 the slice shows unchanged
            heat = np.take(cam, i, axis=axis)
            ax.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=alpha * np.sqrt(np.clip(heat, 0, 1)),
                      interpolation="bilinear")
        if not single:
            ax.set_title(f"{'DHW'[axis]}={i}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


# ------------------------------------------------------------------- on the scan
def save_cam_nifti(cam, scan, reading, path):
    """Write a Grad-CAM map as a NIfTI file on the grid of the scan it explains.

    Args:
      cam: float ``(D, H, W)``, a map on the network's input grid, i.e. of the volume
        ``scan`` became through ``reading`` (as :func:`grad_cam` returns it).
      scan: the ``.nii``/``.nii.gz`` file or DICOM series folder that was read.
      reading: the reading it was read with (``Predictor.nifti_reading()``, a
        ``NiftiVolumes.reading``): orientation, spacing and crop/pad place the network's
        grid in the world.
      path: the output file (``.nii.gz`` or ``.nii``), written atomically.

    The map is resampled linearly from the network's grid onto the scan's voxels (0 where
    the network saw padding or nothing of the scan) and saved as float32 with the scan's
    shape ``(i, j, k)``, affine and (NIfTI scans) header, its qform and sform codes
    included. Returns ``path``.
    """
    import nibabel as nib

    from wrn3d_tl.data.geometry import to_scan_grid
    from wrn3d_tl.data.nifti import scan_grids

    cam = np.asarray(cam, np.float32)
    scan_shape, scan_affine, grid, grid_affine = scan_grids(scan, reading)
    if cam.shape != tuple(grid):
        raise ValueError(f"cam: shape {cam.shape} is not the network grid {tuple(grid)} of {os.fspath(scan)!r} "
                         f"read with {reading}")
    # the scan's own header where it has one: its qform/sform codes too, so that a viewer
    # preferring either places the map where it places the scan
    header = None if os.path.isdir(scan) else nib.load(os.fspath(scan)).header.copy()
    image = nib.Nifti1Image(to_scan_grid(cam, grid_affine, scan_shape, scan_affine), scan_affine, header=header)
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(1.0, 0.0)
    image.header.set_xyzt_units("mm")
    data = image.to_bytes()
    if os.fspath(path).lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    with written_atomically(path, makedirs=True) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def _scan_stem(path):
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


# ------------------------------------------------------------------ many montages
def write_cam_montages(model, volumes, out_dir, *, indices=None, class_index=None, layer=None, axis=0,
                       batch_size=16, names=None, preprocessed=False, nifti_out=None):
    """Grad-CAM montages of chosen volumes, one PNG each: ``{out_dir}/{index}_{class}.png``.

    ``model``: as for :func:`grad_cam`. ``volumes``: an array-like ``(N,) + input_shape``
    (numpy, memmap, ``h5py.Dataset``, ``NiftiVolumes``), raw as for ``grad_cam`` (the
    stored reading is applied unless ``preprocessed``; the montage shows the volume after
    it). ``indices``: which volumes (default all); ``class_index``: None (each volume's
    predicted class), an int, or one class per volume of ``volumes``. ``names``: class
    names for the titles (default: the checkpoint's, else "class K"). Titles name the file
    of each volume where it is known (``NiftiVolumes``). Volumes are read ``batch_size`` at
    a time. ``nifti_out``: also write each map onto its scan's grid
    (:func:`save_cam_nifti`) as ``{nifti_out}/{index}_{class}_{scan name}.nii.gz``; needs
    ``NiftiVolumes``. Returns the written paths (montages, then per volume its map).
    """
    from wrn3d_tl.data.reading import apply_reading
    predictor = as_predictor(model)
    names = predictor.class_names if names is None else names
    reading = predictor.array_reading(volumes, preprocessed)
    files = getattr(getattr(volumes, "info", None), "paths", None)
    if nifti_out is not None and files is None:
        raise ValueError(f"nifti_out={os.fspath(nifti_out)!r} needs scans read from files (NiftiVolumes, "
                         "wrn3d-explain --nifti): an array has no affine to put the maps on")
    n = predictor.check_volumes(volumes, reading=reading)[0]
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices must be in [0, {n}), got {bad[:5]}")
    if class_index is not None and np.ndim(class_index):
        class_index = np.asarray(class_index)
        if class_index.shape != (n,):
            raise ValueError(f"class_index must be None, an int or {n} ints, got shape {class_index.shape}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        x = np.stack([np.asarray(volumes[i], np.float32) for i in chunk])
        x = x if reading is None else apply_reading(x, reading)
        if class_index is None:
            cls = predictor.predict(x, batch_size=batch_size, preprocessed=True)["class"]
        elif np.ndim(class_index):
            cls = class_index[chunk]
        else:
            cls = np.full(len(chunk), int(class_index))
        cams = grad_cam(predictor, x, class_index=cls, layer=layer, batch_size=batch_size, preprocessed=True)
        for i, volume, cam, c in zip(chunk, x, cams, cls):
            label = names[int(c)] if names else f"class {int(c)}"
            path = os.path.join(out_dir, f"{i}_{int(c)}.png")
            what = os.path.basename(files[i]) if files else f"volume {i}"
            save_montage(volume, path, cam=cam, axis=axis, title=f"{what}: Grad-CAM of {label}")
            paths.append(path)
            if nifti_out is not None:
                paths.append(save_cam_nifti(cam, files[i], volumes.reading, os.path.join(
                    nifti_out, f"{i}_{int(c)}_{_scan_stem(files[i])}.nii.gz")))
    return paths
