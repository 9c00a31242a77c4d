#!/usr/bin/env python
"""Train a 3D Wide ResNet on your own volumes stored in HDF5.

    python examples/train_hdf5_volumes.py --train my_volumes.h5 --val my_val.h5 \\
        --depth 16 --width 4 --batch-size 16 --epochs 30 --checkpoint runs/wrn.h5

The file holds ``volumes`` (N x D x H x W x C, any numeric dtype) and ``labels`` (N,
integers); see the README's Data section and ``wrn3d_tl.data.write_hdf5_volumes``.
Normalisation stats stored in the file are applied; otherwise ``--normalize`` computes
them from the training file (streamed) and the checkpoint keeps them for inference.
"""

import contextlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wrn3d_tl.commands import (Parser, add_training_flags, check_training_flags, die, existing_file,  # noqa: E402
                          positive_int, quiet_tensorflow)


def parse_args(argv=None):
    """The command line. A bad flag or file exits with status 2 and one line naming it,
    before any volume is read."""
    p = Parser(description=__doc__.split("\n\n")[0],
               epilog="--schedule defaults to cosine: runs on one's own volumes are short and of unknown length, "
                      "where a smooth decay needs no milestones; the CIFAR job keeps the paper's step schedule.")
    a = p.add_argument
    a("--train", required=True, type=existing_file, help="HDF5 file with the training volumes")
    a("--val", type=existing_file, help="HDF5 file evaluated at --eval-every and at the end")
    a("--x-key", help="dataset holding the volumes (N, D, H, W, C)")
    a("--y-key", help="dataset holding the integer labels (N,)")
    a("--num-classes", type=positive_int, help="None: the file's num_classes attribute or max label + 1")
    a("--normalize", action="store_true", help="compute per-channel stats when the file has none")
    a("--keep-depth", action="store_true", help="stride 1 along depth (anisotropic volumes)")
    a("--batch-size", type=positive_int, help="global batch size")
    a("--depth-flip", action="store_true", help="also flip volumes along depth when augmenting")
    a("--no-augment", action="store_true", help="no random crop and flip (scans from nifti_to_hdf5 get none anyway: "
      "a flip may change an anatomical label)")
    a("--report", metavar="DIR", help="at the end, DIR/index.html: one self-contained page with the config, the "
      "curves, the --val evaluation's pictures (DIR/eval) and Grad-CAM montages of --val volumes (logs in "
      "DIR/logs without --logdir)")
    add_training_flags(p, iters_help="training iterations (None: one epoch, or --epochs)")
    p.set_defaults(x_key="volumes", y_key="labels", depth=16, width=4, dropout=0.0, batch_size=16, lr=0.1,
                   schedule="cosine", eval_every=0, checkpoint_every=0, mixed_precision="none", seed=0)
    args = p.parse_args(argv)
    check_training_flags(p, args)
    if args.report and os.path.isfile(args.report):
        p.error(f"--report {args.report}: is a file; give a folder")
    if args.report and not args.logdir:  # the report's curves
        args.logdir = os.path.join(args.report, "logs")
    quiet_tensorflow()
    from wrn3d_tl.data import hdf5_info

    args.info = {}  # flag -> HDF5Info, read once here and used by build()
    for flag, path in (("--train", args.train), ("--val", args.val)):
        if path is not None:
            try:  # reads the labels and attributes only: every file error before training starts
                args.info[flag] = hdf5_info(path, args.x_key, args.y_key)
            except (OSError, ValueError) as e:
                p.error(f"{flag} {path}: {e}")
    return args


def build(args):
    """Data, config and trainer from the flags: ``(trainer, steps, val)``. Raises ValueError
    (``ResumeError`` among them) naming what does not fit."""
    import h5py
    import tensorflow as tf

    from wrn3d_tl.checkpoint import CheckpointManager
    from wrn3d_tl.data import compute_normalization, hdf5_dataset
    from wrn3d_tl.experiment import find_resume_point, initial_model, plan_steps, precision, resume, trainable_of
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    info = args.info["--train"]
    num_classes = args.num_classes or info.num_classes
    norm, source = info.normalization, "from the file"
    if norm is None and args.normalize:
        with h5py.File(args.train, "r") as f:
            norm, source = compute_normalization(f[args.x_key]), "computed"
    point = find_resume_point(args.checkpoint) if args.resume else (None, None)
    init = None
    if args.init_from and not point[0]:
        tf.random.set_seed(args.seed)  # a fresh head's initial weights
        init, init_norm = initial_model(args.init_from, input_shape=info.volume_shape, num_classes=num_classes)
        if norm is None and init_norm is not None:  # the units the pretrained network expects
            norm, source = init_norm, "from --init-from"
    print(f"{args.train}: {info.n} volumes of {info.volume_shape} {info.dtype}, {num_classes} classes, "
          f"normalisation {source if norm is not None else 'none'}", flush=True)
    val_shape = args.info["--val"].volume_shape if args.val else info.volume_shape
    if val_shape != info.volume_shape:
        raise ValueError(f"--val {args.val}: its volumes have shape {val_shape}, the training volumes "
                         f"{info.volume_shape}")
    data = dict(x_key=args.x_key, y_key=args.y_key, num_classes=num_classes, normalization=norm)
    train = hdf5_dataset(args.train, batch_size=args.batch_size, training=True, seed=args.seed, repeat=True,
                         drop_remainder=True, augment=False if args.no_augment else None, depth_flip=args.depth_flip,
                         **data)
    val = hdf5_dataset(args.val, batch_size=args.batch_size, **data) if args.val else None
    strides = (1, (1, 2, 2), (1, 2, 2)) if args.keep_depth else (1, 2, 2)
    config = WRNConfig(depth=args.depth, widen_factor=args.width, num_classes=num_classes,
                       input_shape=tuple(info.volume_shape), dropout=args.dropout, group_strides=strides)
    stored_steps = point[1]["trainer"].get("total_steps") if point[0] else None
    steps = plan_steps(info.n, args.batch_size, iters=args.iters, epochs=args.epochs, default=stored_steps)
    run = dict(logdir=args.logdir, eval_data=val, checkpoint_every=args.checkpoint_every or None,
               checkpoint_dir=CheckpointManager.beside(args.checkpoint).directory if args.checkpoint_every else None)
    settings = dict(lr=args.lr, schedule=args.schedule, total_steps=steps, seed=args.seed, batch_size=args.batch_size,
                    mixed_precision=precision(args.mixed_precision))
    if point[0]:
        trainer = resume(point, config, train, settings={**settings, "freeze": args.freeze}, **run)
        print(f"resumed from {point[0]} at step {trainer.step}", flush=True)
        if trainer.step >= steps:
            print(f"nothing to train: the checkpoint is at step {trainer.step}, the run plans {steps}", flush=True)
    else:
        if init is not None:
            model = init
            print(f"--init-from {args.init_from}: {model.wrn_config.name}, padding {model.wrn_config.padding}",
                  flush=True)
        else:
            tf.random.set_seed(args.seed)  # the initial weights
            model = build_wrn(config)
        trainer = Trainer(model, train, normalization=norm, trainable=trainable_of(args.freeze), **settings, **run)
    return trainer, steps, val


def main(argv=None):
    """Train; returns the last validation metrics (or None without --val)."""
    args = parse_args(argv)
    try:
        trainer, steps, val = build(args)
    except (OSError, ValueError) as e:  # a file or flag that does not fit, a conflicting checkpoint
        die(e)
    result = None
    report_dir = os.path.join(args.report, "eval") if args.report else None
    t0 = time.perf_counter()
    while trainer.step < steps:
        m = trainer.train_step()
        print(f"iter {m['step']:>5}/{steps}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  lr {m['lr']:.4g}  "
              f"{m['samples_per_sec']:.1f} vol/s", flush=True)
        last = m["step"] == steps
        if val is not None and (last or (args.eval_every and m["step"] % args.eval_every == 0)):
            result = trainer.evaluate(report_dir=report_dir if last else None)
            print(f"val   step {m['step']}  loss {result['loss']:.4f}  acc {result['accuracy']:.4f}  "
                  f"top5 {result['top5_accuracy']:.4f}", flush=True)
        if args.checkpoint and (last or (args.eval_every and m["step"] % args.eval_every == 0)):
            trainer.save(args.checkpoint)
    if args.report:
        from wrn3d_tl.report import run_report

        if val is not None and "report" not in (result or {}):  # nothing trained (resumed at the end)
            result = trainer.evaluate(report_dir=report_dir)
        extra = {"training data": args.train, "validation data": args.val or "none (no --val)",
                 "iterations": trainer.step, "batch size": trainer.batch_size, "schedule": trainer.schedule}
        print(f"report: {run_report(trainer, args.report, evaluation=result, extra=extra)}", flush=True)
    with contextlib.suppress(Exception):
        trainer.close()
    print(f"done: {trainer.step} iterations in {time.perf_counter() - t0:.1f} s"
          + (f", checkpoint {args.checkpoint}" if args.checkpoint else ""), flush=True)
    return result


if __name__ == "__main__":
    main()
