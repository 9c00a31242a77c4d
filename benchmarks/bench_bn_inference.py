#!/usr/bin/env python
"""Two ways around batch norm in inference, timed against the model as built.

    python benchmarks/bench_bn_inference.py --json-out bn_inference.json

For the cells where wrn3d_tl's inference is behind PyTorch (docs/performance.md), each case
runs one batch through a WRN in eval mode, in a ``tf.function`` as ``Predictor`` runs it
(bf16: on ``inference_copy``), in three forms:

    as built     the library's model: FusedBatchNormV3 with the moving statistics, then ReLU
    bn2 folded   each block's second batch norm replaced by a bias and ReLU: what folding
                 that batch norm into the convolution before it would leave (its upper bound;
                 the bias is beta, so the outputs differ)
    multiply-add every batch norm as x * scale + offset (Keras' way), then ReLU; the same
                 outputs to round-off

Rounds alternate the forms (``--rounds`` rounds of ``--calls`` calls each); the median
round is reported, in ms per batch. Output: a line per case and the JSON record.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import wrn3d_tl  # noqa: E402,F401  (before TensorFlow: oneDNN on where TensorFlow leaves it off)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import machine_record  # noqa: E402

# (network, input shape, batch, precision): bench_train's WRN-10-2 and WRN-40-4 2D cells
CASES = (("WRN-10-2", (4, 16, 16, 3), 16, "fp32"), ("WRN-10-2", (4, 16, 16, 3), 16, "bf16"),
         ("WRN-40-4", (32, 32, 3), 64, "fp32"))
FORMS = ("as built", "bn2 folded", "multiply-add")


def _forms(net, dtype):
    """{form: tf.function(x) -> logits} on ``net``, the replacements patched in only while
    each form is traced."""
    import tensorflow as tf
    from wrn3d_tl.layers import BatchNorm, WideBasicBlock, leaf_layers

    def bias_relu(bn):
        return lambda x: tf.nn.relu(tf.nn.bias_add(x, tf.cast(bn.beta, x.dtype)))

    def multiply_add(bn):
        def forward(x):
            scale = bn.gamma * tf.math.rsqrt(bn.moving_var + bn.epsilon)
            y = x * tf.cast(scale, x.dtype) + tf.cast(bn.beta - bn.moving_mean * scale, x.dtype)
            return bn.act(y) if bn.act else y
        return forward

    second = [b.bn2 for b in net.all_layers if isinstance(b, WideBasicBlock)]
    every = [layer for layer in leaf_layers(net) if isinstance(layer, BatchNorm)]
    patches = {"as built": {}, "bn2 folded": {bn: bias_relu(bn) for bn in second},
               "multiply-add": {bn: multiply_add(bn) for bn in every}}

    def traced(patch):
        def call(x):
            for bn, forward in patch.items():
                bn.forward = forward
            try:
                return net(tf.cast(x, dtype), is_train=False)
            finally:
                for bn in patch:
                    del bn.forward           # back to the class's method
        return tf.function(call)
    return {form: traced(patches[form]) for form in FORMS}


def run_case(name, shape, batch, precision, rounds, calls):
    """Median ms per batch of each form, and the largest logit difference from "as built"."""
    import tensorflow as tf
    from wrn3d_tl.config import WRNConfig
    from wrn3d_tl.model import build_wrn, inference_copy

    model = build_wrn(WRNConfig.from_name(name, input_shape=shape))
    net = inference_copy(model, "bf16") if precision == "bf16" else model
    fns = _forms(net, tf.bfloat16 if precision == "bf16" else tf.float32)
    x = tf.random.stateless_normal((batch,) + shape, seed=[1, 2])
    out = {form: tf.cast(fn(x), tf.float32) for form, fn in fns.items()}
    times = {form: [] for form in FORMS}
    for _ in range(rounds):
        for form, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x).numpy()
            times[form].append((time.perf_counter() - t0) / calls * 1e3)
    return {"network": name, "input_shape": list(shape), "batch": batch, "precision": precision,
            "ms": {form: round(statistics.median(t), 2) for form, t in times.items()},
            "max_abs_logit_diff": {form: float(tf.reduce_max(tf.abs(out[form] - out["as built"])))
                                   for form in FORMS[1:]}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per case")
    p.add_argument("--calls", type=int, default=20, help="calls per form in a round")
    p.add_argument("--json-out", help="write the record to this file")
    args = p.parse_args(argv)
    record = {"benchmark": "bench_bn_inference", "machine": machine_record(), "rounds": args.rounds,
              "calls": args.calls, "cases": []}
    for case in CASES:
        result = run_case(*case, args.rounds, args.calls)
        record["cases"].append(result)
        base = result["ms"]["as built"]
        print(f"{case[0]} {'x'.join(map(str, case[1]))} b{case[2]} {case[3]}: "
              + ", ".join(f"{form} {ms:.2f} ms ({ms / base:.3f})" for form, ms in result["ms"].items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
