#!/usr/bin/env python
"""What the stored reading costs: the check pass over a NIfTI table, and a SavedModel with
the reading in its graph against the same SavedModel fed preprocessed volumes.

    python benchmarks/bench_reading.py                  # 100 scans 32x32x32 (int16 + slope), WRN-16-4 3D
    python benchmarks/bench_reading.py --n 200 --shape 64,64,64 --rounds 9

1. Writes ``--n`` CT-like ``.nii.gz`` scans (``bench_nifti.write_volumes``: int16 codes with a
   scaling slope, what scanners write) and times ``nifti_info(table, check=True)`` (every file
   read once in parallel threads: what ``nifti_dataset`` does before training) against
   ``nifti_info(table)`` (headers only), ``--rounds`` times each, alternating: the check's
   cost per 100 files is the median difference scaled to 100.
2. Trains nothing: a freshly initialised WRN-16-4 3D whose Trainer carries the reading
   (``zscore``, crop/pad to the scans' shape) is exported once; then ``--rounds`` rounds of
   ``serving_default`` on raw volumes (z-score and crop/pad in the graph) and
   ``serving_preprocessed`` on the same volumes read beforehand, alternating per round,
   batch ``--batch-size``. The ratio in-graph / preprocessed is the median of the per-round
   ratios (the issue's bound: within 5%).

Output: a short table on stdout and a JSON record in ``--out`` (default
``benchmarks/results/reading_<cpu-slug>.json``), with the CPU model, its relevant flags and
whether oneDNN was on.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)

import numpy as np  # noqa: E402


def parse_args(argv=None):
    from bench_nifti import parse_shape

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="number of synthetic .nii.gz scans")
    p.add_argument("--shape", type=parse_shape, default=(32, 32, 32, 1), help="D,H,W[,C] of each scan")
    p.add_argument("--batch-size", type=int, default=8, help="volumes per SavedModel call")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds of each measurement (after a warm-up)")
    p.add_argument("--depth", type=int, default=16, help="WRN depth of the exported model")
    p.add_argument("--width", type=int, default=4, help="WRN widening factor of the exported model")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/reading_<cpu-slug>.json)")
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    import nibabel as nib
    import tensorflow as tf
    from bench_nifti import cpu_slug, environment, write_volumes

    from wrn3d_tl import cpu
    from wrn3d_tl.data import nifti_info
    from wrn3d_tl.data.reading import apply_reading, preprocessing_of
    from wrn3d_tl.export import export_saved_model
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        table, facts = write_volumes(tmp, args.n, args.shape, "int16", seed=0)
        info = nifti_info(table, check=True)                        # warm-up: page cache, imports
        check, headers = [], []
        for _ in range(args.rounds):
            check.append(timed(lambda: nifti_info(table, check=True)))
            headers.append(timed(lambda: nifti_info(table)))
        per_100 = (statistics.median(check) - statistics.median(headers)) * 100 / args.n

        spatial = tuple(args.shape[:3])
        reading = preprocessing_of("zscore", spatial)
        config = WRNConfig(depth=args.depth, widen_factor=args.width, num_classes=2, input_shape=info.volume_shape)
        trainer = Trainer(build_wrn(config), lr=0.01, verbose=False, preprocessing=reading)
        with warnings.catch_warnings():      # no dataset-level stats here, and none needed
            warnings.simplefilter("ignore", UserWarning)
            export_saved_model(trainer, os.path.join(tmp, "served"))
        served = tf.saved_model.load(os.path.join(tmp, "served"))
        raw = np.stack([np.asarray(nib.load(p).dataobj, np.float32).reshape(info.shapes[i])
                        for i, p in enumerate(info.paths[:args.batch_size])])
        read = apply_reading(raw, reading)
        in_graph = served.signatures["serving_default"]
        before = served.signatures["serving_preprocessed"]
        raw_t, read_t = tf.constant(raw), tf.constant(read)
        np.testing.assert_allclose(in_graph(volumes=raw_t)["probabilities"].numpy(),
                                   before(volumes=read_t)["probabilities"].numpy(), atol=1e-5)
        rounds = []
        for r in range(args.rounds):
            pair = [("in_graph", lambda: in_graph(volumes=raw_t)["logits"].numpy()),
                    ("preprocessed", lambda: before(volumes=read_t)["logits"].numpy())]
            times = {name: timed(fn) for name, fn in (pair if r % 2 == 0 else pair[::-1])}
            rounds.append(times)
    ratio = statistics.median(t["in_graph"] / t["preprocessed"] for t in rounds)
    result = {
        "benchmark": "bench_reading", "environment": {**environment(), "cpu_flags": cpu.cpu_flags(relevant_only=True),
                                                      "onednn": cpu.onednn_enabled()},
        "scans": {"n": args.n, "shape": list(args.shape), **facts},
        "check": {"with_check_s": check, "headers_only_s": headers, "check_s_per_100_files": round(per_100, 4)},
        "serving": {"config": config.name, "batch_size": args.batch_size, "rounds_s": rounds,
                    "in_graph_median_s": statistics.median(t["in_graph"] for t in rounds),
                    "preprocessed_median_s": statistics.median(t["preprocessed"] for t in rounds),
                    "in_graph_over_preprocessed": round(ratio, 4)},
    }
    out = args.out or os.path.join(_HERE, "results", f"reading_{cpu_slug(result['environment']['cpu'], os.cpu_count())}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    s = result["serving"]
    print(f"| measurement | value |\n|---|---|\n"
          f"| check pass ({args.n} scans {'x'.join(map(str, args.shape))}, int16) per 100 files | {per_100:.3f} s |\n"
          f"| SavedModel {config.name} batch {args.batch_size}, reading in the graph | "
          f"{s['in_graph_median_s'] * 1e3:.1f} ms |\n"
          f"| the same, fed preprocessed volumes | {s['preprocessed_median_s'] * 1e3:.1f} ms |\n"
          f"| in-graph / preprocessed (median of per-round ratios) | {ratio:.3f} |")
    print(f"CPU: {result['environment']['cpu']} ({' '.join(result['environment']['cpu_flags'])}), "
          f"oneDNN {'on' if result['environment']['onednn'] else 'off'}; -> {out}")
    return result


if __name__ == "__main__":
    main()
