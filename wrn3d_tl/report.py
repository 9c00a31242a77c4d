"""A one-file HTML report of a run: its curves, its evaluation (``wrn3d_tl.evaluation``'s
pictures) and Grad-CAM montages of right and wrong volumes.

    from wrn3d_tl.report import cam_gallery, write_run_report
    result = trainer.evaluate(report_dir="runs/eval")                     # confusion.png, roc.png, metrics.json
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

from wrn3d_tl.evaluation import class_name_list, output_folder
from wrn3d_tl.files import written_atomically
from wrn3d_tl.predict import as_predictor
from wrn3d_tl.validate import check_int

__all__ = ["cam_gallery", "first_samples", "run_report", "write_run_report"]

CURVES_PNG, INDEX_HTML = "curves.png", "index.html"


# ------------------------------------------------------------ Grad-CAM gallery
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

    correct, wrong = check_int(correct, "correct", 0), check_int(wrong, "wrong", 0)
    predictor = as_predictor(trainer_or_checkpoint)
    k = predictor.config.num_classes
    labels = np.asarray(y).reshape(-1) if np.ndim(y) == 2 and np.shape(y)[1] == 1 else np.asarray(y)
    reading = predictor.array_reading(x)
    n = predictor.check_volumes(x, "x", reading)[0]
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"y must be {n} integer labels in [0, {k}) (one per volume of x), got shape "
                         f"{np.shape(y)} dtype {labels.dtype}")
    names = class_name_list(predictor.class_names if class_names is None else class_names, k)
    out = output_folder(out_dir)
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
    out = output_folder(out_dir)
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


# ------------------------------------------------- the end of a run (main job, wrn3d-train)
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
    """What the main job's ``--report DIR`` and ``wrn3d-train`` write at the end of a run: Grad-CAM montages
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
