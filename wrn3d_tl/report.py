"""Pictures of an evaluation and a one-file HTML report of a run.

    from wrn3d_tl.report import cam_gallery, evaluation_report, write_run_report
    paths = evaluation_report(y_true, probabilities, "runs/eval")       # confusion.png, roc.png, metrics.json
    result = trainer.evaluate(report_dir="runs/eval")                     # the same, from the trainer
    montages = cam_gallery(trainer.model, x, y, "runs/cams")             # Grad-CAM of right and wrong volumes
    write_run_report("runs", config=trainer.config, metrics_csv="runs/logs/metrics.csv",
                     evaluation=result["report"], montages=montages)    # runs/index.html

``index.html`` is self-contained: its pictures are embedded as base64 data URIs, it needs
no server and holds no JavaScript, so the single file can be mailed or moved. Figures are
drawn on matplotlib ``Figure`` objects (no pyplot): the caller's backend and figures are
left alone. Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os

import numpy as np
from matplotlib.figure import Figure

from wrn3d_tl import metrics
from wrn3d_tl.files import written_atomically
from wrn3d_tl.predict import as_predictor

__all__ = ["cam_gallery", "evaluation_report", "first_samples", "run_report", "write_run_report"]

CONFUSION_PNG, ROC_PNG, METRICS_JSON, CURVES_PNG, INDEX_HTML = \
    "confusion.png", "roc.png", "metrics.json", "curves.png", "index.html"
MAX_CELL_NUMBERS = 25    # classes up to which the confusion matrix prints numbers in its cells
MAX_ROC_LEGEND = 12      # classes up to which each one-vs-rest curve has its own legend entry


# ------------------------------------------------------------------ checks
def _labels_and_probabilities(y_true, probabilities):
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


def _class_names(class_names, k):
    if class_names is None:
        return [str(i) for i in range(k)]
    names = [str(c) for c in class_names] if not isinstance(class_names, str) else None
    if names is None or len(names) != k:
        raise ValueError(f"class_names must be {k} names (one per column of probabilities), got {class_names!r}")
    return names


def _json_safe(value):
    """NaN/Inf -> None (JSON null), numpy scalars and arrays -> Python values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _out_dir(out_dir, name="out_dir"):
    try:
        path = os.fspath(out_dir)
    except TypeError:
        raise TypeError(f"{name} must be a folder path, got {type(out_dir).__name__}") from None
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a file, not a folder")
    os.makedirs(path, exist_ok=True)
    return path


# ------------------------------------------------------------- evaluation
def _confusion_figure(counts, names, title):
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


def _roc_figure(y, p, names, auc_per_class, title):
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
    y, p = _labels_and_probabilities(y_true, probabilities)
    names = _class_names(class_names, p.shape[1])
    out = _out_dir(out_dir)
    numbers = metrics.classification_metrics(y, p)
    numbers.update(samples=int(len(y)), class_names=None if class_names is None else names)
    paths = {"confusion": os.path.join(out, CONFUSION_PNG), "roc": os.path.join(out, ROC_PNG),
             "metrics": os.path.join(out, METRICS_JSON)}
    counts = np.asarray(numbers["confusion_matrix"], np.int64)
    _confusion_figure(counts, names, title).savefig(paths["confusion"], dpi=90)
    _roc_figure(y, p, names, numbers["auc_per_class"], None).savefig(paths["roc"], dpi=90)
    with open(paths["metrics"], "w") as f:
        json.dump(_json_safe(numbers), f, indent=1, allow_nan=False)
        f.write("\n")
    return paths


# ------------------------------------------------------------ Grad-CAM gallery
def _count(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def cam_gallery(trainer_or_checkpoint, x, y, out_dir, *, correct=3, wrong=3, class_names=None):
    """Grad-CAM montages of the first ``correct`` correctly and first ``wrong`` wrongly
    classified volumes of ``x`` (in index order: deterministic), for a run report.

    Args:
      trainer_or_checkpoint: a ``Trainer`` or checkpoint path (``x`` raw: the stored
        normalisation is applied, as in ``wrn3d_tl.predict.predict``), a ``Predictor``, or a
        bare ``build_wrn`` model such as ``trainer.model`` (``x`` already normalised, e.g.
        batches of ``trainer.eval_data``).
      x: ``(N,) + input_shape`` volumes; y: ``(N,)`` integer labels. Raw as for ``predict``:
        a checkpoint's stored reading is applied first (the montages show the result).
      out_dir: folder for the PNGs (created).
      class_names: names of the classes for the captions (default: the checkpoint's or
        trainer's, else the class indices).

    Each map is the Grad-CAM of the predicted class (``wrn3d_tl.explain.grad_cam``): for a
    mistake, where the network saw the class it wrongly chose. Returns ``[(png_path,
    caption), ...]``, the correct ones first.
    """
    from wrn3d_tl.data.reading import apply_reading
    from wrn3d_tl.explain import grad_cam, save_montage
    from wrn3d_tl.predict import predict

    correct, wrong = _count(correct, "correct"), _count(wrong, "wrong")
    predictor = as_predictor(trainer_or_checkpoint)
    k = predictor.config.num_classes
    labels = np.asarray(y).reshape(-1) if np.ndim(y) == 2 and np.shape(y)[1] == 1 else np.asarray(y)
    reading = predictor.array_reading(x)
    n = predictor.check_volumes(x, "x", reading)[0]
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"y must be {n} integer labels in [0, {k}) (one per volume of x), got shape "
                         f"{np.shape(y)} dtype {labels.dtype}")
    names = _class_names(predictor.class_names if class_names is None else class_names, k)
    out = _out_dir(out_dir)
    pred = predict(predictor, x)
    right = pred["class"] == labels
    chosen = list(np.flatnonzero(right)[:correct]) + list(np.flatnonzero(~right)[:wrong])
    if not chosen:
        return []
    volumes = np.stack([np.asarray(x[int(i)], np.float32) for i in chosen])
    volumes = volumes if reading is None else apply_reading(volumes, reading)
    cams = grad_cam(predictor, volumes, preprocessed=True)
    gallery = []
    for volume, cam, i in zip(volumes, cams, chosen):
        i = int(i)
        t, c, prob = int(labels[i]), int(pred["class"][i]), float(pred["probability"][i])
        verdict = "correct" if t == c else "wrong"
        caption = f"volume {i}: true {names[t]}, predicted {names[c]} (p = {prob:.2f}), {verdict}"
        path = os.path.join(out, f"{i:05d}_{verdict}_true-{t}_pred-{c}.png")
        save_montage(volume, path, cam=cam, title=f"#{i} true {names[t]} / predicted {names[c]}")
        gallery.append((path, caption))
    return gallery


# --------------------------------------------------------------- HTML report
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330;
       background: #f6f7f9; margin: 0; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #ffffff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 2px solid #dfe3ea; padding-bottom: 4px; }
p.meta { color: #5b6474; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.95em; }
th, td { border: 1px solid #dfe3ea; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f1f3f7; border: 1px solid #dfe3ea; padding: 10px 12px; overflow-x: auto; font-size: 0.88em; }
img { max-width: 100%; height: auto; border: 1px solid #dfe3ea; background: #fff; }
figure { margin: 0 0 18px; }
figcaption { color: #3c4454; font-size: 0.92em; margin-top: 4px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 16px; }
.note { color: #8a5a00; background: #fff6e0; border: 1px solid #f0d9a0; padding: 6px 10px; }
.wrong figcaption { color: #a3261b; }
footer { color: #8a92a0; font-size: 0.85em; margin-top: 3em; }
"""


def _data_uri(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _figure(path, caption, alt, cls=None):
    attr = f' class="{cls}"' if cls else ""
    return (f'<figure{attr}><img src="{_data_uri(path)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows, header=None):
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for j, v in enumerate(row):
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            text = _fmt(v)
            cells.append(f'<td class="num">{text}</td>' if num else
                         (f"<th>{text}</th>" if j == 0 and not header else f"<td>{text}</td>"))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(v):
    if v is None:
        return "–"
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(v) else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return html.escape(", ".join(map(str, v)) if v else "[]")
    return html.escape(str(v))


def _as_config(config):
    from wrn3d_tl.config import WRNConfig

    if isinstance(config, WRNConfig):
        return config
    if isinstance(config, dict):
        return WRNConfig.from_dict(config)
    raise TypeError(f"config must be a WRNConfig or its to_dict(), got {type(config).__name__}")


def _evaluation_paths(evaluation):
    if evaluation is None:
        return None
    if isinstance(evaluation, dict) and isinstance(evaluation.get("report"), dict):
        evaluation = evaluation["report"]           # a Trainer.evaluate(report_dir=...) result
    if not isinstance(evaluation, dict) or "metrics" not in evaluation:
        raise ValueError("evaluation must be the dict evaluation_report returns (or an evaluate() result with "
                         f"'report'), got {evaluation!r:.200}")
    missing = [k for k in ("metrics", "confusion", "roc") if k in evaluation and not os.path.exists(evaluation[k])]
    if missing:
        raise ValueError(f"evaluation: {', '.join(f'{k} {evaluation[k]!r}' for k in missing)} does not exist")
    return evaluation


def _evaluation_section(paths):
    with open(paths["metrics"]) as f:
        m = json.load(f)
    counts = np.asarray(m["confusion_matrix"])
    k = len(counts)
    names = m.get("class_names") or [str(i) for i in range(k)]
    parts = ["<h2>Evaluation</h2>",
             _table([("samples", m.get("samples")), ("accuracy", m.get("accuracy")),
                     ("AUC" + (" (class 1)" if k == 2 else " (mean one-vs-rest)"), m.get("auc"))])]
    if "confusion" in paths:
        parts.append(_figure(paths["confusion"], "Confusion matrix: counts and row-normalised fractions "
                                                 "(rows: true class, columns: predicted class).", "confusion matrix"))
    if "roc" in paths:
        parts.append(_figure(paths["roc"], "ROC curve" + (" of the class-1 probability." if k == 2 else
                                                          "s, one class against the rest."), "ROC curves"))
    rows = [(names[i], int(counts[i].sum()), int(counts[i, i]), m["per_class_accuracy"][i], m["auc_per_class"][i])
            for i in range(k)]
    parts.append("<details open><summary>Per class</summary>"
                 + _table(rows, header=("class", "samples", "correct", "recall", "AUC (one-vs-rest)"))
                 + "</details>")
    return "\n".join(parts)


def write_run_report(out_dir, *, config, metrics_csv=None, evaluation=None, montages=(), title=None, extra=None):
    """Write ONE self-contained ``index.html`` into ``out_dir`` (created) and return its path.

    Args:
      config: the run's ``WRNConfig`` (or its ``to_dict()``): shown as a table and as
        ``wrn3d_tl.model.summary``.
      metrics_csv: the trainer's ``metrics.csv`` (``{logdir}/metrics.csv``); when it exists,
        its curves are drawn with ``wrn3d_tl.logs.plot_metrics`` into ``curves.png`` beside
        the page and embedded.
      evaluation: what ``evaluation_report`` returned (or a ``Trainer.evaluate(report_dir=...)``
        result): its numbers, confusion matrix and ROC pictures.
      montages: ``(png_path, caption)`` pairs, e.g. from :func:`cam_gallery`.
      title: the page's title (default: the config's name and "run report").
      extra: a dict of more facts about the run (data, steps, time), shown first.

    Every picture is embedded as a base64 data URI: the page needs no server, no other file
    and no JavaScript, and can be moved on its own.
    """
    config = _as_config(config)
    out = _out_dir(out_dir)
    evaluation = _evaluation_paths(evaluation)
    montages = [(os.fspath(p), str(c)) for p, c in montages]
    missing = [p for p, _ in montages if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"montages: {missing[0]!r} does not exist")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of label -> value, got {type(extra).__name__}")
    from wrn3d_tl.model import summary

    title = title or f"{config.name} {config.spatial_rank}D run report"
    parts = [f"<h1>{html.escape(title)}</h1>",
             (f'<p class="meta">{html.escape(config.name)}, input {html.escape(str(config.input_shape))} '
              f"({config.layout}), {config.num_classes} classes</p>")]
    if extra:
        parts += ["<h2>Run</h2>", _table(list(extra.items()))]
    parts += ["<h2>Network</h2>", _table(list(config.to_dict().items()), header=("WRNConfig field", "value")),
              f"<pre>{html.escape(summary(config))}</pre>"]
    parts.append("<h2>Training curves</h2>")
    if metrics_csv is not None and os.path.isfile(metrics_csv):
        from wrn3d_tl.logs import plot_metrics

        try:
            png = plot_metrics(metrics_csv, os.path.join(out, CURVES_PNG))
            parts.append(_figure(png, f"Loss and accuracy against step, from {os.path.basename(metrics_csv)}.",
                                 "training curves"))
        except ValueError as e:
            parts.append(f'<p class="note">No curves: {html.escape(str(e))}</p>')
    else:
        parts.append('<p class="note">No curves: no metrics CSV was given (train with a log folder, --logdir).</p>')
    if evaluation is not None:
        parts.append(_evaluation_section(evaluation))
    else:
        parts += ["<h2>Evaluation</h2>", '<p class="note">No evaluation was given.</p>']
    if montages:
        parts += ["<h2>Where the network looked (Grad-CAM)</h2>",
                  ("<p>Slices of test volumes with the Grad-CAM map of the predicted class as a heat overlay "
                   "(red: strongest evidence).</p>"), '<div class="gallery">']
        parts += [_figure(p, c, c, cls="wrong" if c.endswith("wrong") else None) for p, c in montages]
        parts.append("</div>")
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts.append(f"<footer>Written by wrn3d_tl.report.write_run_report, {html.escape(written)}.</footer>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")
    path = os.path.join(out, INDEX_HTML)
    with written_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    return path


# ------------------------------------------------------------ the examples' end
def first_samples(data, n):
    """The first ``n`` ``(x, y)`` of an ``(x, y)`` pair or a dataset of such batches, as numpy."""
    if isinstance(data, (tuple, list)):
        x, y = data
        return np.asarray(x[:n]), np.asarray(y[:n])
    xs, ys, have = [], [], 0
    for bx, by in data:
        xs.append(np.asarray(bx))
        ys.append(np.asarray(by))
        have += len(xs[-1])
        if have >= n:
            break
    if not xs:
        raise ValueError("data is empty (no samples)")
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def run_report(trainer, out_dir, *, evaluation=None, cam_samples=32, correct=3, wrong=3, class_names=None,
               title=None, extra=None):
    """What the examples' ``--report DIR`` writes at the end of a run: Grad-CAM montages
    of ``correct`` right and ``wrong`` wrong volumes among the first ``cam_samples`` of the
    trainer's ``eval_data`` (batches already normalised: the bare ``trainer.model`` is
    explained) into ``DIR/cams``, and ``DIR/index.html`` with the trainer's config, the
    curves of its ``logdir``, and ``evaluation`` (a ``trainer.evaluate(report_dir=...)``
    result). Returns the page's path (None on a non-chief worker, which writes nothing)."""
    if not getattr(trainer, "is_chief", True):
        return None
    montages = []
    if trainer.eval_data is not None and cam_samples:
        x, y = first_samples(trainer.eval_data, cam_samples)
        names = getattr(trainer, "class_names", None) if class_names is None else class_names
        montages = cam_gallery(trainer.model, x, y, os.path.join(out_dir, "cams"), correct=correct, wrong=wrong,
                               class_names=names)
    csv_path = trainer.logger.csv_path if trainer.logger is not None else None
    return write_run_report(out_dir, config=trainer.config, metrics_csv=csv_path, evaluation=evaluation,
                            montages=montages, title=title, extra=extra)
