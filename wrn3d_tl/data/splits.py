"""Splitting labelled samples and weighing their classes.

``stratified_split`` holds out the same fraction of every class, chosen by a seed;
``balanced_class_weights`` is scikit-learn's ``compute_class_weight("balanced")``:
``n_samples / (n_classes * count[c])``, so that every class weighs as much in the loss.
"""

import numpy as np

from wrn3d_tl.validate import check_int

__all__ = ["stratified_split", "class_counts", "balanced_class_weights"]


def _labels(labels, what="labels"):
    y = np.asarray(labels)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise ValueError(f"{what} must be a 1-D array of integer class labels, got shape {y.shape} {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{what} must be >= 0, got {int(y.min())}")
    return y.astype(np.int64)


def stratified_split(labels, fraction, *, seed=0):
    """``(keep, held_out)``: sorted int64 index arrays into ``labels`` ((N,) ints), disjoint,
    together every index once. From each class ``round(fraction * count)`` samples are held
    out (at least one when the class has two or more, never all of a class), chosen by a
    permutation drawn from ``seed``: the same labels and seed give the same split.
    ValueError for a fraction outside (0, 1) or a split that holds out nothing."""
    y = _labels(labels)
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    held = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = min(len(members) - 1, max(1 if len(members) > 1 else 0, int(fraction * len(members) + 0.5)))
        held.append(rng.permutation(members)[:k])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    if held.size == 0:
        raise ValueError(f"a {fraction:g} split of {len(y)} samples holds out nothing (every class has one sample)")
    keep = np.setdiff1d(np.arange(len(y)), held)
    return keep.astype(np.int64), held.astype(np.int64)


def class_counts(labels, num_classes):
    """int64 ``(num_classes,)``: how many of ``labels`` ((N,) ints in [0, num_classes)) fall
    in each class."""
    y = _labels(labels)
    num_classes = check_int(num_classes, "num_classes")
    if y.size and y.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got {int(y.max())}")
    return np.bincount(y, minlength=num_classes).astype(np.int64)


def balanced_class_weights(labels, num_classes):
    """float64 ``(num_classes,)``: ``N / (num_classes * count[c])`` for the labels ((N,)
    ints); a class absent from the labels is a ValueError (its weight would be infinite)."""
    counts = class_counts(labels, num_classes)
    if np.any(counts == 0):
        raise ValueError(f"balanced class weights need every class among the labels; class "
                         f"{int(np.flatnonzero(counts == 0)[0])} has none")
    return counts.sum() / (num_classes * counts.astype(np.float64))
