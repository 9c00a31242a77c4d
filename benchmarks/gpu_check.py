#!/usr/bin/env python
"""Whether the GPU path works on this machine, and how fast: ``make gpu-check``.

    python benchmarks/gpu_check.py                      # every stage, < 8 min on one GPU, no network
    python benchmarks/gpu_check.py --stages tests,main  # a subset: devices always, then tests, main, bench

1. devices: TensorFlow's view of the GPUs (model, memory, compute capability) and the
   CUDA/cuDNN versions it was built with. No GPU visible: ONE line on stderr, exit status 1.
2. tests: ``pytest -m gpu tests/test_gpu.py`` (GPU against CPU in fp32, a training step,
   fp16 with loss scaling, bf16 convolutions, MirroredStrategy over every GPU, export).
3. main: ``examples/cifar_wide_resnet_tl.py --iters 10`` in fp32, bf16 and fp16; volumes/s
   after the first (compiling) step.
4. bench: ``benchmarks/bench_train.py`` on its three configs at GPU batches (the largest of
   256/128/64 whose estimated memory fits the GPU for every worker at once), 2 warm-up and
   5 timed rounds, without the PyTorch rows (its worker computes on the CPU) and the Keras
   bf16 row; achieved TFLOP/s against the fp32/bf16 matmul peak of the same run, and the
   XLA row (``jit_compile=True``) against the default.
5. everything to ``benchmarks/results/gpu-check_<gpu model>.json`` and ``.md``.

Exit status 0 when every stage ran and passed, else 1 (the last line says which failed).
"""

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

import wrn3d_tl  # noqa: F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
for _p in (ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PROG = "gpu-check"
STAGES = ("tests", "main", "bench")
PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
GPU_BATCHES = (256, 128, 64)
BENCH_WORKERS = 4  # wrn3d_tl fp32, bf16, fp32+XLA and Keras fp32: alive together on the GPU
# Fewer rounds than on CPU, one step each (bursts amortise a CPU worker's wake-up; a GPU
# step at these batches is long enough): the three configs fit the 8-minute budget.
BENCH_ROUNDS = ("--warmup", "2", "--steps", "5", "--burst", "1")
TIMEOUTS = {"tests": 300, "main": 240, "bench": 420}  # seconds per subprocess


# ------------------------------------------------------------------ pure helpers (tested on CPU)
def gpu_slug(report):
    """The results' file-name part for a ``gpu_report()``: the first GPU's model, lower case
    with dashes, ``-xN`` for N GPUs (``nvidia-a100-sxm4-40gb-x2``)."""
    gpus = report["gpus"]
    if not gpus:
        raise ValueError("report: holds no GPU")
    slug = re.sub(r"[^a-z0-9]+", "-", gpus[0]["name"].lower()).strip("-")
    return slug + (f"-x{len(gpus)}" if len(gpus) > 1 else "")


def parse_main_job(text):
    """The main job's output -> ``{"steps", "first_step_vol_per_s", "vol_per_s_after_first",
    "data", "test_accuracy"}`` (the median volumes/s of every step after the first; None for
    what the output lacks)."""
    rates = [(int(m.group(1)), float(m.group(2)))
             for m in re.finditer(r"^iter\s+(\d+)/\d+ .*?([\d.]+) vol/s$", text, re.M)]
    later = [r for step, r in rates if step > 1]
    data = re.search(r"^WRN-\S+ \dD, input \(.*?\), (\w+), batch (\d+)", text, re.M)
    acc = re.search(r"^test\s+loss \S+\s+accuracy ([\d.]+)", text, re.M)
    return {"steps": len(rates), "first_step_vol_per_s": rates[0][1] if rates and rates[0][0] == 1 else None,
            "vol_per_s_after_first": statistics.median(later) if later else None,
            "data": data.group(1) if data else None, "batch": int(data.group(2)) if data else None,
            "test_accuracy": float(acc.group(1)) if acc else None}


def parse_junit(path):
    """A pytest ``--junitxml`` file -> ``{"passed", "failed", "skipped", "tests": [{"name",
    "outcome", "message"}]}`` (an error counts as failed)."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = name, " ".join((node.get("message") or "").split())[:300]
                break
        tests.append({"name": case.get("name"), "outcome": outcome, "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    return {**counts, "tests": tests}


def choose_batch(config, memory_bytes, workers=BENCH_WORKERS, candidates=GPU_BATCHES, share=None):
    """The largest of ``candidates`` whose fp32 training estimate fits ``share`` of the GPU's
    ``memory_bytes`` ``workers`` times over (benchmark workers hold their memory together);
    None when none fits."""
    from wrn3d_tl.experiment import GPU_MEMORY_SHARE
    from wrn3d_tl.memory import estimate_memory

    share = GPU_MEMORY_SHARE if share is None else share
    for b in sorted(candidates, reverse=True):
        if estimate_memory(config, b)["total"] * workers <= share * memory_bytes:
            return b
    return None


def bench_summary(records):
    """bench_train.py JSON records (one run or several) -> ``{"rows": [...], "xla": {config:
    XLA train samples/s / default}, "peaks": {config: {"fp32", "bf16"} GFLOP/s}}``. A row:
    config, label, impl, precision, batch, train/infer samples/s, train TFLOP/s and its
    fraction of the same run's matmul peak in that precision."""
    peaks, rows, xla = {}, [], {}
    runs = {}
    for r in records:
        if r["kind"] == "matmul_peak":
            p = runs.setdefault(r["run"], {})
            for k, v in r["gflops"].items():
                p[k] = max(p.get(k, 0.0), v)
    for r in records:
        if r["kind"] != "step":
            continue
        peak = runs.get(r["run"], {}).get(r["precision"])
        peaks[r["config"]] = runs.get(r["run"], {})
        tr, inf = r.get("train"), r.get("infer")
        tflops = r["train_gflops"] / 1e3 if r.get("train_gflops") else None
        rows.append({"config": r["config"], "label": r["label"], "impl": r["impl"], "precision": r["precision"],
                     "batch": r["batch"], "train_samples_per_s": tr and tr["samples_per_s"],
                     "infer_samples_per_s": inf and inf["samples_per_s"], "train_tflops": tflops,
                     "peak_tflops": peak / 1e3 if peak else None,
                     "of_peak": tflops / (peak / 1e3) if tflops and peak else None, "error": r.get("error")})
    for config in dict.fromkeys(row["config"] for row in rows):
        sps = {(row["impl"], row["precision"]): row["train_samples_per_s"] for row in rows if row["config"] == config}
        default, jit = sps.get(("wrn3d_tl", "fp32")), sps.get(("wrn3d_tl+xla", "fp32"))
        if default and jit:
            xla[config] = jit / default
    return {"rows": rows, "xla": xla, "peaks": peaks}


def xla_verdict(xla):
    """One sentence on XLA from ``bench_summary``'s ratios."""
    if not xla:
        return "XLA: not measured."
    ratios = ", ".join(f"{c} {r:.2f}x" for c, r in xla.items())
    if all(r > 1.05 for r in xla.values()):
        return (f"XLA (jit_compile=True) fp32 train throughput over the default: {ratios}. It wins on every config "
                "here; Trainer(jit_compile=...) stays off by default until that holds on more GPUs.")
    return (f"XLA (jit_compile=True) fp32 train throughput over the default: {ratios}. It does not win on every "
            "config: keep the default (off).")


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def render_markdown(results):
    """The human summary of a check's ``results`` (what ``run`` collects)."""
    dev = results["devices"]
    verdict = "all passed" if results["ok"] else "FAILED: " + ", ".join(results["failed"])
    out = [f"# gpu-check: {gpu_slug(dev)}", "",
           (f"{results['date']}, TensorFlow {results['tensorflow']} (CUDA {dev['cuda']}, cuDNN {dev['cudnn']}), "
            f"{results['elapsed_s']:.0f} s, {verdict}."),
           "", "| device | GPU | compute capability | memory GiB |", "|---|---|---|---:|"]
    out += [f"| {g['device']} | {g['name']} | {g['compute_capability']} | {g['memory_bytes'] / 2 ** 30:.1f} |"
            for g in dev["gpus"]]
    tests = results.get("tests")
    if tests:
        out += ["", f"## GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped", ""]
        out += [f"- {t['outcome']}: {t['name']}" + (f" ({t['message']})" if t["message"] else "")
                for t in tests["tests"]]
    main = results.get("main_job")
    if main:
        out += ["", "## Main job (`examples/cifar_wide_resnet_tl.py --iters 10`)", "",
                "| precision | exit | data | batch | first step vol/s | vol/s after the first | test accuracy |",
                "|---|---:|---|---:|---:|---:|---:|"]
        out += [f"| {p} | {m['exit_code']} | {m['data'] or '—'} | {_fmt(m['batch'], 'd')} "
                f"| {_fmt(m['first_step_vol_per_s'], '.1f')} | {_fmt(m['vol_per_s_after_first'], '.1f')} "
                f"| {_fmt(m['test_accuracy'], '.4f')} |" for p, m in main.items()]
    bench = results.get("bench")
    if bench:
        s = bench["summary"]
        out += ["", "## bench_train.py at GPU batches", "",
                ("| config | implementation | precision | train samples/s | inference samples/s | train TFLOP/s "
                 "| matmul peak TFLOP/s (same run, same precision) | of peak |"),
                "|---|---|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['label']} | {r['impl']} | {r['precision']} | {_fmt(r['train_samples_per_s'], '.1f')} "
                f"| {_fmt(r['infer_samples_per_s'], '.1f')} | {_fmt(r['train_tflops'], '.2f')} "
                f"| {_fmt(r['peak_tflops'], '.1f')} | {_fmt(r['of_peak'] and r['of_peak'] * 100, '.0f')}% |"
                for r in s["rows"]]
        out += ["", xla_verdict(s["xla"])]
        failed = {k: v["exit_code"] for k, v in bench["runs"].items() if v["exit_code"] != 0}
        if failed:
            out += ["", f"bench runs that failed (exit codes): {failed}"]
    return "\n".join(out) + "\n"


def write_results(results, out_dir):
    """Write ``results`` to ``out_dir/gpu-check_<gpu>.json`` and ``.md``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"gpu-check_{gpu_slug(results['devices'])}")
    text = render_markdown(results)
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(text)
    return base + ".json", base + ".md"


# ------------------------------------------------------------------------------ the stages
def log(msg):
    print(f"[{PROG} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(argv, timeout):
    """Run ``argv`` from the repository root in a process group of its own, echoing its
    output; ``(exit code, output)``. On a timeout the group (benchmark workers included) is
    killed and the exit code is None."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
        log(f"timeout after {timeout} s: {' '.join(argv)}")
    reader.join(10)
    return code, "".join(lines)


def main_job_argv(precision_flag):
    """The main job's command line (after the interpreter) for one ``--mixed-precision``."""
    return ["examples/cifar_wide_resnet_tl.py", "--iters", "10", "--mixed-precision", precision_flag]


def bench_argv(key, batch, json_out):
    """bench_train.py's command line (after the interpreter) for one config at ``batch``."""
    return ["benchmarks/bench_train.py", "--configs", key, "--batch", str(batch), "--no-torch", "--no-bf16-rivals",
            *BENCH_ROUNDS, "--json-out", json_out]


def stage_tests(tmp):
    xml = os.path.join(tmp, "gpu-tests.xml")
    code, _ = _run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/test_gpu.py", f"--junitxml={xml}"],
                   TIMEOUTS["tests"])
    result = parse_junit(xml) if os.path.exists(xml) else {"passed": 0, "failed": 0, "skipped": 0, "tests": []}
    return {**result, "exit_code": code}


def stage_main():
    out = {}
    for name, flag in PRECISIONS.items():
        log(f"main job, {name}")
        code, text = _run([sys.executable, *main_job_argv(flag)], TIMEOUTS["main"])
        out[name] = {**parse_main_job(text), "exit_code": code}
    return out


def stage_bench(tmp, memory_bytes):
    import bench_train

    runs, records = {}, []
    for key, case in bench_train.CASES.items():
        batch = choose_batch(case.config(), memory_bytes) or case.batch
        path = os.path.join(tmp, f"bench-{key}.jsonl")
        log(f"bench_train.py {key} at batch {batch}")
        code, _ = _run([sys.executable, *bench_argv(key, batch, path)], TIMEOUTS["bench"])
        run = []
        if os.path.exists(path):
            with open(path) as f:
                run = [json.loads(line) for line in f]
        runs[key] = {"batch": batch, "exit_code": code, "records": run}
        records += run
    summary = bench_summary(records)
    return {"runs": runs, "summary": summary}


def print_bench(summary):
    print("\n| config | impl | precision | train samples/s | train TFLOP/s | matmul peak TFLOP/s | of peak |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in summary["rows"]:
        print(f"| {r['label']} | {r['impl']} | {r['precision']} | {_fmt(r['train_samples_per_s'], '.1f')} "
              f"| {_fmt(r['train_tflops'], '.2f')} | {_fmt(r['peak_tflops'], '.1f')} "
              f"| {_fmt(r['of_peak'] and r['of_peak'] * 100, '.0f')}% |")
    print(xla_verdict(summary["xla"]), flush=True)


def failures(results):
    """The names of the stages that did not pass."""
    bad = []
    t = results.get("tests")
    if t is not None and (t["exit_code"] != 0 or t["failed"] or not t["passed"]):
        bad.append("tests")
    bad += [f"main job {p}" for p, m in (results.get("main_job") or {}).items()
            if m["exit_code"] != 0 or m["vol_per_s_after_first"] is None]
    bad += [f"bench {k}" for k, r in ((results.get("bench") or {}).get("runs") or {}).items() if r["exit_code"] != 0]
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--out-dir", default=os.path.join(_HERE, "results"), help="where the JSON and markdown go")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(stages) - set(STAGES):
        p.error(f"--stages {args.stages}: choose from {','.join(STAGES)}")
    # Several TensorFlow processes share the GPU (this one, pytest, the main job, benchmark
    # workers): without growth the first would map nearly all of its memory.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from wrn3d_tl.commands import quiet_tensorflow

    tf = quiet_tensorflow()
    if not tf.config.list_physical_devices("GPU"):
        build = tf.sysconfig.get_build_info()
        kind = f"a CUDA {build.get('cuda_version')} build" if build.get("is_cuda_build") else "a CPU-only build"
        print(f"{PROG}: error: no GPU visible to TensorFlow {tf.__version__} ({kind}), nothing to check; on a machine "
              'with an NVIDIA GPU and driver: pip install -e ".[gpu]", then make gpu-check', file=sys.stderr,
              flush=True)
        return 1
    from wrn3d_tl.devices import gpu_report

    start = time.perf_counter()
    report = gpu_report()
    log(f"TensorFlow {tf.__version__}, CUDA {report['cuda']}, cuDNN {report['cudnn']}; "
        f"{len(report['gpus'])} GPU(s):")
    for g in report["gpus"]:
        log(f"  {g['device']}: {g['name']}, compute capability {g['compute_capability']}, "
            f"{g['memory_bytes'] / 2 ** 30:.1f} GiB for TensorFlow")
    results = {"format": "wrn3d_tl-gpu-check", "version": 1, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "host": platform.node(), "python": platform.python_version(), "tensorflow": tf.__version__,
               "devices": report}
    with tempfile.TemporaryDirectory() as tmp:
        if "tests" in stages:
            log("tests: pytest -m gpu tests/test_gpu.py")
            results["tests"] = stage_tests(tmp)
        if "main" in stages:
            results["main_job"] = stage_main()
            for name, m in results["main_job"].items():
                log(f"main job {name}: {_fmt(m['vol_per_s_after_first'], '.1f')} volumes/s after the first step "
                    f"(batch {m['batch']}, exit {m['exit_code']})")
        if "bench" in stages:
            results["bench"] = stage_bench(tmp, min(g["memory_bytes"] for g in report["gpus"]))
            print_bench(results["bench"]["summary"])
    results["failed"] = failures(results)
    results["ok"] = not results["failed"]
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    paths = write_results(results, args.out_dir)
    log(f"wrote {paths[0]} and {paths[1]} ({results['elapsed_s']:.0f} s)")
    log("all passed" if results["ok"] else f"FAILED: {', '.join(results['failed'])}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
