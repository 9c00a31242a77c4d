#!/usr/bin/env python
"""bf16 inference against fp32: the speed-up and the change in predictions.

    python benchmarks/bench_bf16_inference.py [--steps 300] [--json-out results.json]

1. Predictions: trains the tiny config (WRN-10-2, 3D, 4x16x16x3: CIFAR-shaped synthetic
   images strided to 16x16 and tiled to 4 slices) in fp32 for ``--steps`` steps, then
   predicts ``--test`` held-out volumes with ``Predictor(trainer)`` and
   ``Predictor(trainer, precision="bf16")``: top-1 agreement, max |logit difference|,
   and each one's accuracy.
2. Speed: ``Predictor.predict`` volumes/s in fp32 and bf16 on that model and on the main
   job's WRN-16-4 3D (8x32x32x3; its untrained weights, as speed does not depend on
   them), batch ``--batch-size``, the two precisions alternating, median of ``--reps``.

Prints a markdown table and writes one JSON file (with the CPU model) when asked.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)
_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):  # the repo (wrn3d_tl) and benchmarks/ (bench_train)
    if _p not in sys.path:
        sys.path.insert(0, _p)


def agreement(steps, n_test, seed=0):
    """Train the tiny config in fp32; fp32 vs bf16 predictions on held-out volumes."""
    import numpy as np
    import tensorflow as tf

    from wrn3d_tl.data import compute_normalization, make_dataset, synthetic_cifar, tile_to_volume
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.predict import Predictor
    from wrn3d_tl.train import Trainer

    (xtr, ytr), (xte, yte) = synthetic_cifar(4096, n_test, num_classes=10, seed=seed)
    xtr, xte = xtr[:, ::2, ::2], xte[:, ::2, ::2]
    tf.random.set_seed(seed)
    cfg = WRNConfig.from_name("WRN-10-2", num_classes=10, input_shape=(4, 16, 16, 3))
    data = make_dataset(xtr, ytr, batch_size=64, volume_depth=4, seed=seed, normalization=compute_normalization(xtr),
                        drop_remainder=True, repeat=True)
    trainer = Trainer(build_wrn(cfg), data, lr=0.05, schedule="cosine", total_steps=steps, verbose=False)
    t0 = time.perf_counter()
    trainer.fit(steps, progress=False)
    train_s = time.perf_counter() - t0
    volumes = tile_to_volume(xte, 4).numpy()
    out = {p: Predictor(trainer, precision=p).predict(volumes, batch_size=100) for p in ("fp32", "bf16")}
    diff = np.abs(out["bf16"]["logits"] - out["fp32"]["logits"])
    return {"config": "WRN-10-2 3D 4x16x16x3", "train_steps": steps, "train_s": round(train_s, 1),
            "test_volumes": int(n_test),
            "top1_agreement": float(np.mean(out["bf16"]["class"] == out["fp32"]["class"])),
            "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit_fp32": float(np.abs(out["fp32"]["logits"]).max()),
            "accuracy_fp32": float(np.mean(out["fp32"]["class"] == yte)),
            "accuracy_bf16": float(np.mean(out["bf16"]["class"] == yte)),
            "max_abs_probability_diff": float(np.abs(out["bf16"]["probabilities"]
                                                     - out["fp32"]["probabilities"]).max())}, trainer


def speed(model, label, n, batch_size, reps):
    """Predictor.predict volumes/s in fp32 and bf16 on ``model``, the two alternating."""
    import numpy as np

    from wrn3d_tl.predict import Predictor
    x = np.random.default_rng(0).standard_normal((n,) + model.wrn_config.input_shape).astype(np.float32)
    predictors = {p: Predictor(model, precision=p) for p in ("fp32", "bf16")}
    for p in predictors.values():
        p.predict(x[:batch_size], batch_size=batch_size)  # trace
    times = {p: [] for p in predictors}
    for _ in range(reps):
        for name, p in predictors.items():
            t0 = time.perf_counter()
            p.predict(x, batch_size=batch_size)
            times[name].append(time.perf_counter() - t0)
    vps = {name: n / statistics.median(t) for name, t in times.items()}
    return {"config": label, "volumes": n, "batch_size": batch_size, "reps": reps,
            "fp32_volumes_per_s": round(vps["fp32"], 1), "bf16_volumes_per_s": round(vps["bf16"], 1),
            "speedup": round(vps["bf16"] / vps["fp32"], 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="fp32 training steps of the tiny config")
    p.add_argument("--test", type=int, default=2000, help="held-out volumes compared")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json-out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from wrn3d_tl.model import WRNConfig, build_wrn

    t0 = time.perf_counter()
    preds, trainer = agreement(args.steps, args.test)
    speeds = [speed(trainer.model, "WRN-10-2 3D 4x16x16x3", 512, args.batch_size, args.reps),
              speed(build_wrn(WRNConfig.from_name("WRN-16-4", input_shape=(8, 32, 32, 3))), "WRN-16-4 3D 8x32x32x3",
                    64, args.batch_size, args.reps)]
    from bench_train import environment

    env = environment()  # CPU model and bf16 flags, versions
    result = {"cpu": env["cpu"], "cpus": env["cores"], "environment": env, "predictions": preds, "speed": speeds,
              "elapsed_s": round(time.perf_counter() - t0, 1)}
    print(f"\nCPU: {result['cpu']} ({result['cpus']} cores, {' '.join(env['cpu_flags'])})\n")
    print("| predictions, fp32 vs bf16 | |\n|---|---:|")
    for k in ("test_volumes", "top1_agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "max_abs_logit_fp32",
              "max_abs_probability_diff", "accuracy_fp32", "accuracy_bf16"):
        print(f"| {k} | {preds[k]:.4g} |")
    print("\n| Predictor.predict, volumes/s | fp32 | bf16 | speed-up |\n|---|---:|---:|---:|")
    for s in speeds:
        print(f"| {s['config']}, batch {s['batch_size']} | {s['fp32_volumes_per_s']} | {s['bf16_volumes_per_s']} | "
              f"{s['speedup']:.2f}x |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
