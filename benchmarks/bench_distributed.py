#!/usr/bin/env python
"""Split input under tf.distribute: per-worker input work, an input-bound run, resume cost.

    python benchmarks/bench_distributed.py                       # all three sections, ~3 min on 2 cores (167 s)
    python benchmarks/bench_distributed.py --sections count,resume
    python benchmarks/bench_distributed.py --quick --out /tmp/distributed_smoke.json    # smoke test
    python benchmarks/bench_distributed.py --extra-rounds 96 --sections input          # a heavier pipeline

The workload everywhere: WRN-10-1 3D (``WRNConfig(depth=10, widen_factor=1,
input_shape=(4, 16, 16, 3), num_classes=10)``, ``sync_bn=False``), fp32, ``lr=0.01``, global
batch ``B = 32``, fed by ``train_step()`` from ``make_dataset(x, y, batch_size=32,
volume_depth=None, training=True, augment=..., repeat=True, seed=0)`` over 512 float32
volumes 4x16x16x3 drawn from ``np.random.default_rng(0)``, voxel (0, 0, 0, 0) of volume
``i`` set to ``i``. Three modes, each a FRESH set of processes (two tf.distribute
strategies never live in one process):

* ``one process``: one process, no strategy;
* ``2 workers, sharded``: two worker processes on 127.0.0.1 (``TF_CONFIG``,
  ``make_strategy("multiworker")``: ``MultiWorkerMirroredStrategy``, one CPU replica
  each), ``Trainer(shard_input=True)``: ``train_step()`` splits the pipeline with
  ``distribute_datasets_from_function`` (``wrn3d_tl.data.shards.input_share``), each worker
  reads and augments its half of every global batch (``trainer.input_is_split``
  is checked);
* ``2 workers, global batch``: the same with ``shard_input=False``: each worker reads the
  whole global batch and its replica keeps its slice (checked: ``_distributed is None``).

On a 2-core machine the two loopback workers share the two cores (each runs TensorFlow's
default thread pools), as the one process does alone: the numbers compare how the same
two cores are used, not a 2-machine cluster.

Sections (``--sections``, default all):

1. ``count`` -- per-worker input work. ``augment=`` is a counting augmentation (a
   ``tf.numpy_function`` that records, for every sample the pipeline decodes, its index
   from voxel (0, 0, 0, 0) and its per-sample augmentation seed, which ``make_dataset``
   derives from (seed, epoch, index), then a seeded W flip). After every ``train_step`` the
   worker notes how many samples its pipeline has decoded so far. Prefetching reads ahead
   of training, so the count after step ``s`` is ``s * per_batch + read_ahead``; the
   benchmark reports the DIFFERENCE of the counts after step ``--count-warmup`` (10) and
   after step ``--count-warmup + --count-steps`` (10 + 40), divided by 40: a constant
   read-ahead cancels, and a read-ahead that changes inside the window moves the figure
   by (its change) / 40 samples per batch at most. The read-ahead at the end
   (count - steps * expected) is kept in the JSON. Expected: one process B = 32 per global
   batch, each sharded worker B/2 = 16, each global-batch worker 32. Also reported: the
   (epoch, sample) pairs decoded by BOTH workers over the whole run (sharded: 0; global
   batch: every one), and the median step time over the window.
2. ``input`` -- an input-bound run. ``augment=`` is ``Augment3D(flip_axes="DHW",
   rotate_plane="HW", crop_padding=2, scale=0.1, shift=0.1)`` followed by a deliberately
   costly, deterministic per-sample op: ``--extra-rounds`` (48) rounds of
   ``v = (v + conv3d(v, K)) / 2`` with a fixed 3x3x3, 3->3 channel kernel ``K`` (seeded
   numpy, L1-normalised), which makes the pipeline cost a multiple of the train step's
   compute (both are measured alone in the one-process run: ``pipeline alone`` = the
   pipeline iterated with no training, ms per global batch over 25 batches after 5
   warm-up ones; ``compute alone`` = median ``train_step(x, y)`` on a fixed batch). Each
   mode trains ``--input-warmup`` (20, dropped) + ``--input-steps`` (25) steps; reported:
   the median step time (wall clock around ``train_step``, worker 0 for the 2-worker
   modes; both workers' are in the JSON, and they agree within a step since every step
   all-reduces), steps/s = 1 / median, samples/s = 32 * steps/s, and each mode over the
   global-batch mode. Why 20 warm-up steps: while the first step traces (seconds), the
   pipeline reads ahead, up to 5-8 batches, and a starved pipeline then needs 7-15 steps
   to drain that buffer (measured); steps served from it would look fast. A cheap counter
   in the augmentation checks it: the read-ahead (samples decoded minus samples trained
   on) at the window's start and end is printed, with a WARNING when it shrank by more
   than one batch (timed steps served from the buffer); the pipeline's own rate over the
   window (samples decoded / window time) is kept in the JSON. A buffer that GROWS is
   fine: in the global-batch mode the worker whose pipeline is faster waits for the other
   in the all-reduce while its pipeline fills up (to ~5 batches).
3. ``resume`` -- resume cost, one process, no strategy: time from calling
   ``starting_at(ds, k)`` (``wrn3d_tl.data.shards``) or ``ds.skip(k)`` to the first batch
   (``next(iter(...))``), k in ``--ks`` (0, 10, 100, 1000 global batches; 1000 batches of 32
   over 512 samples = 62.5 epochs), on (a) ``make_dataset`` as above with the plain
   ``Augment3D`` (no extra rounds) and (b) ``hdf5_dataset(path, batch_size=32,
   training=True, augment=<the same Augment3D>, repeat=True, seed=0, normalization=None)``
   over the same volumes written by ``write_hdf5_volumes`` to a temporary file (page
   cache: no disk reads). ``ds`` is built once, untimed, per dataset; one untimed warm-up
   of each method, then ``--resume-reps`` (3) rounds over (k, method), median reported.
   Each round also checks that both methods' first batches are identical (they must be,
   with one input pipeline).

Machine noise (CPU time used outside the benchmark's processes, time stolen by the
hypervisor, in cores: 1.0 = one core busy) is measured inside the workers over exactly
their timed window (``/proc/stat`` busy minus the CPU time of the measurement's own
worker processes, from ``getrusage``) and, for the whole life of every measurement
(start-up included), by the parent (``/proc/stat`` minus its own and its reaped children's
CPU time). Runs with more than 0.2 cores of noise get a printed WARNING.

Output: progress on stderr, one markdown table per section on stdout, and a JSON record
(machine: CPU model, cores, TF version; settings; every worker's raw numbers; noise) at
``--out`` (default ``benchmarks/results/distributed_<cpu-slug>.json``, the slug as in
``bench_nifti.py``). Every measurement runs in fresh subprocesses (this script with
``--worker``) that write their numbers to a JSON file in a temporary folder; a
measurement that fails or exceeds ``--timeout`` seconds (its processes are killed, by
pid) is recorded as an error, the others go on, and the record then goes to
``<out>.partial.json`` (exit code 1), never over a complete one. A multi-worker process
waits 2 s after writing its numbers (for the other's last all-reduce), and every worker
then leaves with ``os._exit``: interpreter teardown with live ``tf.data`` iterators whose
threads call ``numpy_function`` was seen to hang, in garbage collection. A worker that has
written its numbers and still not exited 30 s later is killed and noted, not counted as a
failure.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)

# Nothing from TensorFlow or wrn3d_tl at module level: a multi-worker process must create
# its strategy before any TensorFlow work (worker_main does it first).

SECTIONS = ("count", "input", "resume")
MODES = ("single", "sharded", "whole")
MODE_NAMES = {"single": "one process", "sharded": "2 workers, sharded",
              "whole": "2 workers, global batch"}
WORKLOAD = {"network": "WRN-10-1 3D", "depth": 10, "widen_factor": 1, "num_classes": 10,
            "input_shape": [4, 16, 16, 3], "sync_bn": False, "batch": 32, "samples": 512, "precision": "fp32",
            "lr": 0.01, "data_seed": 0, "pipeline_seed": 0, "tf_seed": 0}
EXIT_GRACE_S = 30.0  # a worker that wrote its results is killed when it has not exited this long after
AUGMENT3D = {"flip_axes": "DHW", "rotate_plane": "HW", "crop_padding": 2, "scale": 0.1, "shift": 0.1}


def log(msg):
    print(f"[bench_distributed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ noise
def _proc_stat():
    """(busy, steal) CPU seconds of the whole machine, or (None, None)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / tick, v[7] / tick  # user nice system irq softirq | steal
    except (OSError, ValueError, IndexError):
        return None, None


def _own_cpu(children=False):
    who = [resource.RUSAGE_SELF] + ([resource.RUSAGE_CHILDREN] if children else [])
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime for w in who)


class Window:
    """Wall time, machine busy/steal and this process's CPU time (with reaped children when
    ``children``) between ``start()`` and ``stop()``."""

    def __init__(self, children=False):
        self.children = children

    def _sample(self):
        busy, steal = _proc_stat()
        return time.perf_counter(), busy, steal, _own_cpu(self.children)

    def start(self):
        self.a = self._sample()
        return self

    def stop(self):
        b = self._sample()
        wall = b[0] - self.a[0]
        rec = {"wall_s": round(wall, 3), "own_cpu_s": round(b[3] - self.a[3], 3)}
        if b[1] is not None and self.a[1] is not None:
            rec["machine_busy_s"] = round(b[1] - self.a[1], 3)
            rec["steal_s"] = round(b[2] - self.a[2], 3)
        return rec


def noise_of(windows):
    """{"external", "steal"} in cores over windows that ran at the same time (one per
    process of a measurement): machine busy (from the first window) minus every window's
    own CPU time, per wall second."""
    w0 = windows[0]
    if "machine_busy_s" not in w0 or w0["wall_s"] <= 0:
        return None
    wall = w0["wall_s"]
    own = sum(w["own_cpu_s"] / w["wall_s"] for w in windows if w["wall_s"] > 0)
    return {"external": round(max(0.0, w0["machine_busy_s"] / wall - own), 3),
            "steal": round(w0["steal_s"] / wall, 3)}


# ---------------------------------------------------------------------- worker side
class Counting:
    """``augment=`` that records every sample a pipeline decodes (index from voxel
    (0, 0, 0, 0), and the per-sample seed, unique per (epoch, index)), then flips W with
    probability 1/2 from the seed (so the pipeline still augments)."""

    def __init__(self):
        self.seen = []

    def __call__(self, sample, seed):
        import tensorflow as tf

        def record(v, s):
            self.seen.append((round(float(v[0, 0, 0, 0])), int(s[0]), int(s[1])))
            return v
        sample = tf.ensure_shape(tf.numpy_function(record, [sample, seed], tf.float32, stateful=True), sample.shape)
        flip = tf.random.stateless_uniform([], seed) < 0.5
        return tf.where(flip, tf.reverse(sample, [2]), sample)


class Expensive:
    """``Augment3D(**AUGMENT3D)`` then ``rounds`` rounds of ``v = (v + conv3d(v, K)) / 2``
    with a fixed, L1-normalised 3x3x3 C->C kernel: deterministic, and as costly as wanted."""

    def __init__(self, rounds, channels):
        import numpy as np

        from wrn3d_tl.data import Augment3D
        self.augment = Augment3D(**AUGMENT3D)
        self.decoded = 0  # samples augmented so far (a cheap counter, for the read-ahead)
        self.rounds = int(rounds)
        k = np.random.default_rng(1).standard_normal((3, 3, 3, channels, channels)).astype("float32")
        self.kernel = k / np.abs(k).sum(axis=(0, 1, 2, 3), keepdims=True)

    def __call__(self, sample, seed):
        import tensorflow as tf

        def count(v):
            self.decoded += 1
            return v
        sample = tf.ensure_shape(tf.numpy_function(count, [sample], tf.float32, stateful=True), sample.shape)
        v = self.augment(sample, seed)
        if not self.rounds:
            return v
        kernel = tf.constant(self.kernel)

        def body(i, u):
            return i + 1, 0.5 * (u + tf.nn.conv3d(u[None], kernel, [1] * 5, "SAME")[0])
        _, v = tf.while_loop(lambda i, u: i < self.rounds, body, (tf.constant(0), v))
        return tf.ensure_shape(v, sample.shape)


def _data():
    import numpy as np
    w = WORKLOAD
    rng = np.random.default_rng(w["data_seed"])
    x = rng.standard_normal((w["samples"],) + tuple(w["input_shape"]), dtype=np.float32)
    x[:, 0, 0, 0, 0] = np.arange(w["samples"])
    y = rng.integers(0, w["num_classes"], w["samples"], dtype=np.int64)
    return x, y


def _pipeline(x, y, augment):
    from wrn3d_tl.data import make_dataset
    return make_dataset(x, y, batch_size=WORKLOAD["batch"], volume_depth=None, training=True, augment=augment,
                        repeat=True, seed=WORKLOAD["pipeline_seed"])


def _config():
    from wrn3d_tl.model import WRNConfig
    w = WORKLOAD
    return WRNConfig(depth=w["depth"], widen_factor=w["widen_factor"], num_classes=w["num_classes"],
                     input_shape=tuple(w["input_shape"]), sync_bn=w["sync_bn"])


def _trainer(strategy, data, mode):
    import tensorflow as tf

    from wrn3d_tl.model import build_wrn
    from wrn3d_tl.train import Trainer
    tf.random.set_seed(WORKLOAD["tf_seed"])
    if strategy is None:
        model = build_wrn(_config())
    else:
        with strategy.scope():
            model = build_wrn(_config())
    return Trainer(model, data, lr=WORKLOAD["lr"], strategy=strategy, shard_input=mode != "whole", verbose=False)


def _check_split(trainer, mode):
    split = trainer.input_is_split
    if split != (mode == "sharded"):
        raise RuntimeError(f"mode {mode}: the input was {'split' if split else 'read whole'}, "
                           f"expected {'split' if mode == 'sharded' else 'read whole'}")
    return split


def work_count(spec, strategy):
    x, y = _data()
    counter = Counting()
    trainer = _trainer(strategy, _pipeline(x, y, counter), spec["mode"])
    warmup, steps = spec["count_warmup"], spec["count_steps"]
    counts, step_s, window = [], [], Window()
    for s in range(warmup + steps):
        if s == warmup:
            window.start()
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        step_s.append(time.perf_counter() - t0)
        counts.append(len(counter.seen))  # samples decoded so far, after step s + 1
    win = window.stop()
    return {"split": _check_split(trainer, spec["mode"]), "counts_after_step": counts, "step_s": step_s,
            "seen": counter.seen, "timed_window": win, "last_loss": metrics["loss"]}


def work_input(spec, strategy):
    import tensorflow as tf
    x, y = _data()
    out = {}
    if spec["mode"] == "single":  # the two costs, each alone (one process only)
        alone = _trainer(None, None, "single")
        xb, yb = tf.constant(x[:WORKLOAD["batch"]]), tf.constant(y[:WORKLOAD["batch"]])
        times = []
        for s in range(spec["input_warmup"] + spec["input_steps"]):
            t0 = time.perf_counter()
            alone.train_step(xb, yb)
            times.append(time.perf_counter() - t0)
        out["compute_alone_s"] = times[spec["input_warmup"]:]
        del alone
        it = iter(_pipeline(x, y, Expensive(spec["extra_rounds"], x.shape[-1])))
        for _ in range(5):
            next(it)
        n = spec["input_steps"]
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        out["pipeline_alone_s_per_batch"] = (time.perf_counter() - t0) / n
        del it
    augment = Expensive(spec["extra_rounds"], x.shape[-1])
    trainer = _trainer(strategy, _pipeline(x, y, augment), spec["mode"])
    step_s, counts, window = [], [], Window()
    for s in range(spec["input_warmup"] + spec["input_steps"]):
        if s == spec["input_warmup"]:
            window.start()
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        step_s.append(time.perf_counter() - t0)
        counts.append(augment.decoded)
    out.update({"split": _check_split(trainer, spec["mode"]), "step_s": step_s, "counts_after_step": counts,
                "timed_window": window.stop(), "last_loss": metrics["loss"]})
    return out


def work_resume(spec, _strategy):
    import numpy as np

    from wrn3d_tl.data import Augment3D, hdf5_dataset, write_hdf5_volumes
    from wrn3d_tl.data.shards import starting_at
    x, y = _data()
    path = os.path.join(spec["tmp"], "volumes.h5")
    write_hdf5_volumes(path, x, y)
    builders = {
        "make_dataset": lambda: _pipeline(x, y, Augment3D(**AUGMENT3D)),
        "hdf5_dataset": lambda: hdf5_dataset(path, batch_size=WORKLOAD["batch"], training=True,
                                             augment=Augment3D(**AUGMENT3D), repeat=True,
                                             seed=WORKLOAD["pipeline_seed"], normalization=None),
    }
    methods = {"starting_at": starting_at, "skip": lambda ds, k: ds.skip(k)}

    def first(name, method, k):
        # A fresh dataset every time, built untimed: iterating one dataset object again would
        # continue its epochs (wrn3d_tl.data counts passes), so the batches would differ.
        ds = builders[name]()
        t0 = time.perf_counter()
        it = iter(methods[method](ds, k))
        bx, by = next(it)
        elapsed = time.perf_counter() - t0
        del it, ds
        return elapsed, bx.numpy(), by.numpy()

    window = Window().start()
    out = {}
    for name in builders:
        for method in methods:  # untimed warm-up: first iteration of each kind
            first(name, method, 1)
        times = {m: {str(k): [] for k in spec["ks"]} for m in methods}
        same = {str(k): [] for k in spec["ks"]}
        for r in range(spec["resume_reps"]):
            for k in spec["ks"]:
                got = {}
                for method in (methods if r % 2 == 0 else list(methods)[::-1]):
                    t, bx, by = first(name, method, k)
                    times[method][str(k)].append(t)
                    got[method] = (bx, by)
                same[str(k)].append(bool(np.array_equal(got["skip"][0], got["starting_at"][0])
                                         and np.array_equal(got["skip"][1], got["starting_at"][1])))
                log(f"resume {name} k={k} rep {r + 1}: starting_at {times['starting_at'][str(k)][-1]:.3f} s, "
                    f"skip {times['skip'][str(k)][-1]:.3f} s")
        out[name] = {"first_batch_s": times, "same_first_batch": same}
    out["timed_window"] = window.stop()
    return out


def worker_main(spec_json):
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before a kill
    spec = json.loads(spec_json)
    strategy = None
    if spec["mode"] != "single":
        from wrn3d_tl.distribute import make_strategy
        strategy = make_strategy("multiworker")  # first TensorFlow work of the process
    import tensorflow as tf
    task = 0 if strategy is None else strategy.cluster_resolver.task_id
    t0 = time.perf_counter()
    result = {"count": work_count, "input": work_input,
              "resume": work_resume}[spec["section"]](spec, strategy)
    result.update({"task": task, "pid": os.getpid(), "mode": spec["mode"], "tensorflow": tf.__version__,
                   "replicas": 1 if strategy is None else strategy.num_replicas_in_sync,
                   "work_s": round(time.perf_counter() - t0, 3)})
    path = os.path.join(spec["tmp"], f"worker{task}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    if strategy is not None:
        time.sleep(2.0)  # the other worker may still be receiving this one's last all-reduce messages
    # Leave without interpreter teardown: with tf.data iterators still alive (their threads
    # call numpy_function) it can hang in garbage collection.
    os._exit(0)


# ---------------------------------------------------------------------- parent side
def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_measurement(section, mode, settings, timeout, root):
    """Run one measurement in fresh processes (1 for "single", 2 loopback workers
    otherwise); returns (list of worker results by task, parent-side noise record, error or None)."""
    n = 1 if mode == "single" else 2
    tmp = tempfile.mkdtemp(prefix=f"{section}-{mode}-", dir=root)
    spec = json.dumps({**settings, "section": section, "mode": mode, "tmp": tmp})
    env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    ports = free_ports(n) if n > 1 else None
    window = Window(children=True).start()
    procs, logs = [], []
    for i in range(n):
        wenv = dict(env)
        if ports:
            wenv["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                            "task": {"type": "worker", "index": i}})
        logs.append(os.path.join(tmp, f"w{i}.log"))
        with open(logs[-1], "w") as lf:
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec], env=wenv,
                                          stdout=lf, stderr=subprocess.STDOUT, cwd=tmp))
    paths = [os.path.join(tmp, f"worker{i}.json") for i in range(n)]
    deadline = time.monotonic() + timeout
    error, note, written_at = None, None, None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                bad = [(i, c) for i, c in enumerate(codes) if c != 0]
                if bad:
                    error = "; ".join(f"worker {i} exited with code {c}" for i, c in bad)
                break
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:  # the other worker would wait for it in a collective until the timeout
                error = "; ".join(f"worker {i} exited with code {c}" for i, c in failed)
                break
            if all(os.path.exists(q) for q in paths):
                written_at = written_at or time.monotonic()
                if time.monotonic() - written_at > EXIT_GRACE_S:  # results are in; only the exit hangs
                    note = f"worker(s) {[i for i, c in enumerate(codes) if c is None]} wrote their results but " \
                           f"had not exited {EXIT_GRACE_S:.0f} s later: killed"
                    log(f"{section}/{mode}: {note}")
                    break
            if time.monotonic() > deadline:
                error = f"timeout: {section}/{mode} took more than {timeout:.0f} s"
                for q in procs:  # Python stacks of every thread into the logs, then the kill below
                    if q.poll() is None:
                        q.send_signal(signal.SIGUSR1)
                time.sleep(2.0)
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # stragglers: killed by their own pid only
            if p.poll() is None:
                p.kill()
            p.wait()
    parent = window.stop()
    parent_noise = noise_of([parent])
    results = []
    for i, path in enumerate(paths):
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        elif error is None:
            error = f"worker {i} wrote no result"
    if error:
        tails = []
        for i, lp in enumerate(logs):
            try:
                with open(lp) as f:
                    tails.append(f"--- worker {i} log (tail) ---\n" + f.read()[-3000:])
            except OSError:
                pass
        log(f"{section}/{mode}: ERROR {error}\n" + "\n".join(tails))
        results = []
    return results, {"measurement": parent, "noise": parent_noise, "note": note}, error


def _median_ms(seconds):
    return statistics.median(seconds) * 1e3 if seconds else None


def summarise_count(raw, settings):
    B, warmup, steps = WORKLOAD["batch"], settings["count_warmup"], settings["count_steps"]
    rows = {}
    for mode, entry in raw.items():
        workers = entry.get("workers") or []
        if not workers:
            rows[mode] = None
            continue
        expected = B if mode != "sharded" else B // len(workers)
        per_worker = []
        for w in workers:
            c = w["counts_after_step"]
            per_batch = (c[warmup + steps - 1] - c[warmup - 1]) / steps
            per_worker.append({"task": w["task"], "decoded_per_global_batch": round(per_batch, 3),
                               "expected": expected,
                               "read_ahead_at_end": c[-1] - (warmup + steps) * expected,
                               "decoded_total": c[-1],
                               "median_step_ms": _median_ms(w["step_s"][warmup:]),
                               "split": w["split"]})
        both = None
        if len(workers) == 2:
            a, b = ({(s[1], s[2]) for s in w["seen"]} for w in workers)
            both = len(a & b)
        rows[mode] = {"workers": per_worker,
                      "cluster_decoded_per_global_batch": round(sum(p["decoded_per_global_batch"]
                                                                    for p in per_worker), 3),
                      "decoded_by_both_workers": both,
                      "distinct_decoded": len({(s[1], s[2]) for w in workers for s in w["seen"]}),
                      "median_step_ms": per_worker[0]["median_step_ms"],
                      "noise": noise_of([w["timed_window"] for w in workers])}
    return rows


def summarise_input(raw, settings):
    B, warmup = WORKLOAD["batch"], settings["input_warmup"]
    rows = {}
    for mode, entry in raw.items():
        workers = entry.get("workers") or []
        if not workers:
            rows[mode] = None
            continue
        med = [_median_ms(w["step_s"][warmup:]) for w in workers]
        share = B // len(workers) if mode == "sharded" else B
        total = warmup + settings["input_steps"]
        read_ahead, produced = [], []
        for w in workers:
            c = w["counts_after_step"]
            read_ahead.append([c[warmup - 1] - warmup * share, c[-1] - total * share])
            # global batches this worker's pipeline made per second over the window: the
            # pipeline's own rate, whatever its buffer did meanwhile
            produced.append((c[-1] - c[warmup - 1]) / share / w["timed_window"]["wall_s"])
        window = workers[0]["timed_window"]
        row = {"median_step_ms": med[0], "median_step_ms_per_worker": med,
               "steps_per_s": 1e3 / med[0], "samples_per_s": B * 1e3 / med[0],
               "window_steps_per_s": settings["input_steps"] / window["wall_s"],
               "read_ahead_samples_at_window_start_end": read_ahead,
               "pipeline_global_batches_per_s_in_window": produced,
               "split": [w["split"] for w in workers],
               "noise": noise_of([w["timed_window"] for w in workers])}
        if mode == "single":
            row["compute_alone_ms"] = _median_ms(workers[0]["compute_alone_s"])
            row["pipeline_alone_ms_per_batch"] = workers[0]["pipeline_alone_s_per_batch"] * 1e3
        rows[mode] = row
    sharded, whole = rows.get("sharded"), rows.get("whole")
    ratio = sharded and whole and sharded["steps_per_s"] / whole["steps_per_s"]
    return rows, ratio


def summarise_resume(worker):
    rows = {}
    for name in ("make_dataset", "hdf5_dataset"):
        d = worker[name]
        rows[name] = {k: {"starting_at_s": statistics.median(d["first_batch_s"]["starting_at"][k]),
                          "skip_s": statistics.median(d["first_batch_s"]["skip"][k]),
                          "same_first_batch": all(d["same_first_batch"][k])}
                      for k in d["first_batch_s"]["skip"]}
    return rows


def _fmt(v, spec, none="—"):
    return none if v is None else format(v, spec)


def report_count(rows):
    print("\n### 1. Per-worker input work (samples decoded per global batch of 32)\n")
    print("| mode | decoded per global batch, per worker | expected | cluster total | decoded by both workers "
          "| median step ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        row = rows.get(mode)
        if row is None:
            if mode in rows:
                print(f"| {MODE_NAMES[mode]} | FAILED | | | | |")
            continue
        per = " / ".join(f"{w['decoded_per_global_batch']:.2f}" for w in row["workers"])
        print(f"| {MODE_NAMES[mode]} | {per} | {row['workers'][0]['expected']} "
              f"| {row['cluster_decoded_per_global_batch']:.2f} | "
              f"{_fmt(row['decoded_by_both_workers'], 'd', 'n/a')} | {_fmt(row['median_step_ms'], '.1f')} |")


def report_input(rows, ratio, settings):
    print(f"\n### 2. Input-bound run (Augment3D + {settings['extra_rounds']} conv3d rounds per sample, "
          f"global batch 32)\n")
    print("| mode | median step ms | steps/s | samples/s | vs global-batch mode |")
    print("|---|---:|---:|---:|---:|")
    whole = rows.get("whole")
    for mode in MODES:
        row = rows.get(mode)
        if row is None:
            if mode in rows:
                print(f"| {MODE_NAMES[mode]} | FAILED | | | |")
            continue
        rel = whole and row["steps_per_s"] / whole["steps_per_s"]
        print(f"| {MODE_NAMES[mode]} | {row['median_step_ms']:.1f} | {row['steps_per_s']:.2f} "
              f"| {row['samples_per_s']:.0f} | {_fmt(rel, '.2f')}{'x' if rel else ''} |")
    for mode in MODES:
        row = rows.get(mode)
        if row:
            share = WORKLOAD["batch"] // (2 if mode == "sharded" else 1)
            drained = max(a - b for a, b in row["read_ahead_samples_at_window_start_end"]) / share
            print(f"- {MODE_NAMES[mode]}: {row['window_steps_per_s']:.2f} steps/s over the whole window; pipeline read-"
                  f"ahead (samples, per worker) at window start -> end: "
                  + ", ".join(f"{a} -> {b}" for a, b in row["read_ahead_samples_at_window_start_end"])
                  + (f" (WARNING: {drained:.1f} of the timed steps were served from the read-ahead buffer; more "
                     "--input-warmup wanted)" if drained > 1 else ""))
    single = rows.get("single")
    if single:
        print(f"\n- one process, each cost alone: pipeline {single['pipeline_alone_ms_per_batch']:.1f} ms per global "
              f"batch (no training), train step {single['compute_alone_ms']:.1f} ms (fixed in-memory batch)")
    if ratio:
        print(f"- sharded / global batch: {ratio:.2f}x steps/s")


def report_resume(rows):
    print("\n### 3. Resume cost: seconds to the first batch at global batch k (median)\n")
    print("| dataset | k | epochs | ds.skip(k) s | starting_at(ds, k) s | skip / starting_at | same batch |")
    print("|---|---:|---:|---:|---:|---:|:---:|")
    per_epoch = WORKLOAD["samples"] / WORKLOAD["batch"]
    for name, by_k in rows.items():
        for k, r in by_k.items():
            print(f"| {name} | {k} | {int(k) / per_epoch:.1f} | {r['skip_s']:.3f} | {r['starting_at_s']:.3f} "
                  f"| {r['skip_s'] / r['starting_at_s']:.1f}x | {'yes' if r['same_first_batch'] else 'NO'} |")


def machine():
    from bench_nifti import machine
    return machine(("tensorflow", "tensorlayer", "numpy", "h5py"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of count,input,resume")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of single,sharded,whole "
                   "for the count and input sections (default all)")
    p.add_argument("--count-warmup", type=int, default=None, help="steps before the counting window (default 10)")
    p.add_argument("--count-steps", type=int, default=None, help="steps in the counting window (default 40)")
    p.add_argument("--input-warmup", type=int, default=None, help="input-bound warm-up steps, dropped (default 20)")
    p.add_argument("--input-steps", type=int, default=None, help="input-bound timed steps (default 25)")
    p.add_argument("--extra-rounds", type=int, default=48, help="conv3d rounds per sample in the input-bound "
                   "section (default 48)")
    p.add_argument("--ks", default=None, help="global batches to resume at (default 0,10,100,1000)")
    p.add_argument("--resume-reps", type=int, default=None, help="timed rounds per (k, method) (default 3)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one measurement (its processes' whole "
                   "life) may take before they are killed (default 300)")
    p.add_argument("--quick", action="store_true", help="smoke test: fewer steps, k up to 100, 1 round")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/distributed_<cpu-slug>.json)")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("count_warmup", 10, 5), ("count_steps", 40, 10), ("input_warmup", 20, 5),
                              ("input_steps", 25, 5), ("resume_reps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.ks = [int(k) for k in (args.ks or ("0,10,100" if q else "0,10,100,1000")).split(",")]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes: choose from {','.join(MODES)}, got {args.modes}")
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        p.error(f"--sections: choose from {','.join(SECTIONS)}, got {bad or 'nothing'}")
    if min(args.count_warmup, args.count_steps, args.input_warmup, args.input_steps, args.resume_reps) < 1:
        p.error("warm-up, step and rep counts must be >= 1")
    if args.extra_rounds < 0 or any(k < 0 for k in args.ks):
        p.error("--extra-rounds and --ks must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)
    from bench_nifti import cpu_slug

    start = time.perf_counter()
    env = machine()
    out = args.out or os.path.join(_HERE, "results", f"distributed_{cpu_slug(env['cpu'], env['cores'])}.json")
    settings = {"count_warmup": args.count_warmup, "count_steps": args.count_steps,
                "input_warmup": args.input_warmup, "input_steps": args.input_steps,
                "extra_rounds": args.extra_rounds, "ks": args.ks, "resume_reps": args.resume_reps}
    log(f"{env}; sections {args.sections}; {settings}")
    idle = Window().start()
    time.sleep(1.0)
    idle = noise_of([idle.stop()])
    log(f"machine noise before the run (1 s idle): {idle}")

    root = tempfile.mkdtemp(prefix="bench_distributed-")
    raw, errors, summary = {}, {}, {}
    try:
        for section in args.sections:
            modes = ("single",) if section == "resume" else [m for m in MODES if m in args.modes]
            raw[section] = {}
            for mode in modes:
                log(f"{section}: {MODE_NAMES[mode]} ...")
                workers, parent, error = run_measurement(section, mode, settings, args.timeout, root)
                raw[section][mode] = {"workers": workers, "parent": parent, "error": error}
                if error:
                    errors[f"{section}/{mode}"] = error
                else:
                    log(f"{section}: {MODE_NAMES[mode]} done in {parent['measurement']['wall_s']:.1f} s "
                        f"(noise over the measurement: {parent['noise']})")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if "count" in raw:
        summary["count"] = summarise_count(raw["count"], settings)
        report_count(summary["count"])
        for entry in raw["count"].values():  # the decoded-sample lists were only needed for the overlap
            for w in entry["workers"]:
                w["seen_count"] = len(w.pop("seen"))
    if "input" in raw:
        rows, ratio = summarise_input(raw["input"], settings)
        summary["input"] = {"modes": rows, "sharded_over_global_batch": ratio}
        report_input(rows, ratio, settings)
    if "resume" in raw and raw["resume"]["single"]["workers"]:
        summary["resume"] = summarise_resume(raw["resume"]["single"]["workers"][0])
        report_resume(summary["resume"])

    noises = []
    for section, by_mode in raw.items():
        for mode, entry in by_mode.items():
            for_window = noise_of([w["timed_window"] for w in entry["workers"]]) if entry["workers"] else None
            entry["timed_window_noise"] = for_window
            if for_window:
                noises.append((for_window["external"] + for_window["steal"], section, mode))
    print()
    if idle:
        print(f"- machine noise, 1 s idle before the run: {idle['external']:.2f} cores used by other processes, "
              f"{idle['steal']:.2f} stolen")
    if noises:
        worst = max(noises)
        print(f"- machine noise over the timed windows (cores of {env['cores']}): worst {worst[0]:.2f} "
              f"({worst[1]}/{MODE_NAMES[worst[2]]}); per measurement in the JSON")
        if worst[0] > 0.2:
            print("WARNING: other processes used more than 0.2 cores during a timed window; its times are inflated. "
                  "Rerun on a quiet machine.")
    record = {
        "kind": "distributed", "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:],
        "machine": env,
        "settings": {**settings, "sections": args.sections, "quick": args.quick, "timeout_s": args.timeout,
                     "workload": WORKLOAD, "augment3d": AUGMENT3D,
                     "count_augment": "numpy_function recording (index, seed) per decoded sample, then seeded W flip",
                     "input_augment": f"Augment3D({AUGMENT3D}) then {args.extra_rounds} rounds of "
                                      "v = (v + conv3d(v, K)) / 2, K fixed 3x3x3x3x3 L1-normalised",
                     "modes": MODE_NAMES},
        "summary": summary,
        "raw": raw,
        "noise": {"idle_before": idle, "unit": "cores (1.0 = one core busy)",
                  "timed_windows": {f"{s}/{m}": raw[s][m]["timed_window_noise"] for s in raw for m in raw[s]},
                  "measurements": {f"{s}/{m}": raw[s][m]["parent"]["noise"] for s in raw for m in raw[s]}},
        "errors": errors or None,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    if errors:
        root_, ext = os.path.splitext(out)
        out = root_ + ".partial" + (ext or ".json")
        for name, e in errors.items():
            print(f"ERROR: {name}: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"\nJSON: {out}\nTotal runtime: {record['elapsed_s']:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
