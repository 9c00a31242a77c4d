"""``wrn3d-train``: one command from labelled volumes to a selected, tested and exported model.

    wrn3d-train --data scans/train.csv --val scans/val.csv --test scans/test.csv --epochs 30 --export runs/model
    wrn3d-train --data scans/ --val-split 0.2 --test scans_test/      # class folders, a stratified val split
    wrn3d-train --data volumes.h5 --val val.h5                        # HDF5 (wrn3d-prepare, write_hdf5_volumes)
    wrn3d-train --data medmnist:organmnist3d@64                       # MedMNIST-3D's official splits
    wrn3d-train --data cifar10 --dims 3 --volume-depth 8              # CIFAR tiled into volumes; or synthetic

The run folder (``--out``) receives ``run.json`` (the command, versions, CPU/GPU, data
fingerprints), ``last.h5`` and ``best.h5`` (the checkpoint of the best validation score by
``--select``), ``logs/`` (the curves), ``val/`` and ``test/`` (confusion and ROC pictures),
``metrics.json`` (the selected model's val and test metrics with class names), ``cams/``
and ``index.html`` (the report page). The TEST metrics are those of the selected model,
as MedMNIST's protocol asks. Every error is one line ``wrn3d-train: error: ...``, exit
status 2. The library side: ``wrn3d_tl.data``, ``Trainer``, ``wrn3d_tl.report``,
``wrn3d_tl.export``.
"""

import argparse
import json
import math
import os
import shlex
import sys
import time

from wrn3d_tl.commands import (Parser, add_reading_flags, add_scale_flags, add_tiling_flags, add_training_flags,
                               check_training_flags, error_line, non_negative_int, positive_float, positive_int,
                               quiet_tensorflow)
from wrn3d_tl.commands.selection import SELECT, Selection, train_and_select, write_json
from wrn3d_tl.commands.sources import ARRAY_SOURCES, open_data

__all__ = ["main", "build_parser", "parse_args", "open_data", "augment_arg", "SELECT"]

_CLI = "wrn3d-train"
DEFAULT_EPOCHS = 30   # without --iters or --epochs (a resumed run: its own plan)


class CommandError(Exception):
    """A flag, a file or a checkpoint that does not fit: one line, exit status 2."""


def augment_arg(text):
    """An argparse type: ``none`` or comma-separated ``flip=DHW``, ``rotate=HW``, ``crop=N``,
    ``scale=F``, ``shift=F`` (``wrn3d_tl.data.Augment3D``'s fields), returned as a dict of
    its keyword arguments (None for ``none``)."""
    if text in ("none", "default"):
        return None if text == "none" else text
    axes = {"D": 0, "H": 1, "W": 2}
    out = {}
    try:
        for part in text.split(","):
            key, _, value = part.partition("=")
            if key == "flip" and value and set(value) <= set(axes):
                out["flip_axes"] = tuple(axes[a] for a in value)
            elif key == "rotate" and len(value) == 2 and set(value) <= set(axes) and value[0] != value[1]:
                out["rotate_plane"] = tuple(axes[a] for a in value)
            elif key == "crop" and int(value) >= 0:
                out["crop_padding"] = int(value)
            elif key in ("scale", "shift") and 0 <= float(value) < math.inf:
                out[key] = float(value)
            else:
                raise ValueError(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none or a comma list of flip=DHW, rotate=HW, crop=N, scale=F, "
                                         f"shift=F, got {text!r}") from None
    return out


def _fraction(text):
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def build_parser():
    """The command line's ``Parser`` (every default in ``--help``)."""
    p = Parser(prog=_CLI, description="Train a Wide ResNet on labelled volumes, select the best checkpoint on "
               "validation data, test it, and write a report, metrics.json, run.json and (--export) a SavedModel.")
    a = p.add_argument
    a("--data", help="training data: a NIfTI table (CSV with path,label) or a folder of class sub-folders; an HDF5 "
      "file (.h5/.hdf5); medmnist:FLAG[@SIZE]; cifar10, cifar100 or synthetic")
    a("--val", help="validation data of the same kind (not for medmnist, cifar or synthetic, whose splits are fixed)")
    a("--test", help="test data of the same kind (cifar, synthetic and medmnist bring theirs)")
    a("--val-split", type=_fraction, help="hold out this fraction of --data for validation, per class, by --seed "
      "(NIfTI tables, cifar, synthetic)")
    a("--out", help="the run folder (default: runs/<data name>-<date>-<time>)")
    a("--rerun", metavar="RUN_JSON", help="run the command a run.json recorded again (with --out: into that folder)")
    a("--data-dir", help="cifar/medmnist: the folder holding the files (else $WRN3D_DATA_DIR and the usual places)")
    a("--download", action="store_true", help="cifar/medmnist: allow fetching the files")
    a("--no-check-sizes", action="store_true", help="medmnist: accept a file whose split sizes are no official "
      "release's (a subset you made yourself)")
    a("--limit", type=positive_int, help="medmnist, cifar, synthetic: only the first N samples of each split (a "
      "quick look)")
    a("--x-key", help="HDF5: the dataset holding the volumes")
    a("--y-key", help="HDF5: the dataset holding the labels")
    a("--normalize", action="store_true", help="HDF5 without stored stats: compute per-channel stats (streamed)")
    add_reading_flags(p)
    a("--augment", type=augment_arg, help="none, or a comma list of flip=DHW, rotate=HW, crop=N, scale=F, shift=F "
      "(default: none for scans, HDF5 and MedMNIST, whose flips may change an anatomical label; the paper's crop "
      "and flip for cifar)")
    a("--keep-depth", action="store_true", help="stride 1 along depth (anisotropic volumes)")
    a("--select", choices=sorted(SELECT), help="the validation metric that picks best.h5")
    a("--patience", type=non_negative_int, help="stop after this many evaluations without a better --select "
      "(0: never stop early)")
    a("--class-weight", choices=["none", "balanced"], help="balanced: weigh each class's loss by N / (classes * "
      "count) of the training labels (stored with the run)")
    a("--export", metavar="DIR", help="also write the selected model as a SavedModel that serves raw volumes")
    a("--no-report", action="store_true", help="skip index.html and the Grad-CAM montages")
    add_tiling_flags(p)
    add_scale_flags(p)
    add_training_flags(p, iters_help=f"training iterations (default: {DEFAULT_EPOCHS} epochs, or a resumed run's "
                                     "plan)")
    p.set_defaults(depth=16, width=4, dropout=0.0, dims=3, volume_depth=8, tile_mode="repeat", x_key="volumes",
                   y_key="labels", intensity="zscore", batch_size=16, lr=0.05, schedule="cosine", warmup_steps=0,
                   weight_decay=5e-4, select="accuracy", patience=0, class_weight="none", eval_every=None,
                   checkpoint_every=0, mixed_precision="none", seed=0, distribute="none",
                   synthetic_train=10000, synthetic_test=2000)
    p.set_defaults(augment="default")
    return p


def parse_args(argv=None):
    """The command line. A bad flag, or a data path that does not exist, exits with status 2
    and one line naming it, before TensorFlow starts."""
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = list(argv or [])
    if args.rerun:
        args = _rerun(p, args)
    if not args.data:
        p.error("--data is required (a NIfTI table or folder, an HDF5 file, medmnist:FLAG[@SIZE], cifar10, "
                "cifar100 or synthetic)")
    if args.checkpoint or args.logdir:
        p.error(f"--{'checkpoint' if args.checkpoint else 'logdir'}: wrn3d-train writes last.h5, best.h5 and logs/ "
                "into --out")
    if args.resume and not args.out:
        p.error("--resume needs --out (the run folder to continue)")
    args.kind = _kind(p, args.data)
    for flag in ("val", "test"):
        value = getattr(args, flag)
        if value and (args.kind in ARRAY_SOURCES or args.kind == "medmnist"):
            p.error(f"--{flag} {value}: {args.data} brings its own splits")
        if value and not os.path.exists(value):
            p.error(f"--{flag} {value}: no such file or folder")
        if value and args.kind in ("nifti", "hdf5") and _kind(p, value, f"--{flag}") != args.kind:
            p.error(f"--{flag} {value}: {'an HDF5 file' if args.kind == 'nifti' else 'a NIfTI table'}, but --data "
                    f"{args.data} is {'a NIfTI table' if args.kind == 'nifti' else 'an HDF5 file'}: give --{flag} of "
                    "the same kind (wrn3d-prepare converts a table)")
    if args.val_split and (args.val or args.kind in ("hdf5", "medmnist")):
        p.error(f"--val-split {args.val_split:g}: " + ("give --val or --val-split, not both" if args.val else
                f"{args.data} cannot be split here (use --val)"))
    if args.limit and args.kind in ("nifti", "hdf5"):
        p.error(f"--limit {args.limit}: for medmnist, cifar and synthetic data (make a smaller table or file)")
    if args.no_check_sizes and args.kind != "medmnist":
        p.error("--no-check-sizes is for medmnist data")
    for flag in ("orientation", "spacing", "target_shape"):
        if getattr(args, flag) is not None and args.kind != "nifti":
            p.error(f"--{flag.replace('_', '-')}: reads scans (NIfTI tables and DICOM folders); "
                    + ("an HDF5 file was read by wrn3d-prepare, which takes it" if args.kind == "hdf5" else
                       f"{args.data} holds arrays"))
    for flag in ("out", "export"):
        value = getattr(args, flag)
        if value and os.path.isfile(value):
            p.error(f"--{flag} {value}: is a file; give a folder")
    if not args.out:
        args.out = os.path.join("runs", f"{_data_name(args)}-{time.strftime('%Y%m%d-%H%M%S')}")
        args.argv += ["--out", args.out]
    if not args.resume and os.path.exists(os.path.join(args.out, "run.json")):
        p.error(f"--out {args.out}: holds a run already (run.json); pass --resume to continue it, or another --out")
    args.checkpoint = os.path.join(args.out, "last.h5")   # what --resume and --checkpoint-every read
    check_training_flags(p, args)
    return args


def _rerun(p, args):
    try:
        with open(args.rerun, encoding="utf-8") as fh:
            argv = json.load(fh)["argv"]
        if not (isinstance(argv, list) and all(isinstance(v, str) for v in argv)):
            raise ValueError("its argv is not a list of strings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"--rerun {args.rerun}: not a run.json written by {_CLI} ({e})")
    argv = _without(argv, "--out", "--export")   # a re-run never writes over the first run's files
    argv += ["--out", args.out] if args.out else []
    again = p.parse_args(argv)
    again.argv = argv
    return again


def _kind(p, data, flag="--data"):
    if data in ARRAY_SOURCES:
        return data
    if data.startswith("medmnist:"):
        return "medmnist"
    if not os.path.exists(data):
        p.error(f"{flag} {data}: no such file or folder (or give medmnist:FLAG[@SIZE], cifar10, cifar100, synthetic)")
    if os.path.isdir(data):
        return "nifti"
    ext = os.path.splitext(data)[1].lower()
    if ext in (".h5", ".hdf5"):
        return "hdf5"
    if ext in (".csv", ".tsv", ".txt"):
        return "nifti"
    p.error(f"{flag} {data}: not a NIfTI table (.csv or a folder) or an HDF5 file (.h5, .hdf5)")


def _data_name(args):
    if args.kind == "medmnist" or args.kind in ARRAY_SOURCES:
        return args.data.replace(":", "-").replace("@", "-")
    return os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]


# --------------------------------------------------------------------- run
def run_record(argv, args, data):
    """``run.json``'s contents: the exact command, versions, devices and data fingerprints."""
    import platform

    import numpy as np
    import tensorflow as tf

    import wrn3d_tl
    from wrn3d_tl import cpu

    return {"argv": list(argv), "command": shlex.join([_CLI, *argv]), "cwd": os.getcwd(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"wrn3d_tl": wrn3d_tl.__version__, "tensorflow": tf.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "cpu": {"model": cpu.cpu_model(), "flags": cpu.cpu_flags(relevant_only=True),
                    "onednn": cpu.onednn_status()},
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "data": data.fingerprints}


def _build_trainer(args, data, run_dir, strategy):
    """``(trainer, steps, selection)``: a new run, or the run folder's newest verified
    checkpoint with ``--resume``."""
    import contextlib

    import tensorflow as tf

    from wrn3d_tl.config import WRNConfig
    from wrn3d_tl.data import balanced_class_weights
    from wrn3d_tl.experiment import (auto_batch_size, find_resume_point, initial_model, plan_steps, precision,
                                     resume, trainable_of)
    from wrn3d_tl.model import build_wrn
    from wrn3d_tl.train import Trainer

    strides = (1, (1, 2, 2), (1, 2, 2)) if args.keep_depth and len(data.input_shape) == 4 else (1, 2, 2)
    config = WRNConfig(depth=args.depth, widen_factor=args.width, num_classes=data.num_classes,
                       input_shape=data.input_shape, dropout=args.dropout, group_strides=strides)
    point = find_resume_point(os.path.join(run_dir, "last.h5")) if args.resume else (None, None)
    if args.resume and not point[0]:
        raise ValueError(f"--resume: no verified checkpoint in {run_dir} (last.h5 or ckpt-*.h5)")
    stored = point[1]["trainer"] if point[0] else {}
    mp = precision(args.mixed_precision)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    batch_size = args.batch_size
    if batch_size == "auto":
        batch_size = stored.get("batch_size") or auto_batch_size(config, mixed_precision=mp, replicas=replicas,
                                                                 memory_budget=args.memory_budget)
        print(f"--batch-size auto: {batch_size}", flush=True)
    batch_size = min(batch_size, data.n_train // replicas * replicas or replicas)
    if args.iters is None and args.epochs is None and stored.get("total_steps"):
        steps = stored["total_steps"]   # a resumed run keeps its plan unless told otherwise
    else:
        epochs = DEFAULT_EPOCHS if args.iters is None and args.epochs is None else args.epochs
        steps = plan_steps(data.n_train, batch_size, iters=args.iters, epochs=epochs)
    if point[0] and data.normalization is None and point[1]["normalization"] is not None:
        data.normalization = point[1]["normalization"]   # e.g. --init-from's stats, stored with the run
    weights = None
    if args.class_weight == "balanced":
        try:
            weights = [float(w) for w in balanced_class_weights(data.train_labels, data.num_classes)]
        except ValueError as e:
            raise ValueError(f"--class-weight balanced: {e}") from None
    tf.random.set_seed(args.seed)   # the initial weights (a fresh head's, with --init-from)
    model = None
    if args.init_from and not point[0]:
        model, init_norm = initial_model(args.init_from, input_shape=data.input_shape, num_classes=data.num_classes,
                                         strategy=strategy)
        print(f"--init-from {args.init_from}: {model.wrn_config.name}, padding {model.wrn_config.padding}", flush=True)
        if data.normalization is None and init_norm is not None:   # the units the pretrained network expects
            data.normalization = init_norm
            print("normalisation: --init-from's (the data has no stats of its own)", flush=True)
    train = data.train(batch_size, True)
    run = dict(logdir=os.path.join(run_dir, "logs"), checkpoint_every=args.checkpoint_every or None,
               checkpoint_dir=run_dir if args.checkpoint_every else None)   # ckpt-*.h5 beside last.h5
    settings = dict(lr=args.lr, schedule=args.schedule, total_steps=steps, warmup_steps=args.warmup_steps,
                    weight_decay=args.weight_decay, mixed_precision=mp, seed=args.seed, batch_size=batch_size)
    selection = Selection(run_dir, args.select, args.patience)
    if point[0]:
        if (stored.get("class_weight") is None) != (weights is None):
            raise ValueError(f"--resume: {point[0]} was trained with --class-weight "
                             f"{'balanced' if stored.get('class_weight') else 'none'}; resume with it")
        trainer = resume(point, config, train, settings={**settings, "freeze": args.freeze}, strategy=strategy, **run)
        if os.path.exists(selection.path):
            selection.load(trainer.step, os.path.join(run_dir, "best.h5"))
        print(f"resumed from {point[0]} at step {trainer.step}", flush=True)
        return trainer, steps, selection
    if model is None:
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = build_wrn(config)
    trainer = Trainer(model, train, strategy=strategy, normalization=data.normalization,
                      trainable=trainable_of(args.freeze), class_weight=weights, class_names=data.class_names,
                      **settings, **run)
    return trainer, steps, selection


def _summary(result, class_names):
    from wrn3d_tl.evaluation import class_name_list

    names = class_name_list(class_names, len(result["per_class_accuracy"]))
    return {"loss": result["loss"], "accuracy": result["accuracy"], "auc": result["auc"],
            "samples": result["samples"], "class_names": names, "confusion_matrix": result["confusion_matrix"],
            "per_class": {n: {"accuracy": a, "auc": u} for n, a, u in zip(names, result["per_class_accuracy"],
                                                                          result["auc_per_class"])}}


def main(argv=None):
    """The ``wrn3d-train`` command; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return e.code
    try:
        return _main(args)
    except CommandError as e:
        return error_line(_CLI, e)
    finally:   # the run's pipelines end here, not in TensorFlow's teardown after Python's
        import gc

        gc.collect()


def _without(argv, *flags):
    """``argv`` without the given flags and their values (``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for v in argv:
        if skip:
            skip = False
        elif v in flags:
            skip = True
        elif not v.startswith(tuple(f"{f}=" for f in flags)):
            out.append(v)
    return out


def _main(args):
    if args.distribute == "none":   # a strategy must set up its devices before TensorFlow starts
        quiet_tensorflow()
    from wrn3d_tl.distribute import make_strategy

    t0 = time.perf_counter()
    run_dir = args.out
    try:
        strategy = make_strategy(args.distribute, args.cpu_replicas, args.collective_timeout)
        os.makedirs(run_dir, exist_ok=True)
        data = open_data(args, run_dir)
        record = _record(args, data, run_dir)
        trainer, steps, selection = _build_trainer(args, data, run_dir, strategy)
        batch = trainer.batch_size
        val = data.val(batch) if data.val else None
        test = data.test(batch) if data.test else None
    except (OSError, ValueError) as e:
        raise CommandError(e) from None
    cfg = trainer.config
    eval_every = max(1, data.n_train // batch) if args.eval_every is None else args.eval_every
    print(f"{cfg.name} {cfg.spatial_rank}D, input {cfg.input_shape}, {data.description}, batch {batch}, "
          f"{steps} iterations, {args.schedule} schedule"
          + (f", val every {eval_every} selecting by {args.select}" if val is not None else ", no validation data: "
             "the last step is the selected model") + f" -> {run_dir}", flush=True)
    record["trainer"] = trainer.hyperparameters()
    write_json(os.path.join(run_dir, "run.json"), record)
    stopped = train_and_select(trainer, steps, val, selection, run_dir, eval_every)
    train_seconds = time.perf_counter() - t0
    trainer.load_weights(os.path.join(run_dir, "best.h5"))
    metrics = {"selected": {"by": args.select if val is not None else "last step", "step": selection.best_step,
                            "value": selection.best, "steps_trained": trainer.step, "planned_steps": steps,
                            "stopped_early": stopped, "history": selection.history}}
    results = {}
    for name, split in (("val", val), ("test", test)):
        if split is not None:
            try:   # a split whose labels or classes do not fit the training data's
                results[name] = trainer.evaluate(split, report_dir=os.path.join(run_dir, name), log=False)
            except ValueError as e:
                raise CommandError(f"--{name} {getattr(args, name) or '(--val-split)'}: {e}") from None
            metrics[name] = _summary(results[name], trainer.class_names)
            r = results[name]
            print(f"{name:5} (step {selection.best_step})  loss {r['loss']:.4f}  acc {r['accuracy']:.4f}  "
                  f"auc {r['auc']:.4f}  ({r['samples']} samples)", flush=True)
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    shown = "test" if "test" in results else "val" if "val" in results else None
    if not args.no_report and trainer.is_chief:
        from wrn3d_tl.report import run_report

        trainer.eval_data = test if shown == "test" else val
        extra = {"data": args.data, "selected step": selection.best_step, "selected by": metrics["selected"]["by"],
                 "iterations": trainer.step, "batch size": batch, "schedule": trainer.schedule}
        if shown:
            extra[f"{shown} accuracy"] = results[shown]["accuracy"]
        print(f"report: {run_report(trainer, run_dir, evaluation=results.get(shown), extra=extra)}", flush=True)
    if args.export and trainer.is_chief:
        from wrn3d_tl.export import export_saved_model

        print(f"export: {export_saved_model(trainer, args.export)}", flush=True)
    trainer.close()
    record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(time.perf_counter() - t0, 1),
                  train_seconds=round(train_seconds, 1), selected_step=selection.best_step)
    write_json(os.path.join(run_dir, "run.json"), record)
    print(f"done: {trainer.step} iterations, selected step {selection.best_step}, "
          f"{time.perf_counter() - t0:.1f} s -> {run_dir}", flush=True)
    return 0


def _record(args, data, run_dir):
    """``run.json``'s contents: a new run's, or, with ``--resume``, the run's own record with
    this resumption added, after checking that the data and the selection are the run's."""
    path = os.path.join(run_dir, "run.json")
    if not (args.resume and os.path.exists(path)):
        return {**run_record(args.argv, args, data), "select": args.select if data.val else None}
    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    conflicts = []
    for flag in sorted(set(record.get("data", {})) | set(data.fingerprints)):
        was, now = record.get("data", {}).get(flag), data.fingerprints.get(flag)
        if was != now and not (was and now and {**was, "path": None} == {**now, "path": None}):
            conflicts.append(f"{flag}: " + ("not given" if now is None else "absent" if was is None else
                                            "other data") + f" (the run's: {was['path'] if was else 'none'})")
    select = args.select if data.val else None
    if record.get("select") != select:
        conflicts.append(f"--select {select} (the run's: {record.get('select')})")
    if conflicts:
        raise ValueError(f"--resume: {run_dir} was trained on other data or selected otherwise: "
                         + "; ".join(conflicts) + ". Resume with the run's own command (run.json) or start a new run")
    record.setdefault("resumed", []).append({"argv": args.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return record


if __name__ == "__main__":
    sys.exit(main())
