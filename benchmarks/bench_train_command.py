#!/usr/bin/env python
"""wrn3d-train against the Python path on a held-out-style scan task (issue 26).

Builds a 3-class NIfTI set of 32^3 scans in which the class is a structure's shape (a ball,
a bar along a random axis, a hollow shell) at a random place and size, under noise smoothed
along one axis (anisotropic), a random intensity gain and offset per scan, and 1 x 1 x 3 mm
voxels. Then trains on it twice with the same network, epochs and seed:

* the command: ``wrn3d-train --data train.csv --val val.csv --test test.csv --epochs E``,
  every other setting its default (selection of the val-best checkpoint by accuracy);
* the Python path of docs/data.md: ``nifti_dataset`` + ``Trainer(lr=0.05,
  schedule="cosine")`` + ``fit``, evaluated on the test table after the last step.

    python benchmarks/bench_train_command.py --out runs/bench_train_command [--epochs 15]

Writes ``result.json`` in ``--out`` (test accuracy and wall time of each path, the CPU).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on every CPU)

CLASSES = ("ball", "bar", "shell")
NOISE = 0.35   # noise std against a structure of 1 (before the gain)


def make_scan(rng, c, size=32):
    """One float32 (size,)*3 scan of class ``c`` in raw scanner-like units."""
    z, y, x = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    centre = rng.uniform(10, size - 10, 3)
    r = rng.uniform(4, 7)
    d = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    if c == 0:
        shape = d < r
    elif c == 1:
        axis = rng.integers(3)
        grids = (z, y, x)
        others = [i for i in range(3) if i != axis]
        across = np.sqrt(sum((grids[i] - centre[i]) ** 2 for i in others))
        shape = (across < r / 2.2) & (np.abs(grids[axis] - centre[axis]) < 2 * r)
    else:
        shape = (d < r + 0.5) & (d > r - 2.0)
    noise = rng.normal(size=(size,) * 3)
    noise = (noise + np.roll(noise, 1, axis=0) + np.roll(noise, 2, axis=0)) / np.sqrt(3)  # correlated along D
    v = shape * 1.0 + NOISE * noise
    gain, offset = rng.uniform(0.5, 2.0), rng.uniform(-200, 200)
    return (v * 100 * gain + offset + 1000).astype(np.float32)


def write_set(root, counts, seed=0):
    import nibabel as nib

    rng = np.random.default_rng(seed)
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    for split, per_class in counts.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        rows = ["path,label"]
        for i in range(per_class * len(CLASSES)):
            c = i % len(CLASSES)
            name = f"{split}/{i:04d}.nii.gz"
            nib.save(nib.Nifti1Image(make_scan(rng, c), affine), os.path.join(root, name))
            rows.append(f"{name},{CLASSES[c]}")
        with open(os.path.join(root, f"{split}.csv"), "w") as fh:
            fh.write("\n".join(rows) + "\n")


def python_path(root, epochs, out, depth=16, width=4):
    """docs/data.md's Python snippet with this run's epochs: test metrics of the last step."""

    import tensorflow as tf

    from wrn3d_tl.data import nifti_dataset, nifti_info
    from wrn3d_tl.experiment import plan_steps
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    tf.random.set_seed(0)
    table = os.path.join(root, "train.csv")
    info = nifti_info(table)
    train = nifti_dataset(table, batch_size=16, training=True, repeat=True, drop_remainder=True)
    test = nifti_dataset(os.path.join(root, "test.csv"), batch_size=16, classes=info.class_names)
    cfg = WRNConfig(depth=depth, widen_factor=width, num_classes=info.num_classes, input_shape=info.volume_shape)
    steps = plan_steps(info.n, 16, epochs=epochs)  # as wrn3d-train plans them
    trainer = Trainer(build_wrn(cfg), train, eval_data=test, lr=0.05, schedule="cosine", total_steps=steps,
                      logdir=os.path.join(out, "python-logs"))
    trainer.fit(steps)
    return trainer.evaluate(), steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_train_command")
    p.add_argument("--epochs", type=float, default=15)
    p.add_argument("--depth", type=int, default=16, help="both paths' network (16: wrn3d-train's default)")
    p.add_argument("--width", type=int, default=4, help="both paths' network (4: wrn3d-train's default)")
    p.add_argument("--per-class", type=int, nargs=3, default=(40, 10, 20), metavar=("TRAIN", "VAL", "TEST"))
    args = p.parse_args()
    root = os.path.join(args.out, "scans")
    if not os.path.exists(os.path.join(root, "test.csv")):
        write_set(root, dict(zip(("train", "val", "test"), args.per_class)))
    from wrn3d_tl import cpu
    from wrn3d_tl.commands import train as command

    import shutil

    from wrn3d_tl.files import written_atomically

    shutil.rmtree(os.path.join(args.out, "command"), ignore_errors=True)   # this benchmark's own run folder
    shutil.rmtree(os.path.join(args.out, "python-logs"), ignore_errors=True)
    t0 = time.perf_counter()
    status = command.main(["--data", os.path.join(root, "train.csv"), "--val", os.path.join(root, "val.csv"),
                           "--test", os.path.join(root, "test.csv"), "--epochs", str(args.epochs),
                           "--depth", str(args.depth), "--width", str(args.width),
                           "--out", os.path.join(args.out, "command")])
    t_command = time.perf_counter() - t0
    assert status == 0, status
    with open(os.path.join(args.out, "command", "metrics.json")) as fh:
        metrics = json.load(fh)
    t0 = time.perf_counter()
    py, steps = python_path(root, args.epochs, args.out, args.depth, args.width)
    t_python = time.perf_counter() - t0
    result = {"cpu": cpu.cpu_model(), "flags": cpu.cpu_flags(relevant_only=True), "epochs": args.epochs,
              "network": f"WRN-{args.depth}-{args.width}",
              "per_class": dict(zip(("train", "val", "test"), args.per_class)), "steps": steps,
              "command": {"test_accuracy": metrics["test"]["accuracy"], "test_auc": metrics["test"]["auc"],
                          "selected_step": metrics["selected"]["step"], "seconds": round(t_command, 1)},
              "python": {"test_accuracy": py["accuracy"], "test_auc": py["auc"], "seconds": round(t_python, 1)}}
    with written_atomically(os.path.join(args.out, "result.json")) as tmp, open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))


import numpy as np  # noqa: E402

if __name__ == "__main__":
    main()
