#!/usr/bin/env python
"""Host round-trips of ``Trainer.train_step``: steps/s of two source trees of wrn3d_tl, in one run.

    python benchmarks/bench_host_sync.py                          # a8c8916 vs the working tree, ~1 min on 2 cores
    python benchmarks/bench_host_sync.py --quick --out /tmp/host_sync_smoke.json    # smoke test, ~25 s
    python benchmarks/bench_host_sync.py --before a8c8916 --after a8c8916           # A/A: the machinery's own spread
    python benchmarks/bench_host_sync.py --before HEAD~1 --after /path/to/checkout --rounds 30

What is compared: ``--before`` and ``--after`` each name a source tree, either a directory
holding a ``wrn3d_tl`` package (``--after`` defaults to the repo this script lives in, its
working tree with any uncommitted edits) or a git revision of that repo (``--before``
defaults to ``a8c8916``), which is extracted once with ``git archive REV | tar -x`` into
``/tmp/wrn3d-src-<sha12>`` (files made read-only, no git worktree registered) and reused by
later runs. Each tree runs in its OWN worker process (a subprocess of this script with
``PYTHONPATH`` = that tree and that tree as working directory), which checks that
``wrn3d_tl`` really was imported from its tree. The JSON records every tree's path, git
commit, the uncommitted files under ``wrn3d_tl/`` and a hash of its ``wrn3d_tl/*.py``
sources (a note is printed when both trees hold the same sources).

The workload: WRN-10-2 3D (``WRNConfig(depth=10, widen_factor=2, num_classes=10,
input_shape=(4, 16, 16, 3))``, NDHWC), batch 16, fp32, ``Trainer(model, lr=0.01,
verbose=False)`` after ``tf.random.set_seed(0)``, in two modes, each with its own trainer
(so each mode's run of steps does not depend on the other's):

* ``explicit``: ``trainer.train_step(x, y)`` on one fixed numpy batch (float32 x ~ N(0, 1)
  from a seeded generator, int64 y in [0, 10)): the outside-controller API;
* ``data``: ``trainer.train_step()`` pulling from ``train_data=make_dataset(x_train,
  y_train, batch_size=16, volume_depth=None, training=False, repeat=True,
  drop_remainder=True)`` over 256 random float32 volumes 4x16x16x3 (no augmentation, no
  shuffling, so the pipeline is cheap): the data-driven path.

Method (that of ``bench_train.py``): the parent drives the two worker processes
round-robin; every round runs one burst (``--burst`` steps back to back, 8 by default) of
each (tree, mode) slot: even rounds before/explicit, after/explicit, before/data,
after/data; odd rounds the reverse. So the before/after pair of a mode always runs
adjacent in time, each tree going first half the time, every burst starts in a worker
that has just waited (alike for both trees), and only one worker computes at any moment.
A burst is timed inside
its worker, wall clock, until the last ``train_step`` has returned (it returns Python
floats, so the result is on the host); a round's time is the burst's mean. The first
``--warmup`` rounds (3; the first traces the step) are dropped, and the median of the
``--rounds`` timed rounds (15) is reported as ms/step and steps/s per (tree, mode), with
after/before = (after steps/s) / (before steps/s) per mode; the median of the per-round
ratios is printed and kept next to it. The loss after the last step of each (tree, mode)
is printed too: with the same seeds and data both trees should compute the same numbers.
Machine noise (CPU used outside the benchmark's own
processes, time stolen by the hypervisor, in cores; ``bench_train.CpuMonitor``) is measured
over the timed rounds and per round.

Output: progress on stderr; on stdout a markdown table (mode | before ms/step | after
ms/step | before steps/s | after steps/s | after/before) and the machine noise; a JSON
record in ``--out`` (default ``benchmarks/results/host_sync_<cpu-slug>.json``, the slug made
from /proc/cpuinfo's model name and the core count as in ``bench_nifti.py``) with the
machine, the settings, the trees, every round's time per tree and mode, the medians, the
ratios and the noise. Failures: a tree whose worker cannot start (e.g. a tree being
edited that does not import) stops the run before any round, with exit code 2 and no
JSON; a mode that fails during the rounds is reported, the other slots go on, and the
record goes to ``<out>.partial.json`` (exit code 1), never over a complete one.
"""

import argparse
import hashlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)

# Nothing from wrn3d_tl, TensorFlow or the other benchmarks is imported at module level: a
# worker (this script run with --worker) must import wrn3d_tl from ITS tree only, and
# bench_train / bench_nifti put this repo first on sys.path when imported.

MODES = ("explicit", "data")
TREES = ("before", "after")
DEFAULT_BEFORE = "a8c8916"
WORKLOAD = {"network": "WRN-10-2 3D", "depth": 10, "widen_factor": 2, "num_classes": 10,
            "input_shape": [4, 16, 16, 3], "batch": 16, "precision": "fp32", "lr": 0.01, "tf_seed": 0,
            "data_mode_samples": 256}


def log(msg):
    print(f"[bench_host_sync {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _error_text(exc):
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:400] + ("..." if len(text) > 400 else "")


# ------------------------------------------------------------------------------- worker
def worker_main(tree):
    """A worker: import wrn3d_tl (from ``tree``, via PYTHONPATH), build one trainer per
    mode, then answer JSON-line commands on stdin: {"cmd": mode, "repeat": n} runs n steps
    of that mode back to back and answers {"ok": true, "value": [mean seconds, metrics of
    the last step]}; "state" answers each trainer's step count and last metrics; "quit"."""
    # The protocol owns the real stdout; anything else printed to fd 1 (TensorFlow,
    # TensorLayer) goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(**msg):
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    last = {}
    try:
        import numpy as np
        import tensorflow as tf

        import wrn3d_tl
        from wrn3d_tl.data import make_dataset
        from wrn3d_tl.model import WRNConfig, build_wrn
        from wrn3d_tl.train import Trainer

        where = os.path.realpath(wrn3d_tl.__file__)
        if not where.startswith(os.path.realpath(tree) + os.sep):
            raise ImportError(f"wrn3d_tl was imported from {where}, not from the tree {tree} "
                              "(PYTHONPATH did not take precedence)")
        w = WORKLOAD
        cfg = WRNConfig(depth=w["depth"], widen_factor=w["widen_factor"], num_classes=w["num_classes"],
                        input_shape=tuple(w["input_shape"]))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((w["batch"],) + cfg.input_shape, dtype=np.float32)
        y = rng.integers(0, w["num_classes"], w["batch"], dtype=np.int64)
        n = w["data_mode_samples"]
        x_train = rng.standard_normal((n,) + cfg.input_shape, dtype=np.float32)
        y_train = rng.integers(0, w["num_classes"], n, dtype=np.int64)

        tf.random.set_seed(w["tf_seed"])
        explicit = Trainer(build_wrn(cfg), lr=w["lr"], verbose=False)
        tf.random.set_seed(w["tf_seed"])
        data = Trainer(build_wrn(cfg), lr=w["lr"], verbose=False,
                       train_data=make_dataset(x_train, y_train, batch_size=w["batch"], volume_depth=None,
                                               training=False, repeat=True, drop_remainder=True))
        ops = {"explicit": lambda: explicit.train_step(x, y), "data": lambda: data.train_step()}
        trainers = {"explicit": explicit, "data": data}
        send(ok=True, value={"wrn3d_tl_file": where, "tensorflow": tf.__version__, "pid": os.getpid()})
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        send(ok=False, error=_error_text(exc))
        return 1

    for line in sys.stdin:
        command = json.loads(line)
        cmd = command["cmd"]
        if cmd == "quit":
            return 0
        try:
            if cmd == "state":
                send(ok=True, value={m: {"step": t.step, "last": last.get(m)} for m, t in trainers.items()})
                continue
            op = ops[cmd]
            t0 = time.perf_counter()
            for _ in range(command["repeat"]):
                metrics = op()
            elapsed = (time.perf_counter() - t0) / command["repeat"]
            last[cmd] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            send(ok=True, value=[elapsed, last[cmd]])
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            send(ok=False, error=_error_text(exc))
    return 0


# ------------------------------------------------------------------------- source trees
def _git(*args, cwd=_REPO):
    # rstrip only: `git status --porcelain` lines start with a significant space
    return subprocess.run(["git", "-C", cwd, *args], check=True, capture_output=True, text=True).stdout.rstrip("\n")


def source_hash(tree):
    """sha1 over the paths and contents of every ``wrn3d_tl/**/*.py`` of a tree."""
    h = hashlib.sha1()
    pkg = os.path.join(tree, "wrn3d_tl")
    for folder, dirs, files in sorted(os.walk(pkg)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, tree).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def resolve_tree(spec):
    """A directory holding wrn3d_tl, or a git revision of this repo extracted (once, reused)
    with ``git archive``; returns the facts recorded in the JSON, "path" among them."""
    if os.path.isdir(spec):
        path = os.path.realpath(spec)
        if not os.path.isfile(os.path.join(path, "wrn3d_tl", "__init__.py")):
            sys.exit(f"{spec}: no wrn3d_tl package in this directory")
        info = {"spec": spec, "path": path, "source": "directory"}
        try:
            info["git_commit"] = _git("rev-parse", "HEAD", cwd=path)
            status = _git("status", "--porcelain", "--", "wrn3d_tl", cwd=path)
            info["uncommitted_files"] = [line[3:] for line in status.splitlines()]
            if info["uncommitted_files"]:
                info["git_diff_sha1"] = hashlib.sha1(
                    _git("diff", "HEAD", "--", "wrn3d_tl", cwd=path).encode()).hexdigest()
        except (subprocess.CalledProcessError, OSError):
            pass  # not a git checkout: the source hash still identifies it
        info["wrn3d_tl_sha1"] = source_hash(path)
        return info
    try:
        sha = _git("rev-parse", "--verify", "--quiet", spec + "^{commit}")
    except subprocess.CalledProcessError:
        sys.exit(f"{spec!r} is neither a directory nor a git revision of {_REPO}")
    path = os.path.join(tempfile.gettempdir(), f"wrn3d-src-{sha[:12]}")
    if not os.path.isfile(os.path.join(path, "wrn3d_tl", "__init__.py")):
        log(f"extracting {spec} ({sha[:12]}) with git archive into {path}")
        partial = tempfile.mkdtemp(prefix=f"wrn3d-src-{sha[:12]}.partial-", dir=os.path.dirname(path))
        try:
            archive = subprocess.Popen(["git", "-C", _REPO, "archive", sha], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", partial], stdin=archive.stdout, check=True)
            archive.stdout.close()
            if archive.wait():
                raise RuntimeError(f"git archive {sha} failed (exit {archive.returncode})")
            for folder, _, files in os.walk(partial):  # read-only files; folders stay writable for __pycache__
                for name in files:
                    p = os.path.join(folder, name)
                    os.chmod(p, os.stat(p).st_mode & ~0o222)
            os.rename(partial, path)  # atomic: a half-extracted tree is never reused
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return {"spec": spec, "path": path, "source": "git archive", "git_commit": sha,
            "wrn3d_tl_sha1": source_hash(path)}


# ---------------------------------------------------------------------- parent side
class TreeWorker:
    """Parent-side handle of one worker process. After a failure of the process (start-up,
    crash, timeout) ``error`` holds the reason and every further call returns None; a
    failed command only fails that call (its mode's ``errors`` entry is set)."""

    def __init__(self, name, tree):
        self.name, self.tree = name, tree
        env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", tree], cwd=tree,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        self._buf = b""
        self.error = None
        self.errors = {}
        self.info = None

    def _readline(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _reply(self, timeout, what):
        try:
            msg = self._readline(timeout)
        except (EOFError, OSError, ValueError):
            self.proc.wait(5)
            self.error = f"worker died (exit code {self.proc.returncode}) during {what}"
            return None, None
        if msg is None:
            self.stop()
            self.error = f"timeout: {what} took > {timeout:.0f} s"
            return None, None
        return (msg["value"], None) if msg["ok"] else (None, msg["error"])

    def wait_ready(self, timeout=900):
        self.info, err = self._reply(timeout, "start-up")
        if err:
            self.error = err
        return self.error is None

    def call(self, cmd, repeat=1, timeout=60):
        if self.error:
            return None
        try:
            self.proc.stdin.write((json.dumps({"cmd": cmd, "repeat": repeat}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            self.proc.wait(5)
            self.error = f"worker died (exit code {self.proc.returncode}) before {cmd}"
            return None
        value, err = self._reply(timeout, cmd)
        if err:
            self.errors[cmd] = err
        return value

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # this worker only, by its own pid
                self.proc.wait(5)


def run_rounds(workers, warmup, rounds, burst, monitor, step_timeout):
    """Round-robin over the (tree, mode) slots; returns ({tree: {mode: [s/step per round]}},
    per-round noise of the timed rounds, noise over all the timed rounds)."""
    groups = [[(tree, mode) for tree in TREES] for mode in MODES]
    times = {tree: {mode: [] for mode in MODES} for tree in TREES}
    per_round = []
    total = warmup + rounds
    timed_start = None
    for r in range(total):
        if r == warmup:
            timed_start = monitor.read()
        round_start = monitor.read()
        k = r % len(groups)
        for tree, mode in (s for g in groups[k:] + groups[:k] for s in (g[::-1] if r % 2 else g)):
            w = workers[tree]
            if w.error or mode in w.errors:
                continue
            out = w.call(mode, burst, 900 if r == 0 else step_timeout * burst)
            if out is None:
                log(f"round {r + 1}/{total} {tree:<6} {mode:<8} FAILED: {w.error or w.errors.get(mode)}")
                continue
            times[tree][mode].append(out[0])
            log(f"round {r + 1}/{total} ({'warm-up' if r < warmup else 'timed'}) {tree:<6} {mode:<8} "
                f"{out[0] * 1e3:8.2f} ms/step  (loss {out[1].get('loss', float('nan')):.4f})")
        if r >= warmup:
            per_round.append(monitor.load(round_start, monitor.read()))
    noise = monitor.load(timed_start, monitor.read()) if timed_start else None
    return times, per_round, noise


def summarise(times, warmup):
    """Per mode: each tree's median over its timed rounds, and the after/before ratios."""
    results = {}
    for mode in MODES:
        row = {}
        for tree in TREES:
            seconds = times[tree][mode]
            timed = seconds[warmup:]
            row[tree] = None if not timed else {
                "median_ms": statistics.median(timed) * 1e3, "steps_per_s": 1 / statistics.median(timed),
                "min_ms": min(timed) * 1e3, "max_ms": max(timed) * 1e3, "timed_rounds": len(timed),
                "warmup_s": [round(t, 6) for t in seconds[:warmup]], "timed_s": [round(t, 6) for t in timed]}
        b, a = row["before"], row["after"]
        row["after_over_before"] = a and b and a["steps_per_s"] / b["steps_per_s"]
        # Same round = adjacent in time: the per-round ratio is least sensitive to drifting load.
        paired = a and b and len(a["timed_s"]) == len(b["timed_s"]) and [
            tb / ta for ta, tb in zip(a["timed_s"], b["timed_s"])]
        row["after_over_before_paired_median"] = statistics.median(paired) if paired else None
        results[mode] = row
    return results


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def report(results, trees, noise, per_round, cores, final):
    print("\n| mode | before ms/step | after ms/step | before steps/s | after steps/s | after/before |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        row = results[mode]
        b, a = row["before"] or {}, row["after"] or {}
        ratio = row["after_over_before"]
        print(f"| {mode} | {_fmt(b.get('median_ms'), '.2f')} | {_fmt(a.get('median_ms'), '.2f')} "
              f"| {_fmt(b.get('steps_per_s'), '.1f')} | {_fmt(a.get('steps_per_s'), '.1f')} "
              f"| {_fmt(ratio, '.3f')}{'x' if ratio else ''} |")
    print()
    for name in TREES:
        t = trees[name]
        rev = t["git_commit"][:12] if "git_commit" in t else "none (not a git checkout)"
        dirty = f", {len(t['uncommitted_files'])} uncommitted file(s) under wrn3d_tl/" if t.get(
            "uncommitted_files") else ""
        print(f"- {name}: {t['path']} ({t['source']}, commit {rev}{dirty}; wrn3d_tl sources "
              f"sha1 {t['wrn3d_tl_sha1'][:12]})")
    for mode in MODES:
        p = results[mode]["after_over_before_paired_median"]
        if p:
            print(f"- {mode}: median of the per-round after/before ratios {p:.3f}x")
    for mode in MODES:  # same seeds, same data: both trees should compute the same losses
        last = [((final.get(t) or {}).get(mode) or {}).get("last") or {} for t in TREES]
        if all("loss" in m for m in last) and last[0].get("step") == last[1].get("step"):
            print(f"- {mode}: loss after step {last[0]['step']}: before {last[0]['loss']:.6g}, "
                  f"after {last[1]['loss']:.6g}")
    if trees["before"]["wrn3d_tl_sha1"] == trees["after"]["wrn3d_tl_sha1"]:
        print("- NOTE: both trees hold the same wrn3d_tl sources: this run measures the benchmark's own spread")
    if noise:
        worst = max((n["external"] + n["steal"] for n in per_round), default=0)
        print(f"- machine noise over the timed rounds (cores of {cores}): {noise['external']:.2f} used outside the "
              f"benchmark, {noise['steal']:.2f} stolen by the hypervisor; worst round {worst:.2f}")
        if noise["external"] + noise["steal"] > 0.2:
            print(f"WARNING: other processes used more than 0.2 of the {cores} cores during the timed rounds; "
                  "the step times are inflated and the ratios less reliable. Rerun on a quiet machine.")


def machine():
    from bench_nifti import machine
    return machine(("tensorflow", "tensorlayer", "numpy"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of this repo or directory holding "
                   f"wrn3d_tl: the tree before the change (default {DEFAULT_BEFORE})")
    p.add_argument("--after", default=_REPO, help="directory holding wrn3d_tl or git revision: the tree after "
                   f"the change (default {_REPO}, its working tree)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds, dropped (default 3; 2 with --quick)")
    p.add_argument("--burst", type=int, default=8, help="steps back to back per slot and round (default 8)")
    p.add_argument("--step-timeout", type=float, default=30.0, help="seconds one step (after the first round) may "
                   "take before its worker is stopped (default 30)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 warm-up + 3 timed rounds")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/host_sync_<cpu-slug>.json)")
    p.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 15
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.rounds < 1 or args.warmup < 1 or args.burst < 1:
        p.error("--rounds, --warmup and --burst must be >= 1 (the first round traces the step)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)
    from bench_nifti import cpu_slug
    from bench_train import CpuMonitor

    start = time.perf_counter()
    env = machine()
    out = args.out or os.path.join(_HERE, "results", f"host_sync_{cpu_slug(env['cpu'], env['cores'])}.json")
    trees = {"before": resolve_tree(args.before), "after": resolve_tree(args.after)}
    for name in TREES:
        log(f"{name}: {trees[name]}")
    log(f"{env}; {args.warmup} warm-up + {args.rounds} timed rounds of {args.burst} steps per (tree, mode)")

    workers = {name: TreeWorker(name, trees[name]["path"]) for name in TREES}
    try:
        for name, w in workers.items():
            if w.wait_ready():
                trees[name].update(w.info)
                log(f"{name} worker ready: wrn3d_tl from {w.info['wrn3d_tl_file']}")
            else:
                log(f"{name} worker could not start: {w.error}")
        failed = {name: w.error for name, w in workers.items() if w.error}
        if failed:  # no ratio to measure: stop before the rounds, write no JSON
            for name, err in failed.items():
                print(f"ERROR: the {name} tree ({trees[name]['path']}) could not start a worker: {err}\n"
                      "(traceback above, on stderr; a tree being edited may import again in a few minutes)")
            return 2
        monitor = CpuMonitor(w.proc.pid for w in workers.values())
        times, per_round, noise = run_rounds(workers, args.warmup, args.rounds, args.burst, monitor,
                                             args.step_timeout)
        final = {name: w.call("state", timeout=30) for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.stop()

    errors = {name: {**({"worker": w.error} if w.error else {}), **w.errors}
              for name, w in workers.items() if w.error or w.errors}
    for name, e in errors.items():
        log(f"{name}: ERROR {e}")
    results = summarise(times, args.warmup)
    report(results, trees, noise, per_round, env["cores"], final)
    record = {
        "kind": "host_sync", "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:],
        "machine": env,
        "settings": {"warmup": args.warmup, "rounds": args.rounds, "burst": args.burst, "quick": args.quick,
                     "step_timeout_s": args.step_timeout, "workload": WORKLOAD, "modes": {
                         "explicit": "trainer.train_step(x, y), fixed numpy batch",
                         "data": "trainer.train_step() from make_dataset(..., training=False, repeat=True, "
                                 "drop_remainder=True, volume_depth=None)"},
                     "order": "per round: (before, after) of explicit, then of data; modes rotate every round, "
                              "trees reverse every other round"},
        "trees": trees,
        "same_sources": trees["before"]["wrn3d_tl_sha1"] == trees["after"]["wrn3d_tl_sha1"],
        "round_s": {tree: {mode: [round(t, 6) for t in times[tree][mode]] for mode in MODES} for tree in TREES},
        "results": results,
        "ratios": {mode: results[mode]["after_over_before"] for mode in MODES},
        "noise": {"timed": noise, "per_round": per_round, "unit": "cores (1.0 = one core busy)"},
        "final_state": final, "errors": errors or None,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    if errors:  # a partial record never replaces a complete one
        root, ext = os.path.splitext(out)
        out = root + ".partial" + (ext or ".json")
        for name, e in errors.items():
            print(f"ERROR: {name} tree: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"\nJSON: {out}\nTotal runtime: {record['elapsed_s']:.0f} s")
    return 1 if errors or any(r is None for r in record["ratios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
