#!/usr/bin/env python
"""The kernels of a WRN train step, TensorFlow against PyTorch, outside any model.

    python benchmarks/bench_kernels.py                         # the three bench_train configs, bf16 and fp32
    python benchmarks/bench_kernels.py --configs wrn40-4-2d --precisions bf16 --json-out k.jsonl

For each config of ``bench_train.py`` (same shapes, same batch) this times the ops one
train step runs, each alone, on random data, once in TensorFlow (``tf.raw_ops`` in a
``tf.function``, NHWC/NDHWC: what ``wrn3d_tl`` runs) and once in PyTorch (``aten`` ops on
channels-last tensors of the dtype itself, no autocast: what PyTorch's eager step runs):

    conv forward       Conv2D/Conv3D                         aten.convolution
    conv grad input    Conv2DBackpropInput/Conv3DBackpropInputV2   aten.convolution_backward (input)
    conv grad filter   Conv2DBackpropFilter/Conv3DBackpropFilterV2 aten.convolution_backward (weight)
    batch norm fwd     FusedBatchNormV3 (training, 4D; 5D reshaped as wrn3d_tl does)
                                                             aten.native_batch_norm (training)
    batch norm grad    FusedBatchNormGradV3                  aten.native_batch_norm_backward
    relu fwd + grad    Relu, ReluGrad                        aten.relu, aten.threshold_backward

Every distinct shape is timed (median of ``--reps`` timings of n ops after a warm-up, n
chosen for a timing of about ``--budget-ms``; TensorFlow runs the n ops one after the other
in one function, as in a step, since a function call costs more than a small kernel) and weighted by how often the network runs it, so a row is that op kind's time
in one step. Each framework runs in its own process (their thread pools would otherwise
compete), one after the other. A ratio TF / torch above 1 is a kernel where TensorFlow
is slower; the per-shape rows (``--per-shape``) show which shapes.
Output: progress on stderr; a markdown table per config, and ``JSON {...}`` lines.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)
_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_train import CASES  # noqa: E402  (imports nothing heavy)

KINDS = ("conv forward", "conv grad input", "conv grad filter", "batch norm fwd", "batch norm grad",
         "relu fwd + grad")


def step_ops(case):
    """Counter of ((kind, shape key), times per step) for one train step of ``case``.

    Conv keys: (N, spatial..., C_in, C_out, k, stride); batch norm / relu keys: (N, spatial..., C).
    The stem convolution's input gradient is not computed in training (its input is data)."""
    config = case.config()
    n = case.batch
    ops = Counter()

    def conv(spatial, cin, cout, k, s, stem=False):
        key = (n, *spatial, cin, cout, k, s)
        ops[("conv forward", key)] += 1
        ops[("conv grad filter", key)] += 1
        if not stem:
            ops[("conv grad input", key)] += 1

    def norm(spatial, c):
        for kind in ("batch norm fwd", "batch norm grad", "relu fwd + grad"):
            ops[(kind, (n, *spatial, c))] += 1

    spatial = tuple(config.input_shape[:-1])
    conv(spatial, config.input_shape[-1], config.stem_width, 3, 1, stem=True)
    for b in config.blocks():
        norm(b.in_spatial, b.in_channels)
        conv(b.in_spatial, b.in_channels, b.out_channels, 3, b.strides[0])
        norm(b.out_spatial, b.out_channels)
        conv(b.out_spatial, b.out_channels, b.out_channels, 3, 1)
        if b.projection:
            conv(b.in_spatial, b.in_channels, b.out_channels, 1, b.strides[0])
    norm(b.out_spatial, b.out_channels)  # the head's BN-ReLU
    return ops


def _median_ms(fn, inner, reps):
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e3


# ------------------------------------------------------------------------- TensorFlow
def tf_kernels(kind, key, precision, chain):
    """A no-argument callable running ``chain`` TensorFlow ops of ``kind`` on ``key``'s shape
    in one ``tf.function``, one after the other (blocking): a function call costs far more
    than a small kernel, so a call per op would time the call, not the kernel."""
    import tensorflow as tf
    dtype = tf.bfloat16 if precision == "bf16" else tf.float32
    rng = tf.random.Generator.from_seed(0)

    def rand(shape):
        return tf.cast(rng.normal(shape), dtype)

    if kind.startswith("conv"):
        n, *spatial, cin, cout, k, s = key
        rank = len(spatial)
        x = rand([n, *spatial, cin])
        w = rand([k] * rank + [cin, cout])
        strides = [1] + [s] * rank + [1]
        fwd = tf.raw_ops.Conv3D if rank == 3 else tf.raw_ops.Conv2D
        y = fwd(input=x, filter=w, strides=strides, padding="SAME")
        dy = rand(y.shape)
        if kind == "conv forward":
            op = lambda: fwd(input=x, filter=w, strides=strides, padding="SAME")  # noqa: E731
        elif kind == "conv grad input":
            bwd = tf.raw_ops.Conv3DBackpropInputV2 if rank == 3 else tf.raw_ops.Conv2DBackpropInput
            op = lambda: bwd(input_sizes=x.shape, filter=w, out_backprop=dy, strides=strides,  # noqa: E731
                             padding="SAME")
        else:
            bwd = tf.raw_ops.Conv3DBackpropFilterV2 if rank == 3 else tf.raw_ops.Conv2DBackpropFilter
            op = lambda: bwd(input=x, filter_sizes=w.shape, out_backprop=dy, strides=strides,  # noqa: E731
                             padding="SAME")
    else:
        n, *spatial, c = key
        # wrn3d_tl's BatchNorm: NDHWC -> (N, D*H, W, C) for the fused 4D kernel
        shape4 = [n, spatial[0] * spatial[1], spatial[2], c] if len(spatial) == 3 else [n, *spatial, c]
        x = rand(shape4)
        scale, offset = tf.ones([c]), tf.zeros([c])
        empty = tf.constant([], tf.float32)
        y, mean, var, r1, r2, r3 = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=1e-5, is_training=True)
        dy = rand(shape4)
        if kind == "batch norm fwd":
            op = lambda: tf.raw_ops.FusedBatchNormV3(  # noqa: E731
                x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=1e-5, is_training=True)[0]
        elif kind == "batch norm grad":
            op = lambda: tf.raw_ops.FusedBatchNormGradV3(  # noqa: E731
                y_backprop=dy, x=x, scale=scale, reserve_space_1=r1, reserve_space_2=r2, reserve_space_3=r3,
                epsilon=1e-5, is_training=True)[0]
        else:
            op = lambda: tf.raw_ops.ReluGrad(gradients=dy, features=tf.raw_ops.Relu(features=y))  # noqa: E731

    # Identical ops on identical inputs would be merged into one (grappler): keep them all.
    tf.config.optimizer.set_experimental_options({"common_subgraph_elimination": False,
                                                  "dependency_optimization": False,
                                                  "arithmetic_optimization": False})

    @tf.function
    def chained():
        out = op()
        for _ in range(chain - 1):
            with tf.control_dependencies([out]):  # one after the other, and not merged as duplicates
                out = op()
        return out

    return lambda: _block_tf(chained())


def _block_tf(out):
    # one element to the host: waits for the op without copying its output
    import tensorflow as tf
    return tf.reshape(out, [-1])[0].numpy()


# ---------------------------------------------------------------------------- PyTorch
def torch_kernels(kind, key, precision):
    """``tf_kernels`` for PyTorch: channels-last tensors of the dtype itself, aten ops."""
    import torch
    torch.set_num_threads(os.cpu_count())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    aten = torch.ops.aten

    def rand(shape):
        return torch.randn(shape, generator=gen).to(dtype)

    if kind.startswith("conv"):
        n, *spatial, cin, cout, k, s = key
        rank = len(spatial)
        fmt = torch.channels_last_3d if rank == 3 else torch.channels_last
        x = rand([n, cin, *spatial]).contiguous(memory_format=fmt)
        w = rand([cout, cin] + [k] * rank).contiguous(memory_format=fmt)
        pad, stride = [k // 2] * rank, [s] * rank
        conv = lambda: aten.convolution(x, w, None, stride, pad, [1] * rank, False, [0] * rank, 1)  # noqa: E731
        dy = conv().contiguous(memory_format=fmt).normal_(generator=gen)
        if kind == "conv forward":
            op = conv
        else:
            mask = [kind == "conv grad input", kind == "conv grad filter", False]
            op = lambda: aten.convolution_backward(dy, x, w, None, stride, pad, [1] * rank, False,  # noqa: E731
                                                   [0] * rank, 1, mask)
    else:
        n, *spatial, c = key
        fmt = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
        x = rand([n, c, *spatial]).contiguous(memory_format=fmt)
        weight, bias = torch.ones(c), torch.zeros(c)
        rm, rv = torch.zeros(c), torch.ones(c)
        y, save_mean, save_invstd = aten.native_batch_norm(x, weight, bias, rm, rv, True, 0.1, 1e-5)
        dy = rand(list(x.shape)).contiguous(memory_format=fmt)
        if kind == "batch norm fwd":
            op = lambda: aten.native_batch_norm(x, weight, bias, rm, rv, True, 0.1, 1e-5)  # noqa: E731
        elif kind == "batch norm grad":
            op = lambda: aten.native_batch_norm_backward(dy, x, weight, rm, rv, save_mean, save_invstd,  # noqa: E731
                                                         True, 1e-5, [True, True, True])
        else:
            op = lambda: aten.threshold_backward(dy, aten.relu(y), 0)  # noqa: E731
    with torch.inference_mode():
        op()
    return op  # eager PyTorch ops block until done


# ------------------------------------------------------------------------------ driver
def run_framework(framework, keys, precisions, budget_ms, reps):
    """Worker: time every (config, precision, kind, shape); one JSON line per shape on stdout.
    A timing runs n ops, n (<= 20) chosen so that it takes about ``budget_ms``: n calls of a
    PyTorch op, or one call of a TensorFlow function running n ops."""
    for key in keys:
        case = CASES[key]
        for precision in precisions:
            for (kind, shape), count in sorted(step_ops(case).items()):
                if framework == "tf":
                    once = _median_ms(tf_kernels(kind, shape, precision, 1), 1, 3)
                    n = min(20, max(2, math.ceil(budget_ms / once)))
                    ms = _median_ms(tf_kernels(kind, shape, precision, n), 1, reps) / n
                else:
                    op = torch_kernels(kind, shape, precision)
                    n = min(20, max(2, math.ceil(budget_ms / _median_ms(op, 1, 3))))
                    ms = _median_ms(op, n, reps)
                print(json.dumps({"config": key, "precision": precision, "framework": framework, "kind": kind,
                                  "shape": shape, "count": count, "ms": round(ms, 4)}), flush=True)
                print(f"{framework} {key} {precision} {kind} {shape}: {ms:.3f} ms x{count}", file=sys.stderr,
                      flush=True)


def report(records, per_shape):
    """Markdown tables: per config and precision, the step's time per op kind, TF vs torch."""
    out = []
    groups = sorted({(r["config"], r["precision"]) for r in records})
    for config, precision in groups:
        rows = [r for r in records if r["config"] == config and r["precision"] == precision]
        total = {fw: sum(r["ms"] * r["count"] for r in rows if r["framework"] == fw) for fw in ("tf", "torch")}
        out.append(f"\n{CASES[config].label}, {precision}: the kernels of one train step, each alone (ms)\n")
        out.append("| op | TensorFlow | PyTorch | TF / torch |")
        out.append("|---|---:|---:|---:|")
        for kind in KINDS:
            t = {fw: sum(r["ms"] * r["count"] for r in rows if r["framework"] == fw and r["kind"] == kind)
                 for fw in ("tf", "torch")}
            ratio = f"{t['tf'] / t['torch']:.2f}" if t["torch"] else "-"
            out.append(f"| {kind} | {t['tf']:.1f} | {t['torch']:.1f} | {ratio} |")
        ratio = f"{total['tf'] / total['torch']:.2f}" if total["torch"] else "-"
        out.append(f"| **sum** | **{total['tf']:.1f}** | **{total['torch']:.1f}** | **{ratio}** |")
        if per_shape:
            out.append("\n| op | shape | x per step | TF ms | torch ms | TF / torch |")
            out.append("|---|---|---:|---:|---:|---:|")
            by = {}
            for r in rows:
                by.setdefault((r["kind"], tuple(r["shape"]), r["count"]), {})[r["framework"]] = r["ms"]
            for (kind, shape, count), ms in sorted(by.items()):
                tf_ms, torch_ms = ms.get("tf"), ms.get("torch")
                ratio = f"{tf_ms / torch_ms:.2f}" if tf_ms and torch_ms else "-"
                out.append(f"| {kind} | {'x'.join(map(str, shape))} | {count} | {tf_ms or 0:.3f} | "
                           f"{torch_ms or 0:.3f} | {ratio} |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated subset of bf16,fp32")
    p.add_argument("--budget-ms", type=float, default=20.0, help="about how long one timing runs (up to 20 ops)")
    p.add_argument("--reps", type=int, default=5, help="timings per shape; the median is reported")
    p.add_argument("--per-shape", action="store_true", help="also a row per distinct shape")
    p.add_argument("--json-out", help="also write every JSON record to this file (one per line)")
    p.add_argument("--worker", choices=["tf", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in args.keys if k not in CASES]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {list(CASES)}")
    args.precision_list = [q.strip() for q in args.precisions.split(",") if q.strip()]
    if not args.precision_list or set(args.precision_list) - {"bf16", "fp32"}:
        p.error(f"--precisions: choose from bf16,fp32, got {args.precisions!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    keys, precisions = args.keys, args.precision_list
    if args.worker:
        run_framework(args.worker, keys, precisions, args.budget_ms, args.reps)
        return 0
    records = []
    for framework in ("tf", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--configs", ",".join(keys),
               "--precisions", ",".join(precisions), "--budget-ms", str(args.budget_ms), "--reps", str(args.reps)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            print(f"bench_kernels: the {framework} worker failed (exit {proc.returncode})"
                  + ("; is torch installed? (pip install torch==2.13.0)" if framework == "torch" else ""),
                  file=sys.stderr)
        records += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in records:
        print("JSON " + json.dumps(r, sort_keys=True))
    print(report(records, args.per_shape))
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(json.dumps(machine_record(), sort_keys=True) + "\n")
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return 0


def machine_record():
    """The first line of a records file: which CPU (model, the flags that decide the kernels,
    the estimated fp32 limit) and whether TensorFlow's oneDNN was on (it is read per process,
    from TF_ENABLE_ONEDNN_OPTS, which ``import wrn3d_tl`` sets in the workers too)."""
    from wrn3d_tl import cpu

    return {"kind": "environment", "cpu": cpu.cpu_model(), "cpu_flags": cpu.cpu_flags(relevant_only=True),
            "fp32_limit": cpu.fp32_limit(), "cores": os.cpu_count(), "isa_caps": cpu.isa_caps(),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get(cpu.ONEDNN_VAR), "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    sys.exit(main())
