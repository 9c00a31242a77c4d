#!/usr/bin/env python
"""Train-step and inference throughput of wrn3d_tl against its Keras twin and PyTorch.

    python benchmarks/bench_train.py                        # full run: three configs, < 10 min on 2 cores
    python benchmarks/bench_train.py --quick                # WRN-10-2 3D alone (about a minute)
    python benchmarks/bench_train.py --configs wrn16-4-3d --steps 5 --json-out run.jsonl
    python benchmarks/bench_train.py --self-check           # torch reference model == wrn3d_tl model?

Method (see benchmarks/README.md for more):

* Every implementation (framework x precision x compiler) lives in its OWN worker process
  (multiprocessing, spawn), built once per config. The parent drives them round-robin, one
  step (or one ``burst`` of steps, for the small config) at a time, rotating the order
  every round, so machine noise hits all alike and only one worker computes at any
  moment. Each step is timed inside its worker (wall clock, until the result is on the
  host); the first ``warmup`` rounds are dropped and the median of the remaining
  ``steps`` rounds is reported. Machine noise (CPU used outside the benchmark, time stolen
  by the hypervisor) is measured from /proc over the timed rounds and reported.
* From round 2 on, an optional variant (XLA, torch.compile) slower than ``--slow-factor``
  (3) x the round's median is not run again; its row reports the steps it ran after the
  first (this keeps XLA, many times slower for 3D convolutions on CPU, in the budget).
* Peak RSS growth is the worker's VmHWM (peak RSS of its own process image) minus its
  VmRSS right after importing its framework (before the model is built): the memory of
  the model, its optimizer state, its compiled step, activations and batches. The
  wrn3d_tl fp32 worker also holds the small input pipeline of the comparison below.
* GFLOP/s = samples/s x ``count_flops(config)`` (x3 for a train step: forward + two
  backward convolutions per forward one). The fp32 and bf16 matmul peaks are measured in
  the same run with TensorFlow (a 4096x4096 matmul in a tf.function, median of 5), before
  and after the configs; the higher median is used. Beside them the report prints the
  CPU's physical fp32 limit, estimated as cores x FMA units x fp32 lanes x 2 x clock from
  /proc/cpuinfo (``wrn3d_tl.cpu.fp32_limit``), and says when the matmul beats it (a turbo
  clock above the one the kernel reports).
* oneDNN: every row says whether its worker's convolutions ran on oneDNN (TensorFlow's
  switch, read at its import; PyTorch's mkldnn backend).
* Pipeline vs pre-made: in every round the wrn3d_tl fp32 worker runs, back to back,
  ``trainer.train_step(x, y)`` on a batch already in memory and ``trainer.train_step()``
  pulling from ``make_dataset`` (synthetic CIFAR-shaped uint8 images, random crop + flip,
  tiling to volumes, normalisation, prefetch); the ratio is the median of the per-round
  ratios.

Output: progress on stderr; on stdout one ``JSON {...}`` line per measurement (grep
``^JSON`` to compare runs), then a markdown table and the summary ratios.
"""

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)
_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):  # the repo (wrn3d_tl) and benchmarks/ (torch_wrn)
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Nothing heavy is imported at module level: spawned workers re-import this module, and a
# PyTorch worker must not load TensorFlow (nor the other way round).


# ----------------------------------------------------------------------------- what runs
@dataclass(frozen=True)
class Case:
    """One benchmarked network: a WRN config, a batch size and a step budget."""
    key: str
    name: str          # "WRN-d-k", parsed by WRNConfig.from_name
    input_shape: tuple
    batch: int
    warmup: int        # untimed rounds (the first one also traces/compiles)
    steps: int         # timed rounds; the median is reported
    timeout: float     # seconds one (non-first) step may take before its implementation is dropped
    burst: int = 1     # steps run back to back per round; a round's time is their mean

    @property
    def label(self):
        return f"{self.name} {len(self.input_shape) - 1}D {'x'.join(map(str, self.input_shape))} b{self.batch}"

    def config(self):
        from wrn3d_tl.model import WRNConfig
        return WRNConfig.from_name(self.name, input_shape=self.input_shape)


CASES = {c.key: c for c in (
    Case("wrn16-4-3d", "WRN-16-4", (8, 32, 32, 3), 32, warmup=2, steps=5, timeout=120),
    Case("wrn40-4-2d", "WRN-40-4", (32, 32, 3), 64, warmup=2, steps=5, timeout=120),
    # Steps of a few ms: a burst of 8 amortises the wake-up of a process that idled while the
    # others ran (that alone made a lone 6 ms inference take 10-12 ms).
    Case("wrn10-2-3d", "WRN-10-2", (4, 16, 16, 3), 16, warmup=3, steps=15, timeout=30, burst=8),
)}
QUICK = ("wrn10-2-3d",)


@dataclass(frozen=True)
class Impl:
    framework: str      # "wrn3d_tl" | "keras" | "torch"
    precision: str      # "fp32" | "bf16"
    variant: str = ""   # "" | "xla" (TensorFlow jit_compile=True) | "compile" (torch.compile)

    @property
    def label(self):
        return self.framework + (f"+{self.variant}" if self.variant else "")

    def __str__(self):
        return f"{self.label}/{self.precision}"


TL_FP32 = Impl("wrn3d_tl", "fp32")
RIVALS = ("keras", "torch", "torch+compile")  # implementation labels compared against wrn3d_tl
_IMPORTS = {"wrn3d_tl": ("tensorflow", "tensorlayer", "wrn3d_tl.train", "wrn3d_tl.data"),
            "keras": ("tensorflow", "keras", "wrn3d_tl.keras_twin"),
            "torch": ("torch", "torch_wrn"),
            "matmul": ("tensorflow",)}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4  # the Trainer's defaults, used by every implementation


def torch_available():
    try:
        importlib.import_module("torch")
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------- worker-side helpers
def _status_mb(field):
    """A memory line of /proc/self/status in MB: VmRSS (now) or VmHWM (peak). VmHWM belongs
    to this process image; ``ru_maxrss`` would not do, as Linux carries it over from the
    parent through fork + exec (it would report at least the parent's RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_batch(case, seed):
    """One pre-made batch: float32 (B,) + input_shape ~ N(0, 1) and int64 labels in [0, 10)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.batch,) + case.input_shape, dtype=np.float32)
    return x, rng.integers(0, 10, case.batch, dtype=np.int64)


def pipeline_dataset(case, seed):
    """The real input pipeline: ``make_dataset`` over synthetic CIFAR-shaped uint8 images
    (strided down to the config's H x W), augmented, tiled to the config's depth (3D),
    normalised, shuffled, prefetched; an endless stream of full batches."""
    from wrn3d_tl.data import compute_normalization, make_dataset, synthetic_cifar
    (x, y), _ = synthetic_cifar(max(1024, 8 * case.batch), 0, seed=seed)
    h, w = case.input_shape[-3:-1]
    x = x[:, ::32 // h, ::32 // w]
    depth = case.input_shape[0] if len(case.input_shape) == 4 else None
    return make_dataset(x, y, batch_size=case.batch, volume_depth=depth, training=True, seed=seed,
                        normalization=compute_normalization(x), drop_remainder=True, repeat=True)


def tf_top_ops(step_fn, top=5):
    """Run ``step_fn`` once under tf.profiler; the ``top`` op types by summed kernel time.

    Returns {"wall_ms", "ops": [(op type, ms, count), ...], "op_ms_total"}; op times are
    summed over TensorFlow's threads, so the total can exceed the wall time."""
    import glob
    import shutil
    import tempfile
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    logdir = tempfile.mkdtemp(prefix="bench_prof_")
    try:
        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        step_fn()
        wall = time.perf_counter() - t0
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    totals = {}
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_"):  # executor/Eigen threads run the kernels
                continue
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if ":" in meta.name and meta.display_name:  # "node_name:OpType" kernel events
                    ms, n = totals.get(meta.display_name, (0.0, 0))
                    totals[meta.display_name] = (ms + event.duration_ps / 1e9, n + 1)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {"wall_ms": round(wall * 1e3, 1), "op_ms_total": round(sum(v[0] for v in totals.values()), 1),
            "ops": [(name, round(ms, 1), n) for name, (ms, n) in ranked[:top]]}


def torch_top_ops(step_fn, top=5):
    """``tf_top_ops`` for PyTorch: one step under torch.profiler, the ``top`` operators by
    self CPU time (on the calling thread, whose intra-op threads work inside each op)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step_fn()
        wall = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"wall_ms": round(wall * 1e3, 1), "op_ms_total": round(sum(e.self_cpu_time_total for e in events) / 1e3, 1),
            "ops": [(e.key, round(e.self_cpu_time_total / 1e3, 1), e.count) for e in events[:top]]}


# ------------------------------------------------------ one setup function per implementation
# Each returns {command: callable}: "train" and "infer" run one blocking step on the pre-made
# batch, "profile" one profiled train step; wrn3d_tl fp32 adds "train_pipeline" (a step fed
# by the input pipeline) and "pipeline_alone".

def setup_wrn3d_tl(impl, case, arch, seed):
    import tensorflow as tf
    from wrn3d_tl.model import build_wrn, inference_copy
    from wrn3d_tl.train import Trainer
    tf.random.set_seed(seed)
    model = build_wrn(case.config())
    trainer = Trainer(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                      mixed_precision="bf16" if impl.precision == "bf16" else None,
                      jit_compile=impl.variant == "xla", verbose=False)
    x, y = (tf.constant(a) for a in synthetic_batch(case, seed))
    # Inference as Predictor and export_saved_model run it: in bf16, on a copy whose kernels
    # are stored in bf16 (no cast of every kernel on every call).
    net = inference_copy(model, "bf16") if impl.precision == "bf16" else model
    infer = tf.function(lambda x: net(tf.cast(x, trainer.compute_dtype), is_train=False),
                        jit_compile=trainer.jit_compile or None)
    ops = {"train": lambda: trainer.train_step(x, y), "infer": lambda: infer(x).numpy(),
           "profile": lambda: tf_top_ops(lambda: trainer.train_step(x, y))}
    if impl == TL_FP32:
        trainer.train_data = pipeline_dataset(case, seed)
        ops["train_pipeline"] = lambda: trainer.train_step()
        ops["pipeline_alone"] = lambda: pipeline_alone(case, seed)
    return ops


def pipeline_alone(case, seed, batches=20):
    """Seconds per batch of the input pipeline on its own (a fresh instance, after 3
    warm-up batches), with every core free for it: its cost without a train step."""
    it = iter(pipeline_dataset(case, seed + 1))
    for _ in range(3):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches


def setup_keras(impl, case, arch, seed):
    """The Keras twin trained by a tf.function step equivalent to the Trainer's: SGD with
    Nesterov momentum, sparse softmax cross-entropy, L2 added to the kernels' gradients."""
    import keras
    import tensorflow as tf
    from wrn3d_tl.keras_twin import build_keras_wrn
    if impl.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")  # this worker only
    keras.utils.set_random_seed(seed)
    model = build_keras_wrn(case.config())
    weights = model.trainable_variables
    decayed = [v.path.endswith("kernel") for v in weights]
    opt = keras.optimizers.SGD(LR, momentum=MOMENTUM, nesterov=True)
    opt.build(weights)
    jit = impl.variant == "xla" or None

    @tf.function(jit_compile=jit)
    def train(x, y):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, weights)
        grads = [g + WEIGHT_DECAY * w if d else g for g, w, d in zip(grads, weights, decayed)]
        opt.apply_gradients(zip(grads, weights))
        return loss

    infer = tf.function(lambda x: model(x, training=False), jit_compile=jit)
    x, y = (tf.constant(a) for a in synthetic_batch(case, seed))
    return {"train": lambda: train(x, y).numpy(), "infer": lambda: infer(x).numpy(),
            "profile": lambda: tf_top_ops(lambda: train(x, y).numpy())}


def setup_torch(impl, case, arch, seed):
    """``torch_wrn.TorchWRN`` in channels-last memory format, eager (or torch.compile),
    SGD with Nesterov momentum, L2 on conv/linear weights; bf16 through CPU autocast."""
    import contextlib
    import torch
    import torch.nn.functional as F
    from torch_wrn import build_torch_wrn
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(seed)
    model = build_torch_wrn(arch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": WEIGHT_DECAY},
                           {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                          lr=LR, momentum=MOMENTUM, nesterov=True)
    xn, yn = synthetic_batch(case, seed)
    rank = xn.ndim - 2
    fmt = torch.channels_last_3d if rank == 3 else torch.channels_last
    # NDHWC -> logical NCDHW; the permuted view already has channels-last strides.
    x = torch.from_numpy(xn).permute(0, rank + 1, *range(1, rank + 1)).contiguous(memory_format=fmt)
    y = torch.from_numpy(yn)
    net = torch.compile(model) if impl.variant == "compile" else model

    def autocast():
        if impl.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        return loss.item()

    def infer():
        model.eval()
        with torch.inference_mode(), autocast():
            return net(x).float().sum().item()

    return {"train": train, "infer": infer, "profile": lambda: torch_top_ops(train)}


def setup_matmul(impl, case, arch, seed):
    """TensorFlow's fp32 and bf16 matmul peak: "matmul" returns {"fp32": GFLOP/s, "bf16": GFLOP/s
    or None where bf16 cannot run, ``wrn3d_tl.cpu.bf16_unrunnable``}."""
    import tensorflow as tf
    n, reps = 4096, 5

    def peak(dtype):
        a = tf.cast(tf.random.normal([n, n], seed=1), dtype)
        b = tf.cast(tf.random.normal([n, n], stddev=n ** -0.5, seed=2), dtype)

        # ONE matmul per call: grappler merges identical matmuls in one graph into one.
        matmul = tf.function(lambda a, b: tf.matmul(a, b)[0, 0])
        matmul(a, b).numpy()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            matmul(a, b).numpy()
            times.append(time.perf_counter() - t0)
        return 2 * n ** 3 / statistics.median(times) / 1e9

    bf16 = (lambda: None) if wrn3d_tl.cpu.bf16_unrunnable() else (lambda: peak(tf.bfloat16))
    return {"matmul": lambda: {"fp32": peak(tf.float32), "bf16": bf16()}}


SETUP = {"wrn3d_tl": setup_wrn3d_tl, "keras": setup_keras, "torch": setup_torch, "matmul": setup_matmul}


def _error_text(exc):
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300] + ("..." if len(text) > 300 else "")


def _worker_main(conn, impl, case, arch, seed):
    """Worker process: import, build, then answer commands: a name or (name, repeat) runs
    that operation ``repeat`` times back to back and answers ("ok", (mean seconds, value))."""
    try:
        for module in _IMPORTS[impl.framework]:
            importlib.import_module(module)
        baseline = _status_mb("VmRSS")
        ops = SETUP[impl.framework](impl, case, arch, seed)
        conn.send(("ok", baseline))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, shown in the table
        traceback.print_exc()
        conn.send(("error", _error_text(exc)))
        return
    while True:
        command = conn.recv()
        if command == "quit":
            return
        if command == "rss":
            conn.send(("ok", {"baseline_mb": baseline, "peak_mb": _status_mb("VmHWM")}))
            continue
        if command == "onednn":
            conn.send(("ok", _onednn(impl.framework)))
            continue
        name, repeat = command if isinstance(command, tuple) else (command, 1)
        try:
            t0 = time.perf_counter()
            for _ in range(repeat):
                value = ops[name]()
            conn.send(("ok", ((time.perf_counter() - t0) / repeat, value)))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            conn.send(("error", _error_text(exc)))


def _onednn(framework):
    """Whether this worker's convolutions run on oneDNN: TensorFlow's switch (read at its
    import, from TF_ENABLE_ONEDNN_OPTS), or PyTorch's mkldnn backend."""
    if framework == "torch":
        import torch

        return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
    return wrn3d_tl.cpu.onednn_enabled()


# ------------------------------------------------------------------------- parent side
def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Worker:
    """Parent-side handle of one worker process. After a failure, ``error`` holds the
    reason and every further call returns None."""

    def __init__(self, ctx, impl, case=None, arch=None, seed=0):
        self.impl = impl
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, impl, case, arch, seed), daemon=True,
                                name=f"bench-{impl}")
        self.proc.start()
        child.close()
        self.error = None
        self.baseline_mb = None

    def _reply(self, timeout, what):
        try:
            if not self.conn.poll(timeout):
                self.stop()
                self.error = f"timeout: {what} took > {timeout:.0f} s"
                return None
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            self.error = f"worker died (exit code {self.proc.exitcode}) during {what}"
            return None
        if status == "error":
            self.error = value
            return None
        return value

    def wait_ready(self, timeout=600):
        self.baseline_mb = self._reply(timeout, "start-up")
        return self.error is None

    def call(self, command, timeout):
        if self.error:
            return None
        self.conn.send(command)
        return self._reply(timeout, command)

    def stop(self):
        stop_all([self])


def stop_all(workers):
    """Ask every worker to quit, then wait; kill (by its own pid) one that hangs."""
    for w in workers:
        if w.proc.is_alive():
            try:
                w.conn.send("quit")
            except OSError:
                pass
    for w in workers:
        w.proc.join(20)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(5)


class CpuMonitor:
    """Machine noise: CPU time spent outside this benchmark's own processes (parent and
    workers), and time stolen by the hypervisor, from /proc. ``read()`` takes a snapshot;
    ``load(a, b)`` gives {"external", "steal"} in cores (1.0 = one core busy) between two."""

    def __init__(self, pids):
        self.pids = [os.getpid()] + list(pids)
        self.hz = os.sysconf("SC_CLK_TCK")

    def read(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy, steal = v[0] + v[1] + v[2] + v[5] + v[6], v[7]  # user nice system irq softirq | steal
        own = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                own += int(fields[11]) + int(fields[12])  # utime + stime, every thread
            except OSError:
                pass
        return time.perf_counter(), busy, steal, own

    def load(self, a, b):
        wall = max(b[0] - a[0], 1e-9) * self.hz
        return {"external": round(max(0, (b[1] - a[1]) - (b[3] - a[3])) / wall, 3),
                "steal": round((b[2] - a[2]) / wall, 3)}


def timed_rounds(workers, groups, case, phase, slow_factor):
    """Round-robin: every round runs each (worker, command) slot once. ``groups`` is a list
    of lists of slots; the order of the groups rotates by one each round, and the slots
    of a group run back to back, in reverse order every other round (so a paired
    comparison inside one worker is always adjacent in time). The first ``case.warmup`` rounds are warm-up (the first call also
    traces/compiles). From round 2 on, an optional variant (XLA, torch.compile) whose step
    took more than ``slow_factor`` times the median of the round's slots is dropped from
    further rounds, so one very slow variant cannot eat the time budget.

    Returns ({slot: [seconds per round]}, {dropped slot: reason}, machine noise during
    the timed rounds: {"external", "steal"} in cores, see CpuMonitor)."""
    rounds = case.warmup + case.steps
    slots = [slot for group in groups for slot in group]
    times = {slot: [] for slot in slots}
    dropped = {}
    monitor = CpuMonitor(w.proc.pid for w in workers.values())
    timed_start = monitor.read()
    for r in range(rounds):
        if r == case.warmup:
            timed_start = monitor.read()
        k = r % len(groups)
        for slot in (s for g in groups[k:] + groups[:k] for s in (g[::-1] if r % 2 else g)):
            worker, command = workers[slot[0]], slot[1]
            if worker.error or slot in dropped:
                continue
            out = worker.call((command, case.burst), 900 if r == 0 else case.timeout * case.burst)
            if out is None:
                log(f"{case.key} {phase} {slot[0]} {command}: FAILED: {worker.error}")
                continue
            times[slot].append(out[0])
            tag = "warm-up" if r < case.warmup else "timed"
            log(f"{case.key} {phase} round {r + 1}/{rounds} ({tag}) {str(slot[0]):<22} {command:<15} "
                f"{out[0] * 1e3:9.1f} ms")
        latest = {s: t[-1] for s, t in times.items() if len(t) == r + 1 and s not in dropped}
        if slow_factor and r >= 1 and r + 1 < rounds and len(latest) >= 3:
            typical = statistics.median(latest.values())
            for slot, t in latest.items():
                if slot[0].variant and t > slow_factor * typical:
                    dropped[slot] = (f"{t / typical:.1f}x slower than the median implementation; "
                                     f"timed on {r} step(s) after the first only")
                    log(f"{case.key} {phase} {slot[0]} {slot[1]}: dropped, {dropped[slot]}")
    noise = monitor.load(timed_start, monitor.read())
    log(f"{case.key} {phase}: CPU load outside the benchmark during the timed rounds: "
        f"{noise['external']:.2f} cores, stolen by the hypervisor: {noise['steal']:.2f} cores")
    return times, dropped, noise


def _summarise(seconds, case, dropped=None):
    """Median step time and samples/s over the timed rounds (over the rounds after the
    first for a dropped slot), or None."""
    timed = seconds[1:] if dropped else seconds[case.warmup:]
    if not timed:
        return None
    med = statistics.median(timed)
    out = {"median_s": med, "samples_per_s": case.batch / med, "first_step_s": seconds[0],
           "timed_s": [round(t, 5) for t in timed]}
    if dropped:
        out["partial"] = dropped
    return out


def emit(record, sink):
    line = json.dumps(record, sort_keys=True)
    print("JSON " + line, flush=True)
    sink.append(record)


def _peaks(peak, fmt):
    """The matmul peaks as one phrase, "fp32 212.3 GFLOP/s, bf16 not measured"."""
    return ", ".join(f"{p} {peak[p]:{fmt}} GFLOP/s" if peak.get(p) else f"{p} not measured" for p in ("fp32", "bf16"))


def measure_matmul_peak(ctx, sink, run_id, when):
    worker = Worker(ctx, Impl("matmul", "fp32/bf16"))
    out = worker.call("matmul", 300) if worker.wait_ready() else None
    worker.stop()
    if out is None:
        log(f"matmul peak ({when}) failed: {worker.error}")
        return {}
    peak = {k: v if v is None else round(v, 1) for k, v in out[1].items()}
    log(f"matmul peak ({when}): {_peaks(peak, '.0f')}")
    emit({"run": run_id, "kind": "matmul_peak", "when": when, "n": 4096, "gflops": peak}, sink)
    return peak


def bench_case(ctx, case, impls, profile, slow_factor, sink, run_id):
    """Benchmark every implementation on one case; returns the rows for the table."""
    from wrn3d_tl.model import count_flops
    config = case.config()
    arch = config  # a WRNConfig: wrn3d_tl.config imports no TensorFlow, so torch workers may load it
    flops = count_flops(config)
    log(f"== {case.label}: {flops / 1e9:.3f} GFLOP forward per sample; starting {len(impls)} workers")
    workers = {impl: Worker(ctx, impl, case, arch) for impl in impls}
    for impl, w in workers.items():
        if not w.wait_ready():
            log(f"{case.key} {impl} could not start: {w.error}")
    try:
        train_groups = [[(impl, "train")] + ([(impl, "train_pipeline")] if impl == TL_FP32 else [])
                        for impl in impls]
        train, train_dropped, train_noise = timed_rounds(workers, train_groups, case, "train", slow_factor)
        alone = workers[TL_FP32].call("pipeline_alone", 300) if TL_FP32 in workers else None
        infer, infer_dropped, infer_noise = timed_rounds(workers, [[(impl, "infer")] for impl in impls], case,
                                                         "infer", slow_factor)
        emit({"run": run_id, "kind": "noise", "config": case.key, "label": case.label,
              "train": train_noise, "infer": infer_noise}, sink)
        profiles = {}
        if profile:
            for impl in impls:
                if not impl.variant:
                    out = workers[impl].call("profile", 600)
                    if out is not None:
                        profiles[impl] = out[1]
        rss = {impl: w.call("rss", 30) for impl, w in workers.items()}
        onednn = {impl: w.call("onednn", 30) for impl, w in workers.items()}
    finally:
        stop_all(workers.values())

    rows = []
    for impl in impls:
        w = workers[impl]
        tr = _summarise(train[(impl, "train")], case, train_dropped.get((impl, "train")))
        inf = _summarise(infer[(impl, "infer")], case, infer_dropped.get((impl, "infer")))
        row = {"run": run_id, "kind": "step", "config": case.key, "label": case.label, "impl": impl.label,
               "precision": impl.precision, "batch": case.batch, "warmup": case.warmup, "steps": case.steps,
               "burst": case.burst,
               "forward_gflop_per_sample": flops / 1e9, "error": w.error, "train": tr, "infer": inf,
               "train_gflops": tr and tr["samples_per_s"] * 3 * flops / 1e9,
               "infer_gflops": inf and inf["samples_per_s"] * flops / 1e9, "onednn": onednn[impl]}
        if rss[impl]:
            row["rss_baseline_mb"] = round(rss[impl]["baseline_mb"], 1)
            row["rss_peak_mb"] = round(rss[impl]["peak_mb"], 1)
            row["rss_growth_mb"] = round(rss[impl]["peak_mb"] - rss[impl]["baseline_mb"], 1)
        if impl in profiles:
            row["profile"] = profiles[impl]
        emit(row, sink)
        rows.append(row)
    if TL_FP32 in workers:
        pre = _summarise(train[(TL_FP32, "train")], case, train_dropped.get((TL_FP32, "train")))
        pipe = _summarise(train[(TL_FP32, "train_pipeline")], case, train_dropped.get((TL_FP32, "train_pipeline")))
        paired = pipe and pre and [a / b for a, b in zip(pipe["timed_s"], pre["timed_s"])]
        rec = {"run": run_id, "kind": "pipeline", "config": case.key, "label": case.label,
               "premade": pre, "pipeline": pipe, "error": workers[TL_FP32].error,
               "ratio_of_medians": pipe and pre and pipe["median_s"] / pre["median_s"],
               "pipeline_alone_s_per_batch": alone and alone[1],
               # each round runs the two steps back to back: the median of the per-round
               # ratios is the number least sensitive to drifting machine load
               "ratio": paired and statistics.median(paired)}
        emit(rec, sink)
    return rows


# --------------------------------------------------------------------------- reporting
def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def report(records, peak, limit=None):
    """Print the run's tables and return the summary ratios. ``limit``: the CPU's physical
    fp32 limit (``wrn3d_tl.cpu.fp32_limit()``), printed beside TensorFlow's matmul peak."""
    steps = [r for r in records if r["kind"] == "step"]
    fp32_peak = peak.get("fp32")
    notes = []

    def cell(result, value, spec):
        if not result:
            return "—"
        text = _fmt(value, spec)
        if result.get("partial"):
            notes.append(result["partial"])
            text += f" [{len(notes)}]"
        return text

    print("\n| config | implementation | precision | oneDNN | train samples/s | inference samples/s | train GFLOP/s "
          "| % of fp32 matmul peak | peak RSS growth MB | train step ms |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in steps:
        tr, inf = r["train"], r["infer"]
        if r["error"] and not tr:
            print(f"| {r['label']} | {r['impl']} | {r['precision']} | | error: {r['error']} | | | | | |")
            continue
        pct = r["train_gflops"] / fp32_peak * 100 if fp32_peak and r["train_gflops"] else None
        note = f" (error: {r['error']})" if r["error"] else ""
        dnn = {True: "on", False: "off"}.get(r.get("onednn"), "—")
        print(f"| {r['label']} | {r['impl']}{note} | {r['precision']} | {dnn} "
              f"| {cell(tr, tr and tr['samples_per_s'], '.1f')} "
              f"| {cell(inf, inf and inf['samples_per_s'], '.1f')} | {_fmt(r['train_gflops'], '.1f')} "
              f"| {_fmt(pct, '.0f')} | {_fmt(r.get('rss_growth_mb'), '.0f')} "
              f"| {_fmt(tr and tr['median_s'] * 1e3, '.0f')} |")
    if notes:
        print()
        for i, text in enumerate(notes, 1):
            print(f"[{i}] {text} (--slow-factor).")
    if peak:
        print(f"\nTensorFlow matmul peak (4096x4096, this run): {_peaks(peak, '.1f')}")
    if limit:
        share = ""
        if peak.get("fp32"):
            share = f"; the fp32 matmul reaches {peak['fp32'] / limit['gflops']:.0%} of it"
            if peak["fp32"] > limit["gflops"]:   # the clock the kernel reports is not the one the cores ran at
                need = peak["fp32"] / (limit["gflops"] / limit["ghz"])
                share += f", which needs at least {need:.2f} GHz on those units: the cores ran above the reported clock"
        print(f"Physical fp32 limit (estimate): {limit['gflops']:.1f} GFLOP/s = {limit['basis']}{share}")

    def sps(config, impl, precision, phase="train"):
        for r in steps:
            if (r["config"], r["impl"], r["precision"]) == (config, impl, precision) and r[phase]:
                return r[phase]["samples_per_s"]
        return None

    summary = {}
    print("\nSummary ratios (train throughput unless said otherwise):")
    for config in dict.fromkeys(r["config"] for r in steps):
        for prec in ("fp32", "bf16"):
            for phase in ("train", "infer"):
                ours = sps(config, "wrn3d_tl", prec, phase)
                rivals = {impl: sps(config, impl, prec, phase) for impl in RIVALS}
                rivals = {k: v for k, v in rivals.items() if v}
                if ours and rivals:
                    best = max(rivals, key=rivals.get)
                    ratio = ours / rivals[best]
                    summary[f"{config}/{prec}/{phase}/wrn3d_tl_vs_best"] = ratio
                    print(f"- {config} {prec} {phase}: wrn3d_tl / best competitor ({best}) = {ratio:.2f}x")
        fp32, bf16 = sps(config, "wrn3d_tl", "fp32"), sps(config, "wrn3d_tl", "bf16")
        if fp32 and bf16:
            summary[f"{config}/bf16_over_fp32"] = bf16 / fp32
            print(f"- {config}: wrn3d_tl bf16 / fp32 = {bf16 / fp32:.2f}x")
        tl_row = next((r for r in steps if (r["config"], r["impl"], r["precision"]) == (config, "wrn3d_tl", "fp32")
                       and r["train_gflops"]), None)
        if tl_row and fp32_peak:
            frac = tl_row["train_gflops"] / fp32_peak
            summary[f"{config}/fp32_of_matmul_peak"] = frac
            print(f"- {config}: wrn3d_tl fp32 {tl_row['train_gflops']:.1f} GFLOP/s = {frac:.0%} of the fp32 matmul peak")
    for r in records:
        if r["kind"] == "pipeline" and r["ratio"]:
            summary[f"{r['config']}/pipeline_over_premade"] = r["ratio"]
            print(f"- {r['config']}: wrn3d_tl fp32 step time, input pipeline / pre-made batch = {r['ratio']:.3f} "
                  f"(median of per-round ratios; medians {r['pipeline']['median_s'] * 1e3:.1f} vs "
                  f"{r['premade']['median_s'] * 1e3:.1f} ms; target <= 1.05; the pipeline alone makes a batch "
                  f"in {_fmt(r['pipeline_alone_s_per_batch'] and r['pipeline_alone_s_per_batch'] * 1e3, '.1f')} ms)")
    noise = [r for r in records if r["kind"] == "noise"]
    if noise:
        print("- machine noise in the timed rounds (CPU busy outside the benchmark / stolen by the hypervisor, "
              "in cores of " + str(os.cpu_count()) + "): " + "; ".join(
                  f"{r['config']} train {r['train']['external']:.2f}/{r['train']['steal']:.2f}, "
                  f"infer {r['infer']['external']:.2f}/{r['infer']['steal']:.2f}" for r in noise))
    profiles = [r for r in steps if r.get("profile")]
    if profiles:
        print("\nTop ops by kernel time in one profiled train step (TensorFlow: op types, time summed over "
              "its threads; PyTorch: operators, self CPU time):")
        for r in profiles:
            p = r["profile"]
            ops = ", ".join(f"{name} {ms:.0f} ms ({ms / p['op_ms_total']:.0%}, x{n})" for name, ms, n in p["ops"])
            print(f"- {r['config']} {r['impl']}/{r['precision']} (step {p['wall_ms']:.0f} ms wall, "
                  f"{p['op_ms_total']:.0f} ms of kernels): {ops}")
    return summary


def environment():
    import tensorflow as tf
    import keras
    cpu = wrn3d_tl.cpu.cpu_model()
    # what decides the kernels: AVX2 only, AVX-512, bf16 dot products, AMX tiles
    cpu_flags = wrn3d_tl.cpu.cpu_flags(relevant_only=True)
    env = {"cpu": cpu, "cpu_flags": cpu_flags, "cores": os.cpu_count(), "fp32_limit": wrn3d_tl.cpu.fp32_limit(),
           "python": platform.python_version(), "tensorflow": tf.__version__,
           "keras": keras.__version__, "onednn": wrn3d_tl.cpu.onednn_enabled(),
           "TF_ENABLE_ONEDNN_OPTS": os.environ.get(wrn3d_tl.cpu.ONEDNN_VAR),
           "isa_caps": wrn3d_tl.cpu.isa_caps()}
    try:
        env["tensorlayer"] = importlib.metadata.version("tensorlayer")
    except Exception:  # noqa: BLE001
        pass
    if torch_available():
        import torch
        env["torch"] = torch.__version__
    return env


# ------------------------------------------------------------------------ --self-check
def self_check(case_keys):
    """The torch reference model must match wrn3d_tl: trainable parameters in total
    (``count_params(build_wrn(config))``) and per stage (``group_shapes``), stage
    output shapes, and forward FLOPs (``count_flops``, counted by torch's FlopCounterMode)."""
    if not torch_available():
        print("self-check: torch is not importable; nothing to check (install torch==2.13.0 for it)")
        return 0
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from torch_wrn import build_torch_wrn, count_torch_params, stage_params
    from wrn3d_tl.model import build_wrn, count_flops, count_params, group_shapes
    failures = 0
    for key in case_keys:
        case = CASES[key]
        config = case.config()
        tmodel = build_torch_wrn(config).eval()
        rows = {r[0]: r for r in group_shapes(config)}
        checks = [("total params vs count_params(build_wrn)", count_torch_params(tmodel), count_params(build_wrn(config))),
                  ("total params vs group_shapes", count_torch_params(tmodel), sum(r[3] for r in rows.values()))]
        checks += [(f"{stage} params", n, rows[stage][3]) for stage, n in stage_params(tmodel).items()]
        x = torch.zeros((1, config.input_shape[-1]) + config.input_shape[:-1])
        shapes = {}
        hooks = [getattr(tmodel, s).register_forward_hook(
            lambda m, i, o, s=s: shapes.__setitem__(s, tuple(o.shape[2:]) + (o.shape[1],)))
            for s in ("stem", "group1", "group2", "group3")]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            tmodel(x)
        for h in hooks:
            h.remove()
        checks += [(f"{s} output shape", shapes[s], tuple(rows[s][1]) + (rows[s][2],)) for s in shapes]
        checks.append(("forward FLOPs vs count_flops", counter.get_total_flops(), count_flops(config)))
        for what, got, want in checks:
            ok = got == want
            failures += not ok
            print(f"self-check {case.label}: {what}: torch {got} vs wrn3d_tl {want} {'ok' if ok else 'MISMATCH'}")
    print(f"self-check: {'all ok' if not failures else f'{failures} mismatch(es)'}")
    return 1 if failures else 0


# --------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per config (default: per config, 5 or 15)")
    p.add_argument("--batch", type=int, default=None, help="batch size of every config (default: per config)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds per config (default: 2 or 3)")
    p.add_argument("--burst", type=int, default=None, help="steps back to back per round (default: 1, 8 for "
                   "the small config)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is importable")
    p.add_argument("--no-xla", action="store_true", help="skip the wrn3d_tl XLA (jit_compile=True) row")
    p.add_argument("--bf16-rivals", action=argparse.BooleanOptionalAction, default=True,
                   help="also run Keras and PyTorch in bf16 (default on)")
    p.add_argument("--torch-compile", action="store_true", help="also run torch.compile (slow to compile)")
    p.add_argument("--slow-factor", type=float, default=3.0,
                   help="drop an optional variant (XLA, torch.compile) from further rounds once its step takes "
                   "more than this many "
                   "times the median of the round (0: never); its row then reports the steps it ran after "
                   "the first. Keeps a very slow XLA row within the time budget")
    p.add_argument("--profile", action="store_true", help="profile one train step of every row but XLA and "
                   "torch.compile (tf.profiler / torch.profiler) and print the top 5 ops")
    p.add_argument("--impls", default=None, help="comma-separated subset of the implementations, as printed "
                   "in the progress log (e.g. wrn3d_tl/fp32,torch/fp32)")
    p.add_argument("--json-out", default=None, help="also write every JSON record to this file (one per line)")
    p.add_argument("--self-check", action="store_true", help="check the torch reference model against wrn3d_tl "
                   "(parameters, shapes, FLOPs) and exit non-zero on a mismatch")
    return p.parse_args(argv)


def select_impls(args, have_torch):
    impls = [TL_FP32, Impl("wrn3d_tl", "bf16")]
    if not args.no_xla:
        impls.append(Impl("wrn3d_tl", "fp32", "xla"))
    impls.append(Impl("keras", "fp32"))
    if args.bf16_rivals:
        impls.append(Impl("keras", "bf16"))
    if have_torch:
        impls.append(Impl("torch", "fp32"))
        if args.bf16_rivals:
            impls.append(Impl("torch", "bf16"))
        if args.torch_compile:
            impls.append(Impl("torch", "fp32", "compile"))
    if args.impls:
        wanted = {w.strip() for w in args.impls.split(",")}
        impls = [i for i in impls if str(i) in wanted]
    return impls


def main(argv=None):
    args = parse_args(argv)
    keys = list(QUICK) if args.quick else list(CASES)
    if args.configs:
        keys = [k.strip() for k in args.configs.split(",") if k.strip()]
        unknown = [k for k in keys if k not in CASES]
        if unknown:
            sys.exit(f"unknown config(s) {unknown}; choose from {list(CASES)}")
    if args.self_check:
        return self_check(keys)
    overrides = {f: v for f, v in (("steps", args.steps), ("warmup", args.warmup), ("burst", args.burst),
                                   ("batch", args.batch))
                 if v is not None}
    cases = [dataclasses.replace(CASES[k], **overrides) for k in keys]
    have_torch = torch_available() and not args.no_torch
    if not torch_available():
        print("NOTE: torch is not importable, so the PyTorch rows are skipped "
              "(pip install torch==2.13.0 to include them).", flush=True)
    impls = select_impls(args, have_torch)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    start = time.perf_counter()
    records = []
    env = environment()
    log(f"run {run_id}: {env}; configs {keys}; implementations {[str(i) for i in impls]}")
    emit({"run": run_id, "kind": "environment", **env, "argv": sys.argv[1:]}, records)
    ctx = mp.get_context("spawn")
    peaks = [measure_matmul_peak(ctx, records, run_id, "start")]
    for case in cases:
        bench_case(ctx, case, impls, args.profile, args.slow_factor, records, run_id)
    peaks.append(measure_matmul_peak(ctx, records, run_id, "end"))
    peak = {k: max(p.get(k) or 0 for p in peaks) for k in ("fp32", "bf16")}
    peak = {k: v for k, v in peak.items() if v}
    summary = report(records, peak, env["fp32_limit"])
    elapsed = time.perf_counter() - start
    emit({"run": run_id, "kind": "summary", "ratios": summary, "matmul_peak": peak, "fp32_limit": env["fp32_limit"],
          "elapsed_s": round(elapsed, 1)}, records)
    print(f"\nTotal runtime: {elapsed:.0f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
