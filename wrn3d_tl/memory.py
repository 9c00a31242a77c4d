"""How much memory training a WRN takes: ``estimate_memory`` and ``largest_batch``.

The estimate encodes the optimizer (SGD with one momentum buffer per weight) and the
runtime (what TensorFlow keeps for the backward pass of a compiled step), not just the
model: it lives here, beside neither.
"""

import math

from wrn3d_tl.config import check_mixed_precision
from wrn3d_tl.validate import check_int
from wrn3d_tl.model import group_shapes

__all__ = ["estimate_memory", "largest_batch", "RUNTIME_OVERHEAD_BYTES"]

# TensorFlow's own working memory for a compiled train step (graph, kernels' scratch
# space), measured on TF 2.21 / oneDNN CPU as the batch-independent part of a step's
# peak RSS growth for WRN-10..28 in 3D.
RUNTIME_OVERHEAD_BYTES = 128 * 2 ** 20


def estimate_memory(config, batch_size, *, mixed_precision=None, recompute=False):
    """Estimated bytes for training ``config`` at ``batch_size``; a dict of ints.

    Keys: ``parameters`` (float32 weights), ``optimizer`` (momentum buffers),
    ``gradients``, ``activations`` (tensors kept for the backward pass: each block's
    input, its two ReLU outputs and its first convolution's output, plus the gradient
    buffers in flight; with ``recompute`` only the blocks' inputs plus one block's
    internals), ``runtime`` (TensorFlow's working memory, ``RUNTIME_OVERHEAD_BYTES``),
    ``step_growth`` (what a train step adds on top of a built model and trainer:
    gradients + activations + runtime) and ``total``.
    """
    batch_size = check_int(batch_size, "batch_size")
    mixed_precision = check_mixed_precision(mixed_precision)
    act_bytes = 4 if mixed_precision is None else 2
    stem = math.prod(config.input_shape[:-1]) * config.stem_width
    kept, inputs, biggest_block, biggest = stem, stem, 0, stem
    for b in config.blocks():
        n_in, n_out = math.prod(b.in_spatial) * b.in_channels, math.prod(b.out_spatial) * b.out_channels
        block = 2 * n_in + 2 * n_out  # input, ReLU(BN1), conv1 output, ReLU(BN2)
        kept += block
        inputs += n_out
        biggest_block = max(biggest_block, block)
        biggest = max(biggest, n_in, n_out)
    head = 2 * n_out
    per_sample = (inputs + biggest_block if recompute else kept) + head + 2 * biggest
    params = sum(r[3] for r in group_shapes(config)) * 4
    activations = per_sample * act_bytes * batch_size
    out = {"parameters": params, "optimizer": params, "gradients": params, "activations": activations,
           "runtime": RUNTIME_OVERHEAD_BYTES}
    out["step_growth"] = out["gradients"] + activations + RUNTIME_OVERHEAD_BYTES
    out["total"] = params * 3 + activations + RUNTIME_OVERHEAD_BYTES
    return out


def largest_batch(config, budget_bytes, *, mixed_precision=None, recompute=False, multiple_of=1):
    """The largest batch (a multiple of ``multiple_of``) whose ``estimate_memory`` total fits
    ``budget_bytes``; raises ValueError when not even one batch fits."""
    fits = lambda b: estimate_memory(config, b, mixed_precision=mixed_precision,  # noqa: E731
                                     recompute=recompute)["total"] <= budget_bytes
    if not fits(multiple_of):
        need = estimate_memory(config, multiple_of, mixed_precision=mixed_precision, recompute=recompute)["total"]
        raise ValueError(f"budget_bytes: {budget_bytes} bytes cannot hold {config.name} at batch {multiple_of} "
                         f"(needs about {need})")
    lo, hi = 1, 2
    while fits(hi * multiple_of):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * multiple_of) else (lo, mid)
    return lo * multiple_of
