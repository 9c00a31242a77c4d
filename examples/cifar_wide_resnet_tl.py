#!/usr/bin/env python
"""Train a 3D (or 2D) Wide ResNet on CIFAR images tiled into volumes — the main job.

    python examples/cifar_wide_resnet_tl.py --iters 10

Real CIFAR is read from disk when present (see README: Data); otherwise a learnable
synthetic set with CIFAR's shapes is used and one loud line says so. The seed project's
pattern — outside code stepping the trainer one iteration at a time — is ``make_trainer``::

    from cifar_wide_resnet_tl import make_trainer
    trainer = make_trainer(iters=10)
    for _ in range(10):
        print(trainer.train_step())
"""

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wrn3d_tl.distribute import WORKER_LOST_ERRORS  # noqa: E402

DEFAULTS = dict(dataset="cifar10", data_dir=None, download=False, depth=16, width=4, dims=3, volume_depth=8,
                tile_mode="repeat", batch_size=32, lr=0.1, schedule="step", iters=None, epochs=None,
                warmup_steps=0, weight_decay=5e-4, dropout=0.0, mixed_precision="none", seed=0,
                eval_every=0, eval_samples=500, checkpoint=None, checkpoint_every=0, resume=False,
                logdir=None, plot=None, synthetic_train=10000, synthetic_test=2000, distribute="none",
                cpu_replicas=None, collective_timeout=None, recompute=False, memory_budget=None)


def _batch_size(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}")
    return value


def auto_batch_size(config, o, replicas):
    """The largest batch (a multiple of the replica count) that fits the memory budget."""
    from wrn3d_tl.model import largest_batch

    budget = o["memory_budget"] * 2 ** 30 if o["memory_budget"] else \
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
    mp = None if o["mixed_precision"] in (None, "none") else o["mixed_precision"]
    batch = largest_batch(config, budget, mixed_precision=mp, recompute=o["recompute"], multiple_of=replicas)
    return min(batch, 4096)


def parse_args(argv=None):
    """The command line; every flag's default is in ``DEFAULTS``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--dataset", choices=["cifar10", "cifar100", "synthetic"], help="cifar10 falls back to synthetic if absent")
    a("--data-dir", help="folder holding CIFAR (folder or .tar.gz); else $WRN3D_DATA_DIR, ~/.keras/datasets")
    a("--download", action="store_true", help="allow fetching CIFAR through keras.datasets")
    a("--depth", type=int, help="WRN depth d = 6n + 4")
    a("--width", type=int, help="widening factor k")
    a("--dims", type=int, choices=[2, 3], help="3: tile images into volumes; 2: plain images")
    a("--volume-depth", type=int, help="slices per volume (3D)")
    a("--tile-mode", choices=["repeat", "shift"])
    a("--batch-size", type=_batch_size, help="global batch size, or 'auto': the largest that fits --memory-budget")
    a("--memory-budget", type=float, help="GiB for --batch-size auto (default: half of this machine's RAM)")
    a("--recompute", action="store_true", help="recompute block activations in the backward pass (less memory)")
    a("--lr", type=float)
    a("--schedule", choices=["constant", "step", "cosine"])
    a("--warmup-steps", type=int)
    a("--weight-decay", type=float)
    a("--dropout", type=float)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iters", type=int, help="training iterations (default 10)")
    g.add_argument("--epochs", type=float, help="training epochs over the training split")
    a("--eval-every", type=int, help="evaluate every N iterations (0: only at the end)")
    a("--eval-samples", type=int, help="test samples per evaluation (0: the whole test split)")
    a("--checkpoint", help="checkpoint file written at every evaluation and at the end")
    a("--checkpoint-every", type=int, help="also save {checkpoint dir}/ckpt-XXXXXXXX.h5 every N iterations")
    a("--resume", action="store_true", help="continue from --checkpoint if it exists")
    a("--logdir", help="metrics.csv and TensorBoard scalars go here")
    a("--plot", help="PNG of loss/accuracy curves written at the end (needs --logdir)")
    a("--mixed-precision", choices=["none", "bf16", "fp16"])
    a("--seed", type=int)
    a("--distribute", choices=["none", "mirrored", "multiworker"],
      help="mirrored: every local GPU (or --cpu-replicas N CPUs); multiworker: the cluster in TF_CONFIG")
    a("--cpu-replicas", type=int, help="with --distribute mirrored: N logical CPU devices (testing)")
    a("--collective-timeout", type=float, help="multiworker: seconds before a stalled all-reduce aborts")
    p.set_defaults(**DEFAULTS)
    args = p.parse_args(argv)
    if args.plot and not args.logdir:
        p.error("--plot needs --logdir")
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint")
    if args.cpu_replicas is not None and args.distribute != "mirrored":
        p.error("--cpu-replicas needs --distribute mirrored")
    return args


def load_data(opts):
    """(x_train, y_train), (x_test, y_test), num_classes, source description."""
    from wrn3d_tl.data import load_cifar, synthetic_cifar

    if opts["dataset"] != "synthetic":
        try:
            (xtr, ytr), (xte, yte) = load_cifar(opts["dataset"], data_dir=opts["data_dir"], download=opts["download"])
            return (xtr, ytr), (xte, yte), 100 if opts["dataset"] == "cifar100" else 10, opts["dataset"]
        except FileNotFoundError:
            if opts["dataset"] == "cifar100" or opts["data_dir"]:
                raise
            print("!!! CIFAR-10 NOT FOUND ON DISK: TRAINING ON SYNTHETIC DATA INSTEAD (put cifar-10-python.tar.gz "
                  "in ~/.keras/datasets, set WRN3D_DATA_DIR or pass --data-dir; --download fetches it) !!!", flush=True)
    train, test = synthetic_cifar(opts["synthetic_train"], opts["synthetic_test"], num_classes=10, seed=opts["seed"])
    return train, test, 10, "synthetic"


def newest_checkpoint(path):
    """The newest intact checkpoint among ``path`` and the ``ckpt-XXXXXXXX.h5`` files beside
    it (by stored step), or None. Damaged candidates are reported and skipped."""
    from wrn3d_tl.checkpoint import CheckpointError, checkpoint_contents
    from wrn3d_tl.train import list_checkpoints

    if not path:
        return None
    periodic = list_checkpoints(os.path.dirname(os.path.abspath(path)))[::-1]  # newest first
    best = None
    for named_step, cand in [(None, path)] + periodic:
        if not os.path.exists(cand) or (best and named_step is not None and named_step <= best[0]):
            continue
        try:
            step = checkpoint_contents(cand)["step"]
        except CheckpointError as e:
            print(f"skipping damaged checkpoint: {e}", flush=True)
            continue
        if best is None or step > best[0]:
            best = (step, cand)
    return best[1] if best else None


def make_trainer(**options):
    """Build the data pipelines, the WRN and its ``Trainer`` from the script's options.

    Keyword arguments are the flags' names with underscores (see ``DEFAULTS``). The test
    pipeline is attached as ``trainer.test_data`` (a tf.data.Dataset) and the total number
    of iterations as ``trainer.planned_steps``.
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"make_trainer: unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    from wrn3d_tl.distribute import make_strategy

    # First: multi-worker and logical-device set-up must precede any TensorFlow work.
    strategy = make_strategy(o["distribute"], o["cpu_replicas"], o["collective_timeout"])

    import tensorflow as tf

    from wrn3d_tl.data import compute_normalization, make_dataset
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    tf.random.set_seed(o["seed"])
    (xtr, ytr), (xte, yte), num_classes, source = load_data(o)
    if o["eval_samples"]:
        xte, yte = xte[:o["eval_samples"]], yte[:o["eval_samples"]]
    depth = o["volume_depth"] if o["dims"] == 3 else None
    shape = ((depth,) if depth else ()) + tuple(xtr.shape[1:])
    config = WRNConfig(depth=o["depth"], widen_factor=o["width"], num_classes=num_classes, input_shape=shape,
                       dropout=o["dropout"])
    batch_size = o["batch_size"]
    if batch_size == "auto":
        batch_size = auto_batch_size(config, o, strategy.num_replicas_in_sync if strategy else 1)
        print(f"--batch-size auto: {batch_size}", flush=True)
    steps_per_epoch = max(1, len(xtr) // batch_size)
    if o["epochs"] is not None:
        steps = max(1, int(o["epochs"] * steps_per_epoch))
    else:
        steps = o["iters"] if o["iters"] is not None else 10
    norm = compute_normalization(xtr)
    common = dict(volume_depth=depth, tile_mode=o["tile_mode"], normalization=norm, seed=o["seed"])
    train_ds = make_dataset(xtr, ytr, batch_size=batch_size, training=True, drop_remainder=True,
                            repeat=True, **common)
    test_ds = make_dataset(xte, yte, batch_size=100, training=False, **common)
    mp = None if o["mixed_precision"] in (None, "none") else o["mixed_precision"]
    ckpt_dir = os.path.dirname(os.path.abspath(o["checkpoint"])) if o["checkpoint"] else None
    trainer_kwargs = dict(lr=o["lr"], schedule=o["schedule"], total_steps=steps, warmup_steps=o["warmup_steps"],
                          weight_decay=o["weight_decay"], mixed_precision=mp, seed=o["seed"], normalization=norm,
                          batch_size=batch_size,
                          logdir=o["logdir"], checkpoint_dir=ckpt_dir if o["checkpoint_every"] else None,
                          checkpoint_every=o["checkpoint_every"] or None)
    resume_from = newest_checkpoint(o["checkpoint"]) if o["resume"] else None
    if resume_from:
        trainer = Trainer.restore(resume_from, train_ds, strategy=strategy, recompute=o["recompute"],
                                  logdir=o["logdir"],
                                  checkpoint_dir=trainer_kwargs["checkpoint_dir"],
                                  checkpoint_every=trainer_kwargs["checkpoint_every"])
        if trainer.config != config:
            raise SystemExit(f"--resume: {resume_from} holds {trainer.config.name} {trainer.config.input_shape}, "
                             f"but the flags ask for {config.name} {config.input_shape}")
        # The pipeline is deterministic for its seed: skipping the batches already used
        # makes the resumed run see exactly the batches an uninterrupted run would.
        trainer.train_data = train_ds.skip(trainer.step)
        print(f"resumed from {resume_from} at step {trainer.step}", flush=True)
    else:
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = build_wrn(config, recompute=o["recompute"])
        trainer = Trainer(model, train_ds, strategy=strategy, **trainer_kwargs)
    trainer.test_data = test_ds
    trainer.planned_steps = steps
    trainer.data_source = source
    return trainer


def main(argv=None):
    """Run the job; returns the final evaluation dict."""
    args = parse_args(argv)
    opts = {k: getattr(args, k) for k in DEFAULTS}
    t0 = time.perf_counter()
    trainer = make_trainer(**opts)
    cfg = trainer.config
    print(f"{cfg.name} {cfg.spatial_rank}D, input {cfg.input_shape}, {trainer.data_source}, "
          f"batch {trainer.batch_size}, {trainer.planned_steps} iterations, schedule {trainer.schedule}", flush=True)
    ckpt = opts["checkpoint"]
    try:
        m = run(trainer, opts, ckpt)
    except WORKER_LOST_ERRORS as e:
        if opts["distribute"] != "multiworker":
            raise
        print(f"[wrn3d_tl] ERROR: lost contact with another worker at step {trainer.step + 1} "
              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Restart every worker with --resume "
              "to continue from the last checkpoint.", file=sys.stderr, flush=True)
        sys.exit(3)
    t_train = time.perf_counter() - t0
    result = trainer.evaluate(trainer.test_data)
    print(f"test  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  top5 {result['top5_accuracy']:.4f}  "
          f"({result['samples']} samples)", flush=True)
    if ckpt:
        path = trainer.save(ckpt)
        if path:
            print(f"checkpoint: {path}")
    if opts["plot"] and trainer.is_chief:
        print(f"plot: {trainer.plot(opts['plot'])}")
    trainer.close()
    final_loss = m["loss"] if m else float("nan")
    print(f"summary: {trainer.step} iterations, final train loss {final_loss:.4f}, "
          f"test accuracy {result['accuracy']:.4f}, {time.perf_counter() - t0:.1f} s total "
          f"({t_train:.1f} s to the end of training, start-up included)", flush=True)
    return result


def run(trainer, opts, ckpt):
    """The training loop: one printed line per iteration (under a progress bar when the
    terminal shows one), periodic evaluation and checkpoints."""
    from tqdm.auto import tqdm

    def on_step(m):
        tqdm.write(f"iter {m['step']:>5}/{trainer.planned_steps}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  "
                   f"lr {m['lr']:.4g}  {m['samples_per_sec']:.1f} vol/s", file=sys.stdout)
        sys.stdout.flush()

    def on_eval(step, result):
        tqdm.write(f"eval  step {step}  loss {result['loss']:.4f}  acc {result['accuracy']:.4f}  "
                   f"top5 {result['top5_accuracy']:.4f}", file=sys.stdout)
        if ckpt:
            trainer.save(ckpt)

    return trainer.fit(trainer.planned_steps, eval_data=trainer.test_data, eval_every=opts["eval_every"],
                       on_step=on_step, on_eval=on_eval, progress=None)


if __name__ == "__main__":
    main()
