"""Ready-to-step trainers: data -> config -> model -> trainer, resume included.

The seed project's pattern, in which outside code (a tuner, an RL agent) steps a ready
trainer one iteration at a time, needs no script on ``sys.path``::

    from wrn3d_tl.experiment import make_trainer

    trainer = make_trainer(dataset="synthetic", depth=10, width=2, volume_depth=4, batch_size=16)
    for _ in range(10):
        print(trainer.train_step())
    print(trainer.evaluate())            # the test split, trainer.eval_data

``examples/cifar_wide_resnet_tl.py`` (the main job) is this module plus a command line.
``resume`` is what the main job's and ``wrn3d-train``'s ``--resume`` do.
"""

import contextlib
import dataclasses

__all__ = ["DEFAULTS", "Experiment", "ResumeError", "build_experiment", "make_trainer", "load_data",
           "auto_batch_size", "device_budget", "find_resume_point", "resume", "plan_steps", "precision",
           "initial_model", "trainable_of"]

# The options of make_trainer and of the main job's command line (flag names with "-").
DEFAULTS = dict(dataset="cifar10", data_dir=None, download=False, depth=16, width=4, dims=3, volume_depth=8,
                tile_mode="repeat", batch_size=32, lr=0.1, schedule="step", iters=None, epochs=None,
                warmup_steps=0, weight_decay=5e-4, dropout=0.0, mixed_precision="none", seed=0,
                eval_every=0, eval_samples=500, checkpoint=None, checkpoint_every=0, resume=False,
                logdir=None, plot=None, synthetic_train=10000, synthetic_test=2000, distribute="none",
                cpu_replicas=None, collective_timeout=None, recompute=False, memory_budget=None, init_from=None,
                freeze=None)
DEFAULT_ITERS = 10  # when neither iters nor epochs is given


class ResumeError(ValueError):
    """A checkpoint to resume from does not match what the run asks for."""


@dataclasses.dataclass
class Experiment:
    """What ``build_experiment`` assembles.

    Attributes:
        trainer: the ``Trainer`` (its ``eval_data`` is the test pipeline).
        steps: how many iterations the run is planned for (from ``iters``/``epochs``).
        data_source: "cifar10", "cifar100" or "synthetic".
        resumed_from: the checkpoint the trainer was restored from, or None.
    """

    trainer: object
    steps: int
    data_source: str
    resumed_from: str = None


def load_data(opts):
    """``(x_train, y_train), (x_test, y_test), num_classes, source`` for the options ``opts``.

    Real CIFAR from disk when present; for ``dataset="cifar10"`` without CIFAR on disk (and
    no ``data_dir``), a synthetic set with CIFAR's shapes, announced by one loud line.
    """
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


# Shares of a device's memory --batch-size auto budgets. Host RAM also holds the data, the
# Python process and TensorFlow itself. A GPU's allocator limit holds tensors only, but
# estimate_memory was fitted on CPU runs and cuDNN workspaces and allocator fragmentation
# come on top (not yet measured on a GPU).
HOST_MEMORY_SHARE = 0.5
GPU_MEMORY_SHARE = 0.8


def device_budget(devices, memory_budget=None):
    """``(bytes per budget, description)`` for ``--batch-size auto`` on ``devices`` (names, see
    ``wrn3d_tl.devices.training_devices``): ``memory_budget`` GiB when given, else
    ``GPU_MEMORY_SHARE`` of the smallest GPU's memory when the job trains on GPUs (each
    replica's share of the batch must fit its own GPU), else ``HOST_MEMORY_SHARE`` of the
    machine's RAM (which logical CPU replicas share)."""
    from wrn3d_tl.devices import device_kind, device_memory_bytes

    kinds = {device_kind(d) for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"devices: --batch-size auto needs replicas of one kind, got {sorted(devices)}")
    gpu = kinds == {"GPU"}
    per = " per GPU" if gpu else ""
    if memory_budget:
        return memory_budget * 2 ** 30, f"--memory-budget {memory_budget:g} GiB{per}"
    if gpu:
        sizes = {d: device_memory_bytes(d) for d in devices}
        smallest = min(sizes, key=sizes.get)
        return (GPU_MEMORY_SHARE * sizes[smallest],
                f"{GPU_MEMORY_SHARE:.0%} of {sizes[smallest] / 2 ** 30:.3g} GiB on {smallest}{per}")
    ram = device_memory_bytes(devices[0])
    return HOST_MEMORY_SHARE * ram, f"{HOST_MEMORY_SHARE:.0%} of this machine's {ram / 2 ** 30:.3g} GiB of RAM"


def auto_batch_size(config, *, mixed_precision=None, recompute=False, replicas=1, memory_budget=None,
                    devices=None):
    """The largest global batch (a multiple of ``replicas``, at most 4096) whose estimated
    training memory fits the budget of ``devices`` (default: where TensorFlow places ops,
    ``wrn3d_tl.devices.training_devices()``); see ``device_budget`` for the budget. On GPUs
    the budget is per GPU and holds one replica's share of the batch."""
    from wrn3d_tl.devices import device_kind, training_devices
    from wrn3d_tl.memory import largest_batch

    devices = list(devices or training_devices())
    budget, source = device_budget(devices, memory_budget)
    per_device = device_kind(devices[0]) == "GPU"
    try:
        batch = largest_batch(config, budget, mixed_precision=mixed_precision, recompute=recompute,
                              multiple_of=1 if per_device else replicas)
    except ValueError as e:
        raise ValueError(f"--batch-size auto with a budget of {budget / 2 ** 30:.3g} GiB ({source}): {e}") from None
    if per_device:
        batch *= replicas
    return min(batch, 4096 // replicas * replicas)


# Trainer settings a resumed run must share with its checkpoint (they shape the path
# already taken: the learning rates, the batches), and the flags that set them.
RESUME_FIXED = {"lr": "--lr", "schedule": "--schedule", "warmup_steps": "--warmup-steps",
                "weight_decay": "--weight-decay", "batch_size": "--batch-size", "seed": "--seed"}
# WRNConfig fields -> the flag that sets each (input_shape comes from the data).
CONFIG_FLAGS = {"depth": "--depth", "widen_factor": "--width", "dropout": "--dropout", "group_strides": "--keep-depth",
                "num_classes": "the data's classes", "input_shape": "the data's volume shape"}


def initial_model(path, *, input_shape, num_classes, strategy=None, recompute=False):
    """``(model, stored normalisation)`` of a checkpoint to fine-tune from (``--init-from``):
    its network (depth, width, padding, strides come from the file) with its weights.
    ValueError when its input shape or classes are not the data's."""
    from wrn3d_tl.loading import load_model

    model, config, norm = load_model(path, strategy=strategy, recompute=recompute)
    if config.input_shape != tuple(input_shape) or config.num_classes != num_classes:
        raise ValueError(f"--init-from {path}: holds {config.name} on input {config.input_shape} with "
                         f"{config.num_classes} classes, but the data has {tuple(input_shape)} and {num_classes} "
                         "classes (wrn3d-convert --input-size/--volume-depth/--in-channels/--num-classes makes a matching one)")
    return model, norm


def trainable_of(freeze):
    """``Trainer(trainable=...)`` for a ``--freeze`` list: every weight not under it."""
    from wrn3d_tl.train import under

    return (lambda name: not under(name, freeze)) if freeze else None


def plan_steps(n_train, batch_size, *, iters=None, epochs=None, default=None):
    """How many iterations a run plans: ``iters``; else ``epochs`` over ``n_train`` samples
    (at least one step per epoch); else ``default`` (None: one epoch)."""
    if iters is not None:
        return int(iters)
    per_epoch = max(1, n_train // batch_size)
    if epochs is not None:
        return max(1, int(epochs * per_epoch))
    return per_epoch if default is None else int(default)


def find_resume_point(checkpoint):
    """``(path, contents)`` of the newest verified checkpoint among ``checkpoint`` and the
    periodic ``ckpt-XXXXXXXX.h5`` files beside it (damaged ones reported and skipped), or
    ``(None, None)``. ``contents``: ``checkpoint_contents`` (config, trainer, step,
    normalization)."""
    from wrn3d_tl.checkpoint import CheckpointManager, checkpoint_contents

    path = CheckpointManager.beside(checkpoint).newest_verified(also=[checkpoint])
    return (path, checkpoint_contents(path)) if path else (None, None)


def resume(point, config, train_data, *, settings=None, strategy=None, recompute=False, **overrides):
    """Restore the trainer of ``point`` (from ``find_resume_point``) after checking that the
    run asks for the same thing; returns the trainer.

    ``settings``: the trainer settings the command line asks for. What a resumed run does
    with each, so that nothing is ignored silently:

    * ``mixed_precision``: applied (weights are float32 in every precision);
    * ``total_steps`` (``--iters``/``--epochs``): fewer steps than planned stop early on
      the stored schedule; more steps extend a constant schedule; more steps on a decaying
      schedule ("step", "cosine") are refused, since the learning rate would stay at the
      schedule's final value (0 for cosine) for every added step;
    * ``RESUME_FIXED`` settings (lr, schedule, warm-up, weight decay, batch size, seed),
      the ``WRNConfig`` and the normalisation ``train_data`` applies: must equal the
      stored ones.

    Any conflict raises ``ResumeError``: one line naming each flag, its value and the
    stored one. ``train_data`` is positioned at the restored step
    (``wrn3d_tl.data.starting_at``: whole epochs are skipped by arithmetic, no batch is
    produced to be dropped); the pipelines are deterministic for their seed, so the resumed
    run sees the batches an uninterrupted run would.
    """
    from wrn3d_tl.config import WRNConfig
    from wrn3d_tl.data import normalization_of, same_normalization, starting_at
    from wrn3d_tl.train import Trainer

    path, contents = point
    stored, hp = WRNConfig.from_dict(contents["config"]), contents["trainer"]
    conflicts = [f"{CONFIG_FLAGS.get(f.name, f.name)}: {f.name}={getattr(config, f.name)!r} "
                 f"(stored {getattr(stored, f.name)!r})"
                 for f in dataclasses.fields(WRNConfig) if getattr(stored, f.name) != getattr(config, f.name)]
    settings = dict(settings or {})
    for key, flag in RESUME_FIXED.items():
        if key in settings and key in hp and settings[key] != hp[key]:
            conflicts.append(f"{flag} {settings[key]} (stored {hp[key]!r})")
    known, stats = normalization_of(train_data)
    if known and not same_normalization(stats, contents["normalization"]):
        conflicts.append(f"the training data's normalisation {stats} (stored {contents['normalization']})")
    if "freeze" in settings and bool(settings["freeze"]) != (hp.get("trainable") is not None):
        conflicts.append(f"--freeze {' '.join(settings['freeze'] or []) or '(none)'} (stored: "
                         + ("a frozen part" if hp.get("trainable") else "everything trained") + ")")
    steps = settings.get("total_steps")
    if steps is not None and hp.get("total_steps") is not None and steps > hp["total_steps"]:
        if hp.get("schedule", "constant") != "constant":
            conflicts.append(f"--iters/--epochs: {steps} steps (stored plan: {hp['total_steps']} steps on the "
                             f"{hp['schedule']} schedule, whose learning rate would stay at its final value for "
                             "every added step)")
        else:
            overrides["total_steps"] = steps
    if conflicts:
        raise ResumeError(f"--resume: {path} (step {contents['step']}) was trained with other settings: "
                          + "; ".join(conflicts) + ". Resume with the stored values or start a new run")
    if "mixed_precision" in settings:
        overrides["mixed_precision"] = settings["mixed_precision"]
    settings.pop("freeze", None)
    trainer = Trainer.restore(path, train_data, strategy=strategy, recompute=recompute, **overrides)
    trainer.train_data = starting_at(train_data, trainer.step)
    return trainer


def build_experiment(**options):
    """Build the data pipelines, the WRN and its ``Trainer`` from the main job's options.

    Keyword arguments are the main job's flags with underscores (see ``DEFAULTS``);
    unknown ones raise TypeError. Returns an ``Experiment``. With ``resume=True`` and a
    ``checkpoint``, the trainer continues from the newest verified checkpoint (see
    ``resume``; a resumed run with ``batch_size="auto"`` keeps the stored batch size, and
    without ``iters``/``epochs`` the stored plan). Missing data raises FileNotFoundError,
    a bad option or a conflicting checkpoint ValueError (``ResumeError``).
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"make_trainer: unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    from wrn3d_tl.distribute import make_strategy

    # First: multi-worker and logical-device set-up must precede any TensorFlow work.
    strategy = make_strategy(o["distribute"], o["cpu_replicas"], o["collective_timeout"])

    import tensorflow as tf

    from wrn3d_tl.checkpoint import CheckpointManager
    from wrn3d_tl.data import compute_normalization, make_dataset
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    tf.random.set_seed(o["seed"])
    point = find_resume_point(o["checkpoint"]) if o["resume"] and o["checkpoint"] else (None, None)
    stored = point[1]["trainer"] if point[0] else {}
    (xtr, ytr), (xte, yte), num_classes, source = load_data(o)
    if o["eval_samples"]:
        xte, yte = xte[:o["eval_samples"]], yte[:o["eval_samples"]]
    depth = o["volume_depth"] if o["dims"] == 3 else None
    shape = ((depth,) if depth else ()) + tuple(xtr.shape[1:])
    config = WRNConfig(depth=o["depth"], widen_factor=o["width"], num_classes=num_classes, input_shape=shape,
                       dropout=o["dropout"])
    if o["recompute"] and o["dropout"] > 0:
        raise ValueError("--recompute needs --dropout 0 (a recomputed dropout mask would differ from the forward one)")
    mp = precision(o["mixed_precision"])
    batch_size = o["batch_size"]
    if batch_size == "auto":
        from wrn3d_tl.devices import training_devices

        devices = training_devices(strategy)
        batch_size = stored.get("batch_size") or auto_batch_size(
            config, mixed_precision=mp, recompute=o["recompute"],
            replicas=strategy.num_replicas_in_sync if strategy else 1, memory_budget=o["memory_budget"],
            devices=devices)
        print(f"--batch-size auto: {batch_size}" + (" (the resumed run's)" if stored else
                                                    f" (budget: {device_budget(devices, o['memory_budget'])[1]})"),
              flush=True)
    steps = plan_steps(len(xtr), batch_size, iters=o["iters"], epochs=o["epochs"],
                       default=stored.get("total_steps") or DEFAULT_ITERS)
    norm = compute_normalization(xtr)
    common = dict(volume_depth=depth, tile_mode=o["tile_mode"], normalization=norm, seed=o["seed"])
    train_ds = make_dataset(xtr, ytr, batch_size=batch_size, training=True, drop_remainder=True,
                            repeat=True, **common)
    test_ds = make_dataset(xte, yte, batch_size=100, training=False, **common)
    ckpt_dir = CheckpointManager.beside(o["checkpoint"]).directory if o["checkpoint_every"] else None
    run = dict(logdir=o["logdir"], checkpoint_dir=ckpt_dir, checkpoint_every=o["checkpoint_every"] or None,
               eval_data=test_ds)
    settings = dict(lr=o["lr"], schedule=o["schedule"], total_steps=steps, warmup_steps=o["warmup_steps"],
                    weight_decay=o["weight_decay"], mixed_precision=mp, seed=o["seed"], batch_size=batch_size)
    if point[0]:
        trainer = resume(point, config, train_ds, settings={**settings, "freeze": o["freeze"]}, strategy=strategy,
                         recompute=o["recompute"], **run)
    else:
        if o["init_from"]:
            model, _ = initial_model(o["init_from"], input_shape=shape, num_classes=num_classes, strategy=strategy,
                                     recompute=o["recompute"])
            print(f"--init-from {o['init_from']}: {model.wrn_config.name}, padding {model.wrn_config.padding}; "
                  "inputs normalised with this data's stats", flush=True)
        else:
            with strategy.scope() if strategy else contextlib.nullcontext():
                model = build_wrn(config, recompute=o["recompute"])
        trainer = Trainer(model, train_ds, strategy=strategy, normalization=norm, trainable=trainable_of(o["freeze"]),
                          **settings, **run)
    return Experiment(trainer=trainer, steps=steps, data_source=source, resumed_from=point[0])


def precision(flag):
    """The ``--mixed-precision`` flag's value as ``Trainer(mixed_precision=...)`` takes it
    ("none" or "fp32" -> None)."""
    return None if flag in (None, "none", "fp32") else flag


def make_trainer(**options):
    """``build_experiment(**options).trainer``: a ready ``Trainer`` whose ``eval_data`` is
    the test pipeline and whose ``total_steps`` is the planned number of iterations."""
    return build_experiment(**options).trainer
