"""Training logs: a CSV file and TensorBoard scalars under one folder, a PNG plot, and the
library's own messages (``log``, the ``wrn3d_tl`` logger)."""

import csv
import logging
import os
import sys

import tensorflow as tf

from wrn3d_tl.files import save_figure, written_atomically

__all__ = ["MetricsLogger", "plot_metrics", "log"]


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a notebook's, a test's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


# The library's messages (progress lines, notes) at INFO on stderr, as "[wrn3d_tl] ...";
# logging.getLogger("wrn3d_tl").setLevel(logging.WARNING) silences them, and handlers of the
# application's own can replace this one.
log = logging.getLogger("wrn3d_tl")
if not log.handlers:
    _handler = _CurrentStderr()
    _handler.setFormatter(logging.Formatter("[wrn3d_tl] %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

FIELDS = ("step", "split", "loss", "accuracy", "top5_accuracy", "lr", "samples_per_sec", "wall_time")


class MetricsLogger:
    """Appends metric rows to ``{logdir}/metrics.csv`` and writes TensorBoard scalars.

    Rows have the columns of ``FIELDS``; ``split`` is "train" or "eval". An existing
    CSV is appended to (a resumed run continues the same file).
    """

    def __init__(self, logdir):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.csv_path = os.path.join(self.logdir, "metrics.csv")
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
            self._file.flush()
        self._tb = tf.summary.create_file_writer(os.path.join(self.logdir, "tensorboard"))

    def log(self, step, split, metrics):
        """Append one row (``metrics``: a dict with any of FIELDS) and its TensorBoard scalars."""
        row = {"step": int(step), "split": split, **{k: metrics.get(k, "") for k in FIELDS[2:]}}
        self._csv.writerow(row)
        self._file.flush()
        with self._tb.as_default(step=int(step)):
            for key in ("loss", "accuracy", "top5_accuracy", "auc", "lr", "samples_per_sec"):
                if key in metrics and metrics[key] != "":
                    tf.summary.scalar(f"{split}/{key}", float(metrics[key]))
        self._tb.flush()

    def truncate(self, step):
        """Drop the CSV rows after ``step`` (a run resumed from an older checkpoint goes on
        from there: without this the log would hold the abandoned steps and their eval rows
        twice). Rewritten atomically; returns the number of rows dropped. TensorBoard's
        event files are append-only; TensorBoard shows the newest value of a step."""
        self._file.close()
        with open(self.csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [row for row in rows if row.get("step", "").isdigit() and int(row["step"]) <= step]
        with written_atomically(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(keep)
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS, extrasaction="ignore")
        return len(rows) - len(keep)

    def close(self):
        self._file.close()
        self._tb.close()


def plot_metrics(csv_path, png_path):
    """Draw loss and accuracy against step (train and eval) from a metrics CSV into a PNG.

    Draws on its own ``matplotlib.figure.Figure`` (no pyplot): the caller's matplotlib
    backend and open figures are left alone. Returns ``png_path``.
    """
    from matplotlib.figure import Figure

    series = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("loss", "accuracy"):
                if row.get(key):
                    series.setdefault((row["split"], key), []).append((int(row["step"]), float(row[key])))
    if not series:
        raise ValueError(f"{csv_path!r} holds no metric rows to plot")
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "accuracy")):
        for split in ("train", "eval"):
            pts = series.get((split, key))
            if pts:
                ax.plot(*zip(*pts), label=split, marker="o" if split == "eval" else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=100)
