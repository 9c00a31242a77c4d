"""The metrics medical image classification reports, in MedMNIST's definitions: ACC, ROC AUC
(scikit-learn's ``roc_auc_score``), the confusion matrix and per-class accuracy."""

from __future__ import annotations

import numpy as np

from wrn3d_tl.validate import check_int

__all__ = ["roc_auc", "auc_per_class", "confusion_matrix", "classification_metrics"]


def _checked(y_true, scores):
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(y) or s.shape[1] < 2:
        raise ValueError(f"scores must be (N, num_classes >= 2) to match {len(y)} labels, got shape {s.shape}")
    if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= s.shape[1])):
        raise ValueError(f"labels must be integers in [0, {s.shape[1]})")
    return y.astype(np.int64), s


def auc_per_class(y_true, scores) -> np.ndarray:
    """One-vs-rest ROC AUC of each class: ``roc_auc_score(y == k, scores[:, k])``, NaN for a
    class that is absent from ``y_true`` or is all of it (AUC is undefined there)."""
    from sklearn.metrics import roc_auc_score

    y, s = _checked(y_true, scores)
    out = np.full(s.shape[1], np.nan)
    for k in range(s.shape[1]):
        positive = y == k
        if 0 < positive.sum() < len(y):
            out[k] = roc_auc_score(positive, s[:, k])
    return out


def roc_auc(y_true, scores) -> float:
    """MedMNIST's AUC. ``scores``: ``(N, K)`` class probabilities (softmax), ``y_true``:
    ``(N,)`` int labels. Binary (K = 2): ROC AUC of the class-1 score. Multi-class: the
    mean of the one-vs-rest AUCs over the classes; a class absent from ``y_true`` has no
    AUC and is left out of the mean (NaN when no class has one)."""
    return _auc_of(auc_per_class(y_true, scores))


def _auc_of(per_class):
    """:func:`roc_auc` from the per-class AUCs (binary: class 1's)."""
    if len(per_class) == 2:
        return float(per_class[1])
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def confusion_matrix(y_true, y_pred, num_classes) -> np.ndarray:
    """int64 ``(K, K)``: row = true class, column = predicted class."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    check_int(num_classes, "num_classes")
    if t.ndim != 1 or t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of the same length, got shapes {t.shape} and {p.shape}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must hold integers in [0, {num_classes}), got dtype {a.dtype}")
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (t.astype(np.int64), p.astype(np.int64)), 1)
    return counts


def classification_metrics(y_true, scores) -> dict:
    """``accuracy`` (argmax = label; for K = 2 the same as MedMNIST's class-1 score > 0.5),
    ``auc`` (:func:`roc_auc`), ``auc_per_class``, ``confusion_matrix`` (list of rows) and
    ``per_class_accuracy`` (recall of each class; NaN for an absent class), as Python values."""
    y, s = _checked(y_true, scores)
    counts = confusion_matrix(y, np.argmax(s, axis=1), s.shape[1])
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(counts) / np.maximum(support, 1), np.nan)
    per_class = auc_per_class(y, s)
    return {"accuracy": float(np.trace(counts) / max(len(y), 1)), "auc": _auc_of(per_class),
            "auc_per_class": [float(v) for v in per_class],
            "confusion_matrix": counts.tolist(), "per_class_accuracy": [float(v) for v in recall]}
