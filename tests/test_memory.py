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


# ------------------------------------------------- --batch-size auto on the job's devices

GPU0, GPU1 = "/job:localhost/replica:0/task:0/device:GPU:0", "/job:localhost/replica:0/task:0/device:GPU:1"


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two GPUs of 1 and 2 GiB in TensorFlow's device list (what device_memory_bytes reads)."""
    from types import SimpleNamespace

    from wrn3d_tl import devices

    listed = [SimpleNamespace(name="/device:CPU:0", device_type="CPU", memory_limit=2 ** 28),
              SimpleNamespace(name="/device:GPU:0", device_type="GPU", memory_limit=2 ** 30),
              SimpleNamespace(name="/device:GPU:1", device_type="GPU", memory_limit=2 * 2 ** 30)]
    monkeypatch.setattr(devices, "_local_devices", lambda: listed)
    return devices


def test_batch_size_auto_budgets_each_gpus_memory_when_training_on_gpus(fake_gpus):
    from wrn3d_tl.experiment import GPU_MEMORY_SHARE, auto_batch_size

    one = largest_batch(CFG, GPU_MEMORY_SHARE * 2 ** 30)
    assert auto_batch_size(CFG, devices=[GPU0]) == one
    assert auto_batch_size(CFG, devices=[GPU1]) == largest_batch(CFG, GPU_MEMORY_SHARE * 2 * 2 ** 30) > one
    # Two replicas: each GPU holds its replica's half of the batch; the smaller GPU decides.
    assert auto_batch_size(CFG, devices=[GPU0, GPU1], replicas=2) == 2 * one
    assert auto_batch_size(CFG, devices=[GPU0], memory_budget=0.25) == largest_batch(CFG, 0.25 * 2 ** 30)
    with pytest.raises(ValueError, match=r"budget of 0\.001 GiB \(--memory-budget 0\.001 GiB per GPU\)"):
        auto_batch_size(CFG, devices=[GPU0], memory_budget=0.001)
    with pytest.raises(ValueError, match="device: TensorFlow sees no GPU:3"):
        auto_batch_size(CFG, devices=["/device:GPU:3"])
    # On the CPU the budget stays half of the host's RAM, whatever the GPUs hold.
    ram = fake_gpus.device_memory_bytes("/device:CPU:0")
    assert ram > 2 ** 28
    assert auto_batch_size(CFG, devices=["/device:CPU:0"]) == min(largest_batch(CFG, ram / 2), 4096)


def test_the_main_job_budgets_the_gpu_it_trains_on(fake_gpus, monkeypatch, capsys):
    from wrn3d_tl.experiment import GPU_MEMORY_SHARE, make_trainer

    monkeypatch.setattr(fake_gpus, "training_devices", lambda strategy=None: [GPU0])
    trainer = make_trainer(dataset="synthetic", depth=10, width=1, volume_depth=2, batch_size="auto",
                           synthetic_train=64, synthetic_test=16)
    assert trainer.batch_size == largest_batch(trainer.config, GPU_MEMORY_SHARE * 2 ** 30)
    out = capsys.readouterr().out
    assert f"--batch-size auto: {trainer.batch_size} (budget: 80% of 1 GiB on {GPU0} per GPU)" in out


def test_training_devices_are_the_strategys_or_the_default_placement(two_cpu_strategy):
    from wrn3d_tl.devices import device_kind, training_devices

    assert training_devices(two_cpu_strategy) == list(two_cpu_strategy.extended.worker_devices)
    assert [device_kind(d) for d in training_devices(two_cpu_strategy)] == ["CPU", "CPU"]
    want = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    assert [device_kind(d) for d in training_devices()] == [want]
    with pytest.raises(ValueError, match="names no device type"):
        device_kind("/job:localhost")
