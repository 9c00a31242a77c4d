#!/usr/bin/env python
"""Time per volume of wrn3d_tl.explain.grad_cam against a predict pass, WRN-16-4 3D on
8x32x32x3 volumes (batch 16, random weights and inputs: the cost does not depend on them).

    .venv/bin/python benchmarks/bench_explain.py [--n 64] [--rounds 3] [--out FILE]
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)


cpu_model = wrn3d_tl.cpu.cpu_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="volumes per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grad_cam_intel-xeon-2core.json"))
    args = p.parse_args(argv)
    import numpy as np
    import tensorflow as tf

    from wrn3d_tl.explain import grad_cam
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.predict import as_predictor

    model = build_wrn(WRNConfig.from_name("WRN-16-4", num_classes=10, input_shape=(8, 32, 32, 3)))
    predictor = as_predictor(model)          # one compiled function each, reused across rounds
    x = np.random.default_rng(0).normal(size=(args.n, 8, 32, 32, 3)).astype("float32")
    runs = {"grad_cam": lambda: grad_cam(predictor, x, batch_size=16),
            "predict": lambda: predictor.predict(x, batch_size=16)}
    for run in runs.values():
        run()                                 # warm-up: tracing
    ms = {name: [] for name in runs}
    for _ in range(args.rounds):              # alternating, so load changes hit both alike
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            ms[name].append(1000 * (time.perf_counter() - t0) / args.n)
    result = {"kind": "grad_cam", "cpu": cpu_model(), "cores": os.cpu_count(), "tensorflow": tf.__version__,
              "python": platform.python_version(), "config": "WRN-16-4", "input_shape": [8, 32, 32, 3],
              "batch_size": 16, "n": args.n, "ms_per_volume": ms,
              "median_ms_per_volume": {k: float(np.median(v)) for k, v in ms.items()},
              "run": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result["grad_cam_over_predict"] = result["median_ms_per_volume"]["grad_cam"] / \
        result["median_ms_per_volume"]["predict"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["median_ms_per_volume"]), f"ratio {result['grad_cam_over_predict']:.2f}", "->", args.out)
    return result


if __name__ == "__main__":
    main()
