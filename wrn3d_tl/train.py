"""`Trainer`: one compiled training iteration per `train_step()` call, plus evaluation,
the paper's schedules, checkpoints, logs, mixed precision and tf.distribute.

The seed's pattern — an outside controller (a tuner, an RL agent) calling one step at a
time and changing the learning rate between steps — is the primary interface::

    trainer = Trainer(build_wrn(cfg), train_data=dataset, lr=0.1)
    for _ in range(10):
        print(trainer.train_step())      # {'loss': ..., 'accuracy': ..., 'lr': ..., 'step': ...}
        trainer.learning_rate *= 0.9     # takes effect at the next step, no retracing

Inputs are batches ``x`` of shape (B,) + config.input_shape (NDHWC for 3D, NHWC for 2D),
already normalised (``wrn3d_tl.data`` pipelines do it), and integer labels ``y`` (B,).
"""

import os
import time
import warnings

import numpy as np
import tensorflow as tf

from wrn3d_tl.validate import check_class_weight, check_int, check_number
from wrn3d_tl.config import check_mixed_precision
from wrn3d_tl.batches import CHECKS, BatchChecks, combine
from wrn3d_tl.checkpoint import CheckpointError, CheckpointManager, read_checkpoint, write_checkpoint
from wrn3d_tl.cpu import check_bf16_runs
from wrn3d_tl.data import as_normalization, data_errors, normalization_of, same_normalization
from wrn3d_tl.data.reading import check_class_names, check_preprocessing
from wrn3d_tl.evaluation import evaluation_report
from wrn3d_tl.feed import Feed
from wrn3d_tl.layers import variable_name
from wrn3d_tl.loading import assign_checked, stored_config_and_normalization, load_for_inference, load_model  # noqa: F401
from wrn3d_tl.logs import MetricsLogger, log, plot_metrics
from wrn3d_tl.metrics import classification_metrics
from wrn3d_tl.model import PRECISION_DTYPES, WRNConfig, build_wrn, graph_function
from wrn3d_tl.optim import FP16_MAX_FLOOR_SKIPS, SCHEDULES, SGD, LossScale, scheduled_lr

__all__ = ["Trainer", "describe_devices", "load_model", "load_for_inference", "under"]   # the loaders: wrn3d_tl.loading

LOG_EVERY_STEPS, LOG_EVERY_S = 50, 30.0   # fit's progress lines where no bar can show
# What the compiled functions return, packed in one float64 vector so that a step costs one
# host transfer, and named again on the host: the step's metrics and whether it was applied,
# or the evaluation batch's sums, then the input checks of the global batch.
STEP_FIELDS = ("loss", "accuracy", "ok", *CHECKS)
EVAL_FIELDS = ("ce_sum", "top1", "top5", "samples", *CHECKS)



def describe_devices():
    """A one-line description of where TensorFlow will compute (GPUs if visible, else CPU)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"GPU x{len(gpus)} ({', '.join(g.name for g in gpus)})"
    return f"CPU ({os.cpu_count()} cores; no GPU visible to TensorFlow)"


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


class Trainer:
    """Trains a WRN built by ``build_wrn`` with SGD (Nesterov momentum) and L2 weight decay
    (``wrn3d_tl.optim``).

    Args:
        model: a ``tl.models.Model`` from ``build_wrn`` (its ``wrn_config`` is saved in
            checkpoints). Under a strategy, build it inside ``strategy.scope()``.
        train_data: what ``train_step()`` pulls from when called without arguments: a
            ``tf.data.Dataset`` of (x, y) batches, or an ``(x, y)`` pair of arrays (then
            ``batch_size`` is required; batches are shuffled with ``seed``).
        lr, momentum, nesterov, weight_decay: SGD settings; the paper's are 0.1, 0.9, True,
            5e-4. Weight decay is L2 on convolution and dense kernels only (not BN, not bias),
            added to the gradient; the reported ``loss`` is the cross-entropy alone.
        schedule: "constant"; "step" (x0.2 at 30%, 60% and 80% of ``total_steps``, the
            paper's); "cosine" (to 0 at ``total_steps``). ``warmup_steps``: linear warm-up.
        mixed_precision: None (float32), "bf16" (CPU with AVX512_BF16/AMX, or GPU) or "fp16"
            (GPU, dynamic loss scaling; a run that stays non-finite at the smallest scale for
            ``wrn3d_tl.optim.FP16_MAX_FLOOR_SKIPS`` steps raises FloatingPointError). Weights,
            BN statistics, logits and loss stay float32.
        normalization: the data's per-channel stats (a ``wrn3d_tl.data.Normalization`` or
            its dict, validated here against the model's channels); stored in checkpoints so
            inference uses the same numbers.
        preprocessing: how raw files became the training volumes, a JSON-able dict such as
            ``{"reader": "nifti", "intensity": "zscore", "target_shape": None}``; None: read
            off ``train_data`` when its pipeline says (``nifti_dataset``, or ``hdf5_dataset``
            on a file from ``nifti_to_hdf5``). Stored in checkpoints; ``predict`` reads NIfTI
            inputs with it.
        class_names: the classes' names in index order (``num_classes`` str); None: read off
            ``train_data`` when its pipeline knows them (``nifti_dataset``, ``hdf5_dataset`` on
            a file with ``class_names``). Stored in checkpoints; predictions, exports, reports
            and montages show them.
        eval_data: what ``evaluate()`` reads when called without data (an ``(x, y)`` pair
            or a ``tf.data.Dataset``), e.g. the test split.
        strategy: a ``tf.distribute.Strategy`` or None. ``x``/``y`` given to ``train_step``
            are the GLOBAL batch (the same on every worker); each replica trains on its own
            slice, chosen by its global replica id. ``train_step()`` on a ``wrn3d_tl.data``
            pipeline instead gives every worker only its replicas' share to read and augment
            (``shard_input``); ``evaluate`` spreads every batch over the replicas.
        shard_input: True (default): under a strategy of several replicas, ``train_data``
            built by ``wrn3d_tl.data`` is split with ``distribute_datasets_from_function``
            (``wrn3d_tl.data.shards``: the same global batches as in one process, except for
            ``hdf5_dataset`` over several workers, whose workers read disjoint blocks). Data
            that cannot be split (another dataset, a partial last batch, ...) is read whole by
            every worker, with a UserWarning saying why. False: always read whole.
        logdir: when set, metrics go to ``{logdir}/metrics.csv`` and TensorBoard.
        checkpoint_dir, checkpoint_every, keep_checkpoints: save ``ckpt-XXXXXXXX.h5`` every
            N steps, keeping the newest K (a ``CheckpointManager``, ``trainer.checkpoints``).
        jit_compile: compile the step with XLA (off by default; slower for 3D convs on CPU).
        trainable: None (every weight) or what to fine-tune, the rest frozen: a list of
            name prefixes by path component (``["group3", "head"]``) or a predicate on a
            weight's name (``"group2/block1/conv1/kernel"``). Frozen weights get no gradient,
            no momentum and no weight decay; the batch-norm moving statistics of every layer
            keep updating in training mode. Stored in checkpoints as the chosen names.
        class_weight: None, or one weight > 0 per class (``num_classes`` numbers, e.g.
            ``wrn3d_tl.data.balanced_class_weights``): the training loss becomes
            ``sum_i w[y_i] * CE_i / B`` over the global batch of ``B`` (Keras' ``class_weight``),
            and so does the reported training ``loss``; evaluation reports the plain
            cross-entropy. Stored in checkpoints.
    """

    def __init__(self, model, train_data=None, *, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 schedule="constant", total_steps=None, warmup_steps=0, mixed_precision=None, seed=0,
                 batch_size=None, normalization=None, eval_data=None, strategy=None, logdir=None,
                 checkpoint_dir=None, checkpoint_every=None, keep_checkpoints=3, jit_compile=False, trainable=None,
                 preprocessing=None, class_names=None, class_weight=None, shard_input=True, verbose=True):
        config = getattr(model, "wrn_config", None)
        if not isinstance(config, WRNConfig):
            raise TypeError("model must be built by wrn3d_tl.model.build_wrn (it has no wrn_config), "
                            f"got {type(model).__name__}")
        low = sorted({v.dtype.name for v in model.trainable_weights} - {"float32"})
        if low:
            raise ValueError(f"model: its weights must be float32 to train, it has {', '.join(low)} ones (an "
                             "inference copy, wrn3d_tl.model.inference_copy, cannot be trained)")
        check_number(lr, "lr", "a number > 0", lambda v: v > 0)
        check_number(momentum, "momentum", "a number in [0, 1)", lambda v: 0 <= v < 1)
        check_number(weight_decay, "weight_decay", "a number >= 0", lambda v: v >= 0)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule != "constant":
            total_steps = check_int(total_steps, f"total_steps (for schedule={schedule!r})")
        warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
        mixed_precision = check_mixed_precision(mixed_precision)
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", allow_none=True)
        if checkpoint_every and not checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir")

        norm = as_normalization(normalization, config.input_shape[-1], f"the model's input {config.input_shape}")

        if mixed_precision == "bf16":
            check_bf16_runs("bf16 training")
        if mixed_precision == "fp16" and not tf.config.list_physical_devices("GPU"):
            warnings.warn("wrn3d_tl: mixed_precision='fp16' with no GPU: CPUs run float16 convolutions many times "
                          "slower than float32. fp16 is a GPU setting; on CPUs with AVX512_BF16/AMX use 'bf16'.",
                          UserWarning, stacklevel=2)
        self.model = model
        self.config = config
        self.checks = BatchChecks(config)
        self.base_lr = float(lr)
        self.schedule = schedule
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.mixed_precision = mixed_precision
        self.compute_dtype = PRECISION_DTYPES[mixed_precision or "fp32"]
        self.seed = int(seed)
        self.batch_size = batch_size
        self.normalization = norm.to_dict() if norm is not None else None
        # Whether the stats of the training data are known (given, or read off a tagged
        # pipeline, "raw" included): saving a trainer whose stats are unknown warns.
        self.normalization_known = norm is not None
        self.preprocessing = check_preprocessing(preprocessing, "Trainer(preprocessing=...)")
        self.class_names = check_class_names(class_names, config.num_classes, "Trainer(class_names=...)")
        self.class_weight = check_class_weight(class_weight, config.num_classes)
        self._class_weight = tf.constant(self.class_weight or [1.0] * config.num_classes, tf.float32)
        self.eval_data = eval_data
        self.strategy = strategy or tf.distribute.get_strategy()
        self.is_chief = _is_chief(self.strategy)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.checkpoints = CheckpointManager(checkpoint_dir, keep=keep_checkpoints) if checkpoint_dir else None
        self.verbose = verbose
        self._lr_override = None
        self._step = 0
        self.feed = Feed(self.strategy, self.checks, seed, shard_input)
        self.train_data = train_data

        if self.strategy.num_replicas_in_sync > 1 and not self.strategy.extended.variable_created_in_scope(
                model.trainable_weights[0]):
            raise ValueError("model: under a strategy of several replicas, build the model inside "
                             "strategy.scope() (its variables must be mirrored on every replica)")
        self._stats = list(model.nontrainable_weights)  # BN moving statistics
        with self.strategy.scope():
            self.optimizer = SGD(self._select_trainable(trainable), lr=self.base_lr, momentum=momentum,
                                 nesterov=nesterov, weight_decay=weight_decay)
            self.loss_scale = LossScale(enabled=mixed_precision == "fp16")
        # XLA stays off by default: it ran 3D convolutions 7-14x slower on the CPUs we measured
        # (on GPUs it is unmeasured; benchmarks/gpu_check.py reports it against the default).
        self.jit_compile = jit_compile   # compiles the step (the property's setter)
        self._eval_fn = graph_function(self._distributed_eval)
        self.logger = MetricsLogger(logdir) if logdir and self.is_chief else None
        if verbose and self.is_chief:
            print(f"[wrn3d_tl] {config.name} {config.spatial_rank}D on {describe_devices()}, "
                  f"{self.strategy.num_replicas_in_sync} replica(s), precision {mixed_precision or 'fp32'}")

    def _select_trainable(self, trainable):
        """The weights to train (all, or those ``trainable`` picks); sets ``self.trainable``
        to None or the chosen names (what checkpoints store)."""
        weights = list(self.model.trainable_weights)
        if trainable is None:
            self.trainable = None
            return weights
        if callable(trainable):
            pick = trainable
        elif isinstance(trainable, (list, tuple)) and all(isinstance(p, str) and p for p in trainable):
            pick = lambda name: under(name, trainable)  # noqa: E731
        else:
            raise ValueError(f"trainable must be None, a list of weight-name prefixes (e.g. ['group3', 'head']) or a "
                             f"predicate on names, got {trainable!r}")
        chosen = [w for w in weights if pick(variable_name(w))]
        if not chosen:
            raise ValueError(f"trainable={trainable!r} picks no weight (names look like "
                             f"{variable_name(weights[0])!r})")
        self.trainable = [variable_name(w) for w in chosen]
        return chosen

    # ----------------------------------------------------------------- schedule
    @property
    def step(self):
        """Number of training steps taken (an int)."""
        return self._step

    @property
    def jit_compile(self):
        """Whether the step is compiled with XLA; setting it compiles the step anew."""
        return self._jit_compile

    @jit_compile.setter
    def jit_compile(self, value):
        self._jit_compile = bool(value)
        self._train_fn = graph_function(self._distributed_step, jit_compile=self._jit_compile or None)

    @property
    def step_traces(self):
        """How many times the training step has been traced (1 after the first step while
        every batch has the same shapes: no retracing)."""
        return self._train_fn.experimental_get_tracing_count()

    @property
    def input_is_split(self):
        """True when each replica reads only its own share of the training data (a
        wrn3d_tl pipeline under a strategy of several replicas), False when the global
        batch is read whole and sliced."""
        return self.feed.split

    @property
    def momentum(self):
        return self.optimizer.momentum

    @property
    def nesterov(self):
        return self.optimizer.nesterov

    @property
    def weight_decay(self):
        return self.optimizer.weight_decay

    def scheduled_lr(self, step):
        """The schedule's learning rate at ``step`` (ignores any override; see
        ``wrn3d_tl.optim.scheduled_lr``)."""
        return scheduled_lr(step, base_lr=self.base_lr, schedule=self.schedule, total_steps=self.total_steps,
                            warmup_steps=self.warmup_steps)

    @property
    def learning_rate(self):
        """The learning rate the next step uses; set a float to override the schedule,
        ``None`` to return to it."""
        return self._lr_override if self._lr_override is not None else self.scheduled_lr(self._step)

    @learning_rate.setter
    def learning_rate(self, value):
        if value is not None:
            check_number(value, "learning_rate", "a number >= 0 or None", lambda v: v >= 0)
            value = float(value)
        self._lr_override = value

    # -------------------------------------------------------------------- data
    @property
    def train_data(self):
        """Where ``train_step()`` without arguments reads its batches (``wrn3d_tl.feed.Feed``):
        a Dataset, an ``(x, y)`` pair of arrays (shuffled into ``batch_size`` batches) or None.
        A wrn3d_tl pipeline's normalisation, reading and class names become the trainer's."""
        return self.feed.data

    @train_data.setter
    def train_data(self, data):
        data, self.batch_size = Feed.as_dataset(data, self.batch_size, self.seed)
        self._adopt_normalization(data, "train_data")
        self.feed.use(data)

    def _adopt_normalization(self, data, what):
        """A tagged pipeline (``wrn3d_tl.data.normalization_of``) says which stats its batches
        carry. As ``train_data`` they become the trainer's when it holds none, so they travel
        to checkpoints, predict and export; stats that differ from the trainer's known ones
        are an error, for training and evaluation data alike."""
        reading = check_preprocessing(getattr(data, "wrn3d_preprocessing", None), f"{what}'s preprocessing")
        if what == "train_data" and self.preprocessing is None:
            self.preprocessing = reading
        elif reading is not None and self.preprocessing is not None and reading != self.preprocessing:
            raise ValueError(f"{what}: the pipeline reads its files with {reading}, but the trainer's data was "
                             f"read with {self.preprocessing}; read training, evaluation and new files the same way")
        names = getattr(data, "wrn3d_class_names", None)
        if names is not None and len(names) == self.config.num_classes:   # else they cannot name every class
            names = check_class_names(names, self.config.num_classes, f"{what}'s class names")
            if what == "train_data" and self.class_names is None:
                self.class_names = names
            elif self.class_names is not None and names != self.class_names:
                raise ValueError(f"{what}: the pipeline's classes are {list(names)}, but the trainer's are "
                                 f"{list(self.class_names)}; map labels to classes the same way everywhere")
        known, stats = normalization_of(data)
        if not known:
            return
        if what == "train_data" and not self.normalization_known:
            norm = as_normalization(stats, self.config.input_shape[-1], f"the model's input {self.config.input_shape}")
            self.normalization = None if norm is None else norm.to_dict()
            self.normalization_known = True
        elif self.normalization_known and not same_normalization(stats, self.normalization):
            raise ValueError(f"{what}: the pipeline's batches are normalised with {stats or 'nothing (raw)'}, but the "
                             f"trainer's with {self.normalization or 'nothing (raw)'}; use the same stats for "
                             "training, evaluation and inference")

    # -------------------------------------------------------------------- step
    def train_step(self, x=None, y=None):
        """Run exactly one training iteration; returns Python numbers
        ``{"loss", "accuracy", "lr", "step", "samples_per_sec"}`` (loss and accuracy of
        this batch before the update, ``lr`` the rate used, ``step`` the count after it).

        ``x``: (B,) + input_shape, any real dtype (converted to float32); ``y``: (B,)
        integer labels in [0, num_classes). Without arguments the batch comes from
        ``train_data``. A batch with labels out of range or NaN/Inf in ``x`` raises
        ValueError, and a NaN/Inf loss or gradient FloatingPointError; either way the
        weights, optimizer and BN statistics are left unchanged. One host transfer per step:
        those checks run inside the compiled step and return with its metrics.
        """
        start = time.perf_counter()
        if x is None and y is None:
            x, y, whole = self.feed.next_batch()
        elif x is None or y is None:
            raise ValueError("train_step takes both x and y, or neither (then it reads train_data)")
        else:
            whole = True
        replicas = self.strategy.num_replicas_in_sync
        if whole:
            x, y = self.checks.tensors(x, y)
            batch = x.shape[0]
            if batch % replicas:
                raise ValueError(f"train_step: the global batch of {batch} does not divide evenly over "
                                 f"{replicas} replicas")
        else:
            batch = self.strategy.experimental_local_results(x)[0].shape[0] * replicas
        lr = self.learning_rate
        out = dict(zip(STEP_FIELDS, self._train_fn(x, y, tf.constant(lr, tf.float32), whole).numpy()))
        self.checks.raise_for(out, "train_step")
        loss, ok = out["loss"], out["ok"]
        if not ok and self.mixed_precision != "fp16":
            raise FloatingPointError(f"non-finite loss or gradient at step {self._step + 1} (loss={loss}); "
                                     "the weights were not updated and checkpoints on disk are untouched")
        if not ok and self.loss_scale.diverged():
            raise FloatingPointError(
                f"fp16: {FP16_MAX_FLOOR_SKIPS} consecutive non-finite steps at the smallest loss scale "
                f"({LossScale.FLOOR}), up to step {self._step + 1} (loss={loss}): the run diverged. None of "
                "these steps updated the weights, and checkpoints on disk are untouched")
        self._step += 1
        elapsed = time.perf_counter() - start
        metrics = {"loss": float(loss), "accuracy": float(out["accuracy"]), "lr": float(lr), "step": self._step,
                   "samples_per_sec": batch / elapsed}
        if self.logger:
            self.logger.log(self._step, "train", {**metrics, "wall_time": time.time()})
        if self.checkpoint_every and self._step % self.checkpoint_every == 0:
            self._periodic_save()
        return metrics

    def _distributed_step(self, x, y, lr, whole):
        """One step on every replica: ``x``/``y`` the global batch (``whole``, each replica
        takes its slice) or per-replica shares. Returns the float64 ``STEP_FIELDS`` of the
        global batch, the same on every replica."""
        self.optimizer.lr.assign(lr)
        results = self.strategy.run(self._replica_step, args=(x, y, whole))
        return self.strategy.experimental_local_results(results)[0]

    def _replica_step(self, x, y, whole):
        ctx = tf.distribute.get_replica_context()
        n, i = ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group
        if whole:
            per = tf.shape(x)[0] // n
            x, y = x[i * per:(i + 1) * per], y[i * per:(i + 1) * per]
        checks = self.checks.in_graph(x, y)
        x, y = self.checks.model_inputs(x, y)
        global_batch = tf.cast(tf.shape(x)[0] * n, tf.float32)
        # The forward pass moves the BN statistics; keep their old values so a step that
        # turns out non-finite (or refused) can be undone completely.
        stats_before = [tf.identity(v.read_value()) for v in self._stats]
        with tf.GradientTape() as tape:
            logits = self.model(tf.cast(x, self.compute_dtype), is_train=True)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.cast(logits, tf.float32))
            if self.class_weight is not None:
                ce = ce * tf.gather(self._class_weight, y)
            loss = tf.reduce_sum(ce) / global_batch
            scaled = self.loss_scale.scale_loss(loss)
        grads = tape.gradient(scaled, self.optimizer.weights)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))
        sums = tf.concat([tf.cast(tf.stack([tf.reduce_sum(ce), correct, global_batch / n]), tf.float64), checks], 0)
        # All collectives (gradients, metrics) are created in one cross-replica call so that
        # every replica launches them in the same order (sync BN adds replica-side
        # collectives to the forward and backward passes).
        results = ctx.merge_call(self._apply, args=(grads, sums[None]))
        tf.cond(results[2] > 0, lambda: tf.constant(True), lambda: self._restore(stats_before))
        return results

    def _restore(self, stats_before):
        for v, old in zip(self._stats, stats_before):
            v.assign(old)
        return tf.constant(False)

    def _apply(self, strategy, grads, sums):
        """Cross-replica: sum gradients over replicas and gather the replicas' metrics and
        input checks, then one SGD-Nesterov update per weight, skipped entirely when the
        loss or a gradient is not finite or the inputs were refused."""
        grads = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, list(zip(grads, self.optimizer.weights)))
        loss_sum, correct, samples, checks = combine(strategy.gather(sums, axis=0), 3)
        first = [strategy.experimental_local_results(g)[0] for g in grads]
        inputs_ok = tf.logical_and(checks[0] == 0, checks[1] == 0)
        finite = tf.reduce_all([tf.math.is_finite(loss_sum)] + [tf.reduce_all(tf.math.is_finite(g)) for g in first])
        ok = tf.logical_and(finite, inputs_ok)
        self.optimizer.apply(strategy, grads, ok, unscale=self.loss_scale.unscale if self.loss_scale.enabled else None)
        if self.loss_scale.enabled:
            self.loss_scale.update(ok, counts=inputs_ok)
        return tf.concat([tf.stack([loss_sum / samples, correct / samples, tf.cast(ok, tf.float64)]), checks], 0)

    def fit(self, steps, *, eval_data=None, eval_every=0, on_step=None, on_eval=None, progress=None):
        """Train until ``self.step == steps``; returns the last step's metrics (or None).

        Shows a tqdm progress bar (loss, accuracy, volumes/s) on stderr when ``progress``
        is True; None (the default): the bar on a terminal, else (a log file, a notebook's
        captured output) one line on the ``wrn3d_tl`` logger every ``LOG_EVERY_STEPS`` steps
        or ``LOG_EVERY_S`` seconds and at the end; False: nothing. ``on_step(metrics)`` is called
        after every step; with ``eval_every``, ``evaluate(eval_data)`` (default: the
        trainer's ``eval_data``) runs every ``eval_every`` steps before the last and
        ``on_eval(step, result)`` is called; when it returns True, training stops there
        (early stopping).
        """
        import sys

        from tqdm.auto import tqdm

        eval_data = self.eval_data if eval_data is None else eval_data

        lines = progress is None and not sys.stderr.isatty()
        progress = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=steps, initial=min(self._step, steps), disable=not progress, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        metrics, last = None, time.monotonic()
        try:
            while self._step < steps:
                metrics = self.train_step()
                if lines and (self._step % LOG_EVERY_STEPS == 0 or self._step == steps
                              or time.monotonic() - last >= LOG_EVERY_S):
                    last = time.monotonic()
                    log.info(f"step {self._step}/{steps}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.3f}"
                             f"  lr {metrics['lr']:.4g}  {metrics['samples_per_sec']:.1f} vol/s")
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}",
                                vol_s=f"{metrics['samples_per_sec']:.1f}")
                if on_step:
                    on_step(metrics)
                if eval_data is not None and eval_every and self._step % eval_every == 0 and self._step < steps:
                    result = self.evaluate(eval_data)
                    if on_eval and on_eval(self._step, result) is True:
                        break
        finally:
            bar.close()
        return metrics

    # --------------------------------------------------------------- evaluate
    def _distributed_eval(self, x, y):
        """Inference on the global batch ``x``/``y`` spread over the replicas: the float64
        ``EVAL_FIELDS`` summed (checks combined) over replicas, and the class probabilities
        (B, classes) in batch order."""
        sums, probs = self.strategy.run(self._eval_replica, args=(x, y))
        loss_sum, top1, top5, samples, checks = combine(self.strategy.gather(sums, axis=0), 4)
        return tf.concat([tf.stack([loss_sum, top1, top5, samples]), checks], 0), self.strategy.gather(probs, axis=0)

    def _eval_replica(self, x, y):
        ctx = tf.distribute.get_replica_context()
        n, i = ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group
        size = tf.shape(x)[0]
        per = -(-size // n)  # a partial last batch leaves the last replicas fewer (or no) samples
        lo, hi = tf.minimum(i * per, size), tf.minimum((i + 1) * per, size)
        checks = self.checks.in_graph(x[lo:hi], y[lo:hi])
        # A replica left without samples runs on the batch's last one and counts nothing:
        # oneDNN's strided convolutions mis-shape an empty batch.
        start = tf.minimum(lo, size - 1)
        x, y = self.checks.model_inputs(x[start:tf.maximum(hi, start + 1)], y[start:tf.maximum(hi, start + 1)])
        real = tf.cast(tf.range(tf.shape(y)[0]) < hi - lo, tf.float32)
        logits = tf.cast(self.model(tf.cast(x, self.compute_dtype), is_train=False), tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
        top1 = tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32)
        top5 = tf.cast(tf.math.in_top_k(y, logits, min(5, self.config.num_classes)), tf.float32)
        sums = tf.stack([tf.reduce_sum(v * real) for v in (ce, top1, top5)] + [tf.reduce_sum(real)])
        return tf.concat([tf.cast(sums, tf.float64), checks], 0)[None], tf.nn.softmax(logits, axis=-1)[:hi - lo]

    def evaluate(self, data=None, batch_size=100, log=True, report_dir=None):
        """Inference-mode metrics (moving BN statistics, no dropout) over ``data``; under a
        strategy every batch is spread over the replicas (sums reduced, the same result), so
        every worker calls it, with the same data, as it calls ``train_step``.

        ``data``: an ``(x, y)`` pair of arrays (x: (N,) + input_shape, normalised) or a
        ``tf.data.Dataset`` of such batches; None: the trainer's ``eval_data``. Returns
        ``{"loss", "accuracy", "top5_accuracy", "samples"}`` as Python numbers and, in the
        definitions of ``wrn3d_tl.metrics.classification_metrics``, ``"auc"`` (binary: ROC AUC
        of the class-1 probability; multi-class: mean one-vs-rest AUC), ``"auc_per_class"``,
        ``"confusion_matrix"`` (rows = true class) and ``"per_class_accuracy"``. Deterministic.
        ``report_dir``: also write ``wrn3d_tl.evaluation.evaluation_report``'s ``confusion.png``,
        ``roc.png`` and ``metrics.json`` there (chief only) and return their paths as ``"report"``.
        """
        if data is None:
            if self.eval_data is None:
                raise ValueError("evaluate() without data needs the trainer's eval_data; pass data or set eval_data")
            data = self.eval_data
        self._adopt_normalization(data, "evaluate")
        if isinstance(data, (tuple, list)):
            x_all, y_all = data
            if np.ndim(x_all) != len(self.config.input_shape) + 1:
                raise ValueError(f"evaluate: x must have shape (batch,) + {self.config.input_shape}, "
                                 f"got {np.shape(x_all)}")
            if len(x_all) != len(y_all):
                raise ValueError(f"evaluate: y must have shape ({len(x_all)},) to match x, got {np.shape(y_all)}")
            batches = ((x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(x_all), batch_size))
        elif isinstance(data, tf.data.Dataset):
            batches = data
        else:
            raise TypeError(f"evaluate: data must be an (x, y) pair or a tf.data.Dataset, got {type(data).__name__}")
        loss = top1 = top5 = 0.0
        n = 0
        labels, scores = [], []
        with data_errors():
            for x, y in batches:
                x, y = self.checks.tensors(x, y, "evaluate")
                sums, p = self._eval_fn(x, y)
                out = dict(zip(EVAL_FIELDS, sums.numpy()))
                self.checks.raise_for(out, "evaluate")
                loss, top1, top5 = loss + out["ce_sum"], top1 + out["top1"], top5 + out["top5"]
                n += int(out["samples"])
                labels.append(y.numpy())
                scores.append(p.numpy())
        if n == 0:
            raise ValueError("evaluate: data is empty (no samples)")
        result = {"loss": loss / n, "accuracy": top1 / n, "top5_accuracy": top5 / n, "samples": n}
        labels, scores = np.concatenate(labels), np.concatenate(scores)
        report = classification_metrics(labels, scores)
        result.update({k: report[k] for k in ("auc", "auc_per_class", "confusion_matrix", "per_class_accuracy")})
        if report_dir is not None and self.is_chief:
            result["report"] = evaluation_report(labels, scores, report_dir, class_names=self.class_names)
        if log and self.logger:
            self.logger.log(self._step, "eval", {**result, "wall_time": time.time()})
        return result

    # ------------------------------------------------------------ checkpoints
    def hyperparameters(self):
        """The settings ``Trainer.restore`` needs to rebuild this trainer (a JSON-able dict)."""
        return {"lr": self.base_lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay, "schedule": self.schedule, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "mixed_precision": self.mixed_precision, "seed": self.seed,
                "batch_size": self.batch_size, "keep_checkpoints": self.keep_checkpoints,
                "jit_compile": self.jit_compile, "trainable": self.trainable, "lr_override": self._lr_override,
                "preprocessing": self.preprocessing,
                "class_names": None if self.class_names is None else list(self.class_names),
                "class_weight": self.class_weight}

    def _state_arrays(self):
        # Every worker reads (cross-replica reads of ON_READ variables are collectives).
        weights = {variable_name(v): v.numpy() for v in self.model.all_weights}
        slots = {variable_name(w): s.numpy() for w, s in zip(self.optimizer.weights, self.optimizer.slots)}
        state = self.loss_scale.state()
        return weights, slots, state

    def save(self, path):
        """Write the whole training state to one HDF5 file at ``path``, atomically.

        Returns the path (None on a non-chief worker, which writes nothing)."""
        weights, slots, state = self._state_arrays()
        if not self.is_chief:
            return None
        self.warn_if_normalization_unknown("checkpoint")
        return write_checkpoint(path, config=self.config.to_dict(), trainer=self.hyperparameters(),
                                step=self._step, normalization=self.normalization, weights=weights,
                                optimizer=slots, state=state)

    def warn_if_normalization_unknown(self, what):
        """Warn (UserWarning) when this trainer holds no stats and its training data never
        said which it applied: a checkpoint or export would then feed raw volumes to a
        network that may have been trained on normalised ones."""
        if self.normalization is None and not self.normalization_known:
            warnings.warn(f"wrn3d_tl: this {what} holds no normalisation stats and the training data did not say "
                          "which it used (arrays, or a dataset not built by wrn3d_tl.data). If the training batches "
                          "were normalised, pass Trainer(normalization=...) or predictions from it will be wrong; "
                          "pass the training pipeline from wrn3d_tl.data and the stats travel by themselves.",
                          UserWarning, stacklevel=3)

    def _periodic_save(self):
        if self.save(self.checkpoints.path_for(self._step)) is not None:
            self.checkpoints.prune()

    def load(self, path):
        """Load a checkpoint of the SAME config into this trainer (weights, momentum,
        step, loss scale, normalisation). Everything is checked before anything is
        assigned: on any error the trainer is unchanged."""
        ck, norm = self._matching_checkpoint(path)
        pairs = [(v, ck["weights"], variable_name(v)) for v in self.model.all_weights]
        pairs += [(s, ck["optimizer"], variable_name(w)) for w, s in zip(self.optimizer.weights, self.optimizer.slots)]
        assign_checked(pairs, path)
        if ck["trainer"].get("mixed_precision") == self.mixed_precision:
            self.loss_scale.load_state(ck["state"])  # else a run switching to fp16 starts at the initial scale
        self._step = ck["step"]
        self._lr_override = ck["trainer"].get("lr_override")
        self.normalization = None if norm is None else norm.to_dict()
        self.normalization_known = True  # the checkpoint's stats (None: trained on raw volumes)
        if self.logger:
            self.logger.truncate(self._step)
        return self

    def load_weights(self, path):
        """Load only the network of a checkpoint of the SAME config and normalisation (its
        weights and BN statistics), e.g. the best one of a run, for evaluation or export;
        the optimizer, step and logs stay as they are. Checked before anything is assigned."""
        ck, _ = self._matching_checkpoint(path)
        assign_checked([(v, ck["weights"], variable_name(v)) for v in self.model.all_weights], path)
        return self

    def _matching_checkpoint(self, path):
        ck = read_checkpoint(path)
        config, norm = stored_config_and_normalization(ck, path)
        if self.normalization_known and not same_normalization(norm, self.normalization):
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} was trained on batches normalised with "
                                  f"{ck['normalization'] or 'nothing (raw)'}, but this trainer's data uses "
                                  f"{self.normalization or 'nothing (raw)'}")
        if config != self.config:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds {config}, but this trainer's model is "
                                  f"{self.config}")
        return ck, norm

    @classmethod
    def restore(cls, path, train_data=None, *, strategy=None, recompute=False, **overrides):
        """Rebuild a trainer from one checkpoint file alone: model (from the stored
        WRNConfig), weights, optimizer state, step, hyperparameters, normalisation.
        ``overrides`` replace stored trainer settings (e.g. ``logdir``, ``verbose``);
        ``recompute`` is passed to ``build_wrn`` (it changes memory use, not results)."""
        ck = read_checkpoint(path)
        config = WRNConfig.from_dict(ck["config"])
        hp = dict(ck["trainer"])
        hp.pop("lr_override", None)
        hp.update(overrides)
        with (strategy or tf.distribute.get_strategy()).scope():
            model = build_wrn(config, recompute=recompute)
        trainer = cls(model, train_data, strategy=strategy, **hp)
        return trainer.load(path)  # also sets the stored normalisation, validated

    def plot(self, png_path):
        """Plot this run's logged loss/accuracy to ``png_path`` (needs ``logdir``)."""
        if self.logger is None:
            raise ValueError("plot needs a Trainer created with logdir=")
        return plot_metrics(self.logger.csv_path, png_path)

    def close(self):
        """Flush and close the log files."""
        if self.logger:
            self.logger.close()
            self.logger = None


def under(name, prefixes):
    """Whether the weight ``name`` ("group2/block1/conv1/kernel") lies under one of
    ``prefixes``, matched by whole path components ("group2", "group2/block1", "head")."""
    return any(name == p.rstrip("/") or name.startswith(p.rstrip("/") + "/") for p in prefixes)
