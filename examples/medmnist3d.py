#!/usr/bin/env python
"""Train a 3D Wide ResNet on a MedMNIST-3D dataset and report test ACC and AUC.

    python examples/medmnist3d.py --flag organmnist3d [--size 28|64] --depth 16 --width 4 --epochs 30

Reads the official ``{flag}.npz`` / ``{flag}_64.npz`` (``--data-dir``, ``$WRN3D_DATA_DIR`` or
``~/.medmnist``; nothing is downloaded without ``--download``). Trains on ``train``, keeps the
weights of the epoch with the best ``val`` accuracy (ties: AUC), and reports ``test`` ACC and
AUC in the MedMNIST evaluator's definitions (binary: ROC AUC of the class-1 probability;
multi-class: mean one-vs-rest AUC) in a JSON file.
"""

import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wrn3d_tl.commands import Parser, die, non_negative_int, positive_float, positive_int, quiet_tensorflow  # noqa: E402


def parse_args(argv=None):
    quiet_tensorflow()  # wrn3d_tl.data imports TensorFlow, whose start-up lines stay off stderr
    from wrn3d_tl.data.medmnist import MEDMNIST3D, MEDMNIST_SIZES

    p = Parser(description=__doc__.split("\n\n")[0],
               epilog="Augmentation defaults to random crops only: left/right flips would swap classes such as "
                      "kidney-left and kidney-right in organmnist3d; add --flip-axes where the anatomy allows it.")
    a = p.add_argument
    a("--flag", required=True, choices=sorted(MEDMNIST3D), help="which MedMNIST-3D dataset")
    a("--size", type=int, choices=MEDMNIST_SIZES, default=28, help="volume edge: 28 or 64 (MedMNIST+)")
    a("--data-dir", help="folder holding the .npz (searched before $WRN3D_DATA_DIR and ~/.medmnist)")
    a("--download", action="store_true", help="fetch the file from Zenodo when it is not found")
    a("--depth", type=positive_int, default=16, help="WRN depth d = 6n + 4")
    a("--width", type=positive_int, default=4, help="widening factor k")
    a("--dropout", type=float, default=0.0, help="dropout between a block's convolutions")
    a("--epochs", type=positive_float, default=30, help="training epochs")
    a("--batch-size", type=positive_int, default=32, help="batch size")
    a("--lr", type=positive_float, default=0.05, help="base learning rate (cosine to 0)")
    a("--crop-padding", type=non_negative_int, default=2, help="random crop after zero-padding each axis by this")
    a("--flip-axes", default="", help="random flips along these of D, H, W (e.g. DHW); none by default")
    a("--limit", type=positive_int, help="use only the first N volumes of each split (a quick look)")
    a("--no-check-sizes", action="store_true", help="accept a file whose split sizes differ from the official "
      "release (a subset you made yourself)")
    a("--seed", type=int, default=0, help="data order, augmentation and initial weights")
    a("--checkpoint", help="also save the selected (best-val) model here")
    a("--out", help="result JSON (default runs/medmnist3d_{flag}_{size}.json)")
    args = p.parse_args(argv)
    if any(c not in "DHW" for c in args.flip_axes.upper()):
        p.error(f"--flip-axes {args.flip_axes}: use letters of D, H, W")
    suffix = f"_limit{args.limit}" if args.limit else ""   # a quick look never overwrites a full run's result
    args.out = args.out or os.path.join("runs", f"medmnist3d_{args.flag}_{args.size}{suffix}.json")
    return args


def _number(value):
    """JSON has no NaN: an undefined AUC (a split holding one class) is written as null."""
    return value if math.isfinite(value) else None


def main(argv=None):
    """Train, select on val, test; returns the result dict (also written to ``--out``)."""
    args = parse_args(argv)
    import tensorflow as tf

    from wrn3d_tl.data import MEDMNIST3D, Augment3D, compute_normalization, load_medmnist3d, make_dataset
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    try:
        splits = load_medmnist3d(args.flag, data_dir=args.data_dir, size=args.size, download=args.download,
                                 check_sizes=not args.no_check_sizes)
        config = WRNConfig(depth=args.depth, widen_factor=args.width, dropout=args.dropout,
                           num_classes=MEDMNIST3D[args.flag]["num_classes"], input_shape=(args.size,) * 3 + (1,))
    except (OSError, ValueError) as e:
        die(str(e).replace("pass check_sizes=False", "pass --no-check-sizes"))
    if args.limit:
        splits = {k: (x[:args.limit], y[:args.limit]) for k, (x, y) in splits.items()}
    (x_train, y_train), n = splits["train"], len(splits["train"][0])
    norm = compute_normalization(x_train)
    augment = Augment3D(flip_axes=tuple(args.flip_axes.upper()), crop_padding=args.crop_padding)
    batch = min(args.batch_size, n)
    train = make_dataset(x_train, y_train, batch_size=batch, volume_depth=None, training=True, seed=args.seed,
                         normalization=norm, augment=augment, repeat=True, drop_remainder=True)
    evals = {k: make_dataset(*splits[k], batch_size=batch, volume_depth=None, training=False, normalization=norm)
             for k in ("val", "test")}
    per_epoch = max(1, n // batch)
    steps = max(1, math.ceil(args.epochs * per_epoch))
    tf.random.set_seed(args.seed)
    trainer = Trainer(build_wrn(config), train, lr=args.lr, schedule="cosine", total_steps=steps, seed=args.seed,
                      batch_size=batch, class_names=MEDMNIST3D[args.flag]["labels"])
    print(f"{args.flag} ({args.size}^3): {n} train / {len(splits['val'][0])} val / {len(splits['test'][0])} test, "
          f"{config.name}, {steps} iterations", flush=True)
    best, best_weights, t0 = None, None, time.perf_counter()
    while trainer.step < steps:
        m = trainer.train_step()
        if m["step"] % per_epoch == 0 or m["step"] == steps:
            val = trainer.evaluate(evals["val"])
            print(f"epoch {m['step'] / per_epoch:5.1f}  loss {m['loss']:.4f}  val acc {val['accuracy']:.4f}  "
                  f"auc {val['auc']:.4f}", flush=True)
            if best is None or (val["accuracy"], val["auc"]) > (best["accuracy"], best["auc"]):
                best = {"step": m["step"], **val}
                best_weights = [w.numpy() for w in trainer.model.all_weights]
    for w, value in zip(trainer.model.all_weights, best_weights):
        w.assign(value)
    test = trainer.evaluate(evals["test"])
    if args.checkpoint:
        trainer.save(args.checkpoint)
    result = {"flag": args.flag, "size": args.size, "model": config.name, "epochs": args.epochs, "steps": steps,
              "samples": {k: len(v[0]) for k, v in splits.items()}, "limit": args.limit, "batch_size": batch,
              "lr": args.lr, "seed": args.seed, "augment": {"flip_axes": args.flip_axes.upper(),
                                                              "crop_padding": args.crop_padding},
              "selected_step": best["step"], "val": {"acc": best["accuracy"], "auc": _number(best["auc"])},
              "test": {"acc": test["accuracy"], "auc": _number(test["auc"]),
                       "confusion_matrix": test["confusion_matrix"]},
              "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1, allow_nan=False, default=str)
    print(f"test  ACC {test['accuracy']:.4f}  AUC {test['auc']:.4f}  (val-selected step {best['step']}) -> "
          f"{args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
