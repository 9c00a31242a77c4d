"""What one evaluation writes: the confusion matrix and ROC figures and ``metrics.json``.

    from wrn3d_tl.evaluation import evaluation_report
    paths = evaluation_report(y_true, probabilities, "runs/eval")       # confusion.png, roc.png, metrics.json
    result = trainer.evaluate(report_dir="runs/eval")                     # the same, from the trainer

Below training and inference in the data flow (it reads labels and probabilities, never a
model): ``Trainer.evaluate`` and ``wrn3d_tl.report``'s run page both use it. Figures are
drawn on matplotlib ``Figure`` objects (no pyplot): the caller's backend and figures are
left alone. Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from matplotlib.figure import Figure

from wrn3d_tl import metrics
from wrn3d_tl.files import save_figure, written_atomically

__all__ = ["evaluation_report", "check_labels_and_probabilities", "class_name_list", "json_safe", "output_folder",
           "confusion_figure", "roc_figure", "CONFUSION_PNG", "ROC_PNG", "METRICS_JSON"]

CONFUSION_PNG, ROC_PNG, METRICS_JSON = "confusion.png", "roc.png", "metrics.json"
MAX_CELL_NUMBERS = 25    # classes up to which the confusion matrix prints numbers in its cells
MAX_ROC_LEGEND = 12      # classes up to which each one-vs-rest curve has its own legend entry


# ------------------------------------------------------------------ checks
def check_labels_and_probabilities(y_true, probabilities):
    y = np.asarray(y_true)
    p = np.asarray(probabilities)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class labels, got shape {np.shape(y_true)}")
    if p.ndim != 2 or p.shape[0] != len(y) or p.shape[1] < 2:
        raise ValueError(f"probabilities must be (N, num_classes >= 2) with N = {len(y)} (y_true's length), "
                         f"got shape {np.shape(probabilities)}")
    if p.dtype.kind not in "iuf" or not np.isfinite(p).all():
        raise ValueError(f"probabilities must be finite real numbers, got dtype {p.dtype}"
                         + ("" if p.dtype.kind not in "iuf" else " with NaN or Inf"))
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)                       # 0.0/1.0 labels read from a float file
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true must hold integer labels in [0, {p.shape[1]}) (probabilities has {p.shape[1]} "
                         f"columns), got dtype {y.dtype}" + (f", values {y.min()}..{y.max()}"
                                                            if y.dtype.kind in "iuf" else ""))
    return y.astype(np.int64), p.astype(np.float64)


def class_name_list(class_names, k):
    if class_names is None:
        return [str(i) for i in range(k)]
    names = [str(c) for c in class_names] if not isinstance(class_names, str) else None
    if names is None or len(names) != k:
        raise ValueError(f"class_names must be {k} names (one per column of probabilities), got {class_names!r}")
    return names


def json_safe(value):
    """NaN/Inf -> None (JSON null), numpy scalars and arrays -> Python values."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def output_folder(out_dir, name="out_dir"):
    try:
        path = os.fspath(out_dir)
    except TypeError:
        raise TypeError(f"{name} must be a folder path, got {type(out_dir).__name__}") from None
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a file, not a folder")
    os.makedirs(path, exist_ok=True)
    return path


# ------------------------------------------------------------- evaluation
def confusion_figure(counts, names, title):
    k = len(names)
    support = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(support > 0, counts / np.maximum(support, 1), np.nan)
    side = min(max(4.0, 0.45 * k + 2.0), 24.0)
    fig = Figure(figsize=(2 * side + 1.0, side + (0.5 if title else 0.0)))
    axes = fig.subplots(1, 2)
    ticks = np.arange(k) if k <= 40 else np.arange(0, k, math.ceil(k / 40))
    for ax, values, what, fmt in ((axes[0], counts, "counts", "{:d}"),
                                  (axes[1], fractions, "row-normalised (recall on the diagonal)", "{:.2f}")):
        top = np.nanmax(values) if np.isfinite(values).any() and np.nanmax(values) > 0 else 1
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top if values is counts else 1, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(what)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels([names[i] for i in ticks], rotation=45 if max(map(len, names)) > 3 else 0, ha="right"
                           if max(map(len, names)) > 3 else "center", fontsize=8 if k > 10 else 10)
        ax.set_yticklabels([names[i] for i in ticks], fontsize=8 if k > 10 else 10)
        if k <= MAX_CELL_NUMBERS:
            for i in range(k):
                for j in range(k):
                    v = values[i, j]
                    text = "–" if not np.isfinite(v) else fmt.format(int(v) if values is counts else v)
                    dark = np.isfinite(v) and v > 0.55 * top
                    ax.text(j, i, text, ha="center", va="center", fontsize=9 if k <= 10 else 7,
                            color="white" if dark else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def roc_figure(y, p, names, auc_per_class, title):
    from sklearn.metrics import roc_curve

    k = p.shape[1]
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    drawn = 0
    if k == 2:
        classes = [1]
    else:
        classes = [c for c in range(k) if 0 < np.sum(y == c) < len(y)]   # AUC defined: present, not all
    many = len(classes) > MAX_ROC_LEGEND
    for c in classes:
        positive = y == c
        if not 0 < positive.sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        name = f"class {names[c]}" if names[c].isdigit() else names[c]
        label = f"{name} (AUC {auc_per_class[c]:.3f})"
        ax.plot(fpr, tpr, linewidth=1 if many else 2, alpha=0.6 if many else 1, label=None if many else label)
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "ROC undefined: y_true holds a single class", ha="center", va="center")
    elif many:
        ax.plot([], [], color="C0", label=f"{drawn} one-vs-rest curves, mean AUC "
                                          f"{np.nanmean([auc_per_class[c] for c in classes]):.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or ("ROC" if k == 2 else "ROC, one-vs-rest per class"))
    ax.legend(loc="lower right", fontsize=8 if drawn > 5 else 10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def evaluation_report(y_true, probabilities, out_dir, *, class_names=None, title=None):
    """Write the pictures and numbers of one evaluation into ``out_dir`` (created).

    Args:
      y_true: ``(N,)`` integer labels in ``[0, K)``.
      probabilities: ``(N, K)`` class probabilities (softmax), K >= 2.
      out_dir: the folder to write into.
      class_names: K names for the axes and legends (default ``"0"``..``"K-1"``).
      title: a title over the confusion figure.

    Writes ``confusion.png`` (counts and row-normalised fractions, rows = true class, numbers
    in the cells up to 25 classes), ``roc.png`` (binary: the ROC of the class-1 probability;
    multi-class: one one-vs-rest curve per class whose AUC is defined, AUC in the legend) and
    ``metrics.json`` (``wrn3d_tl.metrics.classification_metrics`` plus ``samples`` and
    ``class_names``; NaN as null). Returns ``{"confusion", "roc", "metrics"}`` -> path.
    ValueError names the argument that does not fit.
    """
    y, p = check_labels_and_probabilities(y_true, probabilities)
    names = class_name_list(class_names, p.shape[1])
    out = output_folder(out_dir)
    numbers = metrics.classification_metrics(y, p)
    numbers.update(samples=int(len(y)), class_names=None if class_names is None else names)
    paths = {"confusion": os.path.join(out, CONFUSION_PNG), "roc": os.path.join(out, ROC_PNG),
             "metrics": os.path.join(out, METRICS_JSON)}
    counts = np.asarray(numbers["confusion_matrix"], np.int64)
    save_figure(confusion_figure(counts, names, title), paths["confusion"], dpi=90)
    save_figure(roc_figure(y, p, names, numbers["auc_per_class"], None), paths["roc"], dpi=90)
    with written_atomically(paths["metrics"]) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(numbers), f, indent=1, allow_nan=False)
        f.write("\n")
    return paths
