#!/usr/bin/env python
"""Train a 3D (or 2D) Wide ResNet on CIFAR images tiled into volumes — the main job.

    python examples/cifar_wide_resnet_tl.py --iters 10

Real CIFAR is read from disk when present (see docs/data.md); otherwise a learnable
synthetic set with CIFAR's shapes is used and one loud line says so. The seed project's
pattern — outside code stepping the trainer one iteration at a time — is
``wrn3d_tl.experiment.make_trainer``, importable from here too::

    from cifar_wide_resnet_tl import make_trainer
    trainer = make_trainer(iters=10)
    for _ in range(10):
        print(trainer.train_step())
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wrn3d_tl.commands import (Parser, add_scale_flags, add_tiling_flags, add_training_flags,  # noqa: E402
                               check_training_flags, die, non_negative_int, quiet_tensorflow)
from wrn3d_tl.experiment import DEFAULT_ITERS, DEFAULTS, build_experiment, make_trainer  # noqa: E402,F401


def parse_args(argv=None):
    """The command line; every flag's default is in ``wrn3d_tl.experiment.DEFAULTS``. A bad
    flag exits with status 2 and one line naming it, before any data is read."""
    p = Parser(description=__doc__.split("\n\n")[0],
               epilog="--schedule defaults to step, the paper's CIFAR recipe; wrn3d-train defaults to cosine, "
                      "which needs no milestones for short runs of unknown length.")
    a = p.add_argument
    a("--dataset", choices=["cifar10", "cifar100", "synthetic"], help="cifar10 falls back to synthetic if absent")
    a("--data-dir", help="folder holding CIFAR (folder or .tar.gz); else $WRN3D_DATA_DIR, ~/.keras/datasets")
    a("--download", action="store_true", help="allow fetching CIFAR through keras.datasets")
    add_tiling_flags(p)
    add_scale_flags(p)
    a("--recompute", action="store_true", help="recompute block activations in the backward pass (less memory)")
    a("--eval-samples", type=non_negative_int, help="test samples per evaluation (0: the whole test split)")
    a("--plot", help="PNG of loss/accuracy curves written at the end (needs --logdir)")
    a("--report", metavar="DIR", help="at the end, DIR/index.html: one self-contained page with the config, the "
      "curves, the evaluation's pictures (DIR/eval) and Grad-CAM montages of test volumes (logs in DIR/logs "
      "without --logdir)")
    add_training_flags(p, iters_help=f"training iterations (None: {DEFAULT_ITERS}, or --epochs)")
    p.set_defaults(**DEFAULTS)
    args = p.parse_args(argv)
    if args.report and os.path.isfile(args.report):
        p.error(f"--report {args.report}: is a file; give a folder")
    if args.report and not args.logdir:  # the report's curves
        args.logdir = os.path.join(args.report, "logs")
    if args.plot and not args.logdir:
        p.error("--plot needs --logdir")
    if args.plot and os.path.isdir(args.plot):
        p.error(f"--plot {args.plot}: is a folder; give the PNG file's name")
    check_training_flags(p, args)
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no such file or folder")
    return args


def main(argv=None):
    """Run the job; returns the final evaluation dict."""
    args = parse_args(argv)
    opts = {k: getattr(args, k) for k in DEFAULTS}
    t0 = time.perf_counter()
    if opts["distribute"] == "none":  # a strategy must set up devices before TensorFlow starts
        quiet_tensorflow()
    try:
        exp = build_experiment(**opts)
    except (FileNotFoundError, ValueError) as e:  # missing data, a bad option, a conflicting checkpoint
        die(e)
    trainer, steps = exp.trainer, exp.steps
    if exp.resumed_from:
        print(f"resumed from {exp.resumed_from} at step {trainer.step}", flush=True)
        if trainer.step >= steps:
            print(f"nothing to train: the checkpoint is at step {trainer.step}, the run plans {steps}", flush=True)
    cfg = trainer.config
    print(f"{cfg.name} {cfg.spatial_rank}D, input {cfg.input_shape}, {exp.data_source}, "
          f"batch {trainer.batch_size}, {steps} iterations, schedule {trainer.schedule}", flush=True)
    ckpt = opts["checkpoint"]
    try:
        m = run(trainer, steps, opts, ckpt)
    except Exception as e:
        from wrn3d_tl.distribute import worker_failure_message

        message = worker_failure_message(e, trainer.step + 1) if opts["distribute"] == "multiworker" else None
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        sys.exit(3)
    t_train = time.perf_counter() - t0
    result = trainer.evaluate(report_dir=os.path.join(args.report, "eval") if args.report else None)
    print(f"test  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  top5 {result['top5_accuracy']:.4f}  "
          f"({result['samples']} samples)", flush=True)
    if ckpt:
        path = trainer.save(ckpt)
        if path:
            print(f"checkpoint: {path}")
    if opts["plot"] and trainer.is_chief:
        print(f"plot: {trainer.plot(opts['plot'])}")
    if args.report and trainer.is_chief:
        from wrn3d_tl.report import run_report

        extra = {"data": exp.data_source, "iterations": trainer.step, "batch size": trainer.batch_size,
                 "schedule": trainer.schedule, "test loss": result["loss"], "test accuracy": result["accuracy"]}
        print(f"report: {run_report(trainer, args.report, evaluation=result, extra=extra)}", flush=True)
    trainer.close()
    final_loss = m["loss"] if m else float("nan")
    print(f"summary: {trainer.step} iterations, final train loss {final_loss:.4f}, "
          f"test accuracy {result['accuracy']:.4f}, {time.perf_counter() - t0:.1f} s total "
          f"({t_train:.1f} s to the end of training, start-up included)", flush=True)
    return result


def run(trainer, steps, opts, ckpt):
    """The training loop: one printed line per iteration (under a progress bar when the
    terminal shows one), periodic evaluation and checkpoints."""
    from tqdm.auto import tqdm

    def on_step(m):
        tqdm.write(f"iter {m['step']:>5}/{steps}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  "
                   f"lr {m['lr']:.4g}  {m['samples_per_sec']:.1f} vol/s", file=sys.stdout)
        sys.stdout.flush()

    def on_eval(step, result):
        tqdm.write(f"eval  step {step}  loss {result['loss']:.4f}  acc {result['accuracy']:.4f}  "
                   f"top5 {result['top5_accuracy']:.4f}", file=sys.stdout)
        if ckpt:
            trainer.save(ckpt)

    return trainer.fit(steps, eval_every=opts["eval_every"], on_step=on_step, on_eval=on_eval, progress=None)


if __name__ == "__main__":
    main()
