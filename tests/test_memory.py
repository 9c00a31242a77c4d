"""Memory: recomputed blocks give the plain gradients; estimate_memory's shape."""

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.memory import estimate_memory, largest_batch
from wrn3d_tl.model import WRNConfig, build_wrn

CFG = WRNConfig(depth=10, widen_factor=2, input_shape=(4, 16, 16, 3))


def grads_and_stats(model, x, y):
    step = tf.function(lambda x: _grads(model, x, y))
    grads = step(x)
    return [g.numpy() for g in grads], [v.numpy() for v in model.nontrainable_weights]


def _grads(model, x, y):
    with tf.GradientTape() as tape:
        logits = model(x, is_train=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    return tape.gradient(loss, model.trainable_weights)


def test_recompute_gives_the_plain_gradients_and_moves_bn_statistics_once():
    plain = build_wrn(CFG)
    recomputed = build_wrn(CFG, recompute=True)
    for a, b in zip(plain.all_weights, recomputed.all_weights):
        assert a.name.split(":")[0] == b.name.split(":")[0]
        b.assign(a)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4,) + CFG.input_shape).astype("float32")
    y = rng.integers(0, 10, 4)
    g1, s1 = grads_and_stats(plain, x, y)
    g2, s2 = grads_and_stats(recomputed, x, y)
    assert len(g1) == len(g2) == len(plain.trainable_weights)
    for a, b, w in zip(g1, g2, plain.trainable_weights):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=w.name)
    for a, b, w in zip(s1, s2, plain.nontrainable_weights):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=w.name)  # one update each, not two
    assert any(np.any(s != 0) for s in s1[::2])


def test_recompute_rejects_dropout():
    with pytest.raises(ValueError, match="recompute=True needs dropout == 0"):
        build_wrn(WRNConfig(depth=10, widen_factor=1, input_shape=(4, 16, 16, 3), dropout=0.3), recompute=True)


def test_estimate_memory_is_monotonic_in_batch_and_width():
    from wrn3d_tl.model import count_params

    one = estimate_memory(CFG, 1)
    # Weights, their momentum buffers and their gradients: one float32 per trainable scalar of
    # the network as built (counted on the model, not from the config).
    n_weights = count_params(build_wrn(CFG))
    assert one["parameters"] == one["optimizer"] == one["gradients"] == 4 * n_weights
    assert one["activations"] > 0
    prev = one
    for batch in (2, 8, 32):
        est = estimate_memory(CFG, batch)
        # Activations are per sample, so exactly linear in the batch ...
        assert est["activations"] == batch * one["activations"]
        # ... and they are the only part that depends on it.
        for key in ("parameters", "optimizer", "gradients", "runtime"):
            assert est[key] == one[key], key
        assert est["total"] - one["total"] == est["activations"] - one["activations"]
        assert est["step_growth"] - one["step_growth"] == est["activations"] - one["activations"]
        assert est["total"] > prev["total"] and est["step_growth"] > prev["step_growth"]
        # Everything that is live during a step at once fits in the total.
        assert est["total"] >= est["parameters"] + est["optimizer"] + est["gradients"] + est["activations"]
        assert est["activations"] > prev["activations"] and est["parameters"] == prev["parameters"]
        prev = est
    totals = [estimate_memory(WRNConfig(depth=16, widen_factor=k, input_shape=(8, 32, 32, 3)), 8)["total"]
              for k in (1, 2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4


def test_estimate_memory_recompute_and_bf16_need_less():
    cfg = WRNConfig(depth=28, widen_factor=2, input_shape=(8, 32, 32, 3))
    plain = estimate_memory(cfg, 16)["activations"]
    assert estimate_memory(cfg, 16, recompute=True)["activations"] < plain / 2
    assert estimate_memory(cfg, 16, mixed_precision="bf16")["activations"] == plain // 2
    # parameters in float32: WRN-28-2 in 3D
    assert estimate_memory(cfg, 1)["parameters"] == 4 * sum(w.shape.num_elements() for w in
                                                             build_wrn(cfg).trainable_weights)


def test_largest_batch_fits_the_budget():
    budget = 2 * 2 ** 30
    b = largest_batch(CFG, budget, multiple_of=2)
    assert b % 2 == 0
    assert estimate_memory(CFG, b)["total"] <= budget < estimate_memory(CFG, b + 2)["total"]
    with pytest.raises(ValueError, match="budget_bytes"):
        largest_batch(CFG, 1000)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory(CFG, 0)
