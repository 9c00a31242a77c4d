"""The GPU path: the same models, trainer and export on a GPU as on the CPU.

Marked ``gpu`` (``make gpu-check`` runs ``pytest -m gpu tests/test_gpu.py``). Every body
takes its devices from fixtures: the device under test is the first GPU, the reference
the first CPU, and where TensorFlow sees no GPU the tests skip (before their bodies run).
``WRN3D_TEST_DEVICE=CPU`` swaps the device under test for the second logical CPU of
conftest.py (and MirroredStrategy over the GPUs for one over the two logical CPUs), so the
same bodies run on a CPU-only machine::

    WRN3D_TEST_DEVICE=CPU pytest -m gpu tests/test_gpu.py

fp32 comparisons run with TensorFloat-32 off: TensorFlow enables it by default on Ampere
and newer GPUs, where it rounds convolution inputs to 10-bit mantissas (~1e-3 relative).
"""

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.data import synthetic_blobs
from wrn3d_tl.export import export_saved_model
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.train import Trainer

pytestmark = pytest.mark.gpu

TARGET = os.environ.get("WRN3D_TEST_DEVICE", "GPU").upper()
if TARGET not in ("GPU", "CPU"):
    raise ValueError(f"WRN3D_TEST_DEVICE must be GPU or CPU, got {os.environ['WRN3D_TEST_DEVICE']!r}")
NO_GPU = "no GPU visible to TensorFlow (WRN3D_TEST_DEVICE=CPU runs these tests on a second logical CPU)"

CFG = WRNConfig(depth=10, widen_factor=2, num_classes=10, input_shape=(4, 16, 16, 3))


def _cpus():
    return [d.name for d in tf.config.list_logical_devices("CPU")]


@pytest.fixture(scope="module")
def device():
    """The device under test: the first GPU, or with WRN3D_TEST_DEVICE=CPU the second CPU."""
    if TARGET == "CPU":
        if len(_cpus()) < 2:
            pytest.skip("two logical CPU devices could not be configured")
        return _cpus()[1]
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        pytest.skip(NO_GPU)
    return gpus[0].name


@pytest.fixture(scope="module")
def reference(device):
    """Where the expected values are computed: the first CPU."""
    return _cpus()[0]


@pytest.fixture
def replica_devices(device):
    """Every visible GPU (or, swapped, the two logical CPUs)."""
    return _cpus()[:2] if TARGET == "CPU" else [d.name for d in tf.config.list_logical_devices("GPU")]


@pytest.fixture
def fp32_exact():
    was = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(was)


def same_device(a, b):
    a, b = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return (a.device_type, a.device_index or 0) == (b.device_type, b.device_index or 0)


def twins(device, reference, cfg=CFG):
    """The same network built on ``device`` and on ``reference``, with equal weights."""
    with tf.device(reference):
        ref = build_wrn(cfg)
    with tf.device(device):
        dev = build_wrn(cfg)
    for a, b in zip(ref.all_weights, dev.all_weights):
        b.assign(a.numpy())
    assert all(same_device(v.device, device) for v in dev.all_weights)
    return dev, ref


def batch(cfg=CFG, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + cfg.input_shape).astype("float32"), rng.integers(0, cfg.num_classes, n)


def assert_close_relative(got, want, rel, what):
    err = np.max(np.abs(np.asarray(got) - np.asarray(want)))
    scale = max(np.max(np.abs(want)), 1e-12)
    assert err <= rel * scale, f"{what}: max difference {err:.3g} = {err / scale:.3g} of its largest value {scale:.3g}"


def test_inference_logits_match_the_cpu(device, reference, fp32_exact):
    dev, ref = twins(device, reference)
    x, _ = batch()
    out = {}
    for where, model in ((device, dev), (reference, ref)):
        with tf.device(where):
            out[where] = tf.function(lambda v, m=model: m(v, is_train=False))(x)
        assert same_device(out[where].device, where)
    assert out[device].shape == (8, CFG.num_classes) and out[device].dtype == tf.float32
    assert_close_relative(out[device], out[reference], 1e-4, "logits")


def test_one_training_step_matches_the_cpu(device, reference, fp32_exact):
    dev, ref = twins(device, reference)
    before = [w.numpy() for w in ref.all_weights]
    x, y = batch()
    metrics = {}
    for where, model in ((device, dev), (reference, ref)):
        with tf.device(where):
            trainer = Trainer(model, lr=0.1, verbose=False)
            assert all(same_device(s.device, where) for s in trainer.optimizer.slots)
            metrics[where] = trainer.train_step(x, y)
    assert metrics[device]["loss"] == pytest.approx(metrics[reference]["loss"], rel=1e-4)
    moved = 0
    for a, b, w0 in zip(dev.all_weights, ref.all_weights, before):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4, err_msg=a.name)
        moved += not np.array_equal(b.numpy(), w0)
    assert moved > len(ref.all_weights) // 2  # the step changed the weights (and BN statistics)


def test_fp16_with_loss_scaling_takes_finite_steps_and_learns(device):
    (x, y), _ = synthetic_blobs(64, 0, shape=(4, 8, 8), seed=1)
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=8, input_shape=(4, 8, 8, 1))
    with tf.device(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fp16' with no GPU")  # the swapped run, on a CPU
        tf.random.set_seed(0)
        trainer = Trainer(build_wrn(cfg), (x, y), batch_size=16, lr=0.05, mixed_precision="fp16", verbose=False)
        losses = [trainer.train_step()["loss"] for _ in range(12)]
    assert np.all(np.isfinite(losses)), losses
    # A skipped (non-finite) step halves the scale: at most a few, at the start, are allowed.
    assert trainer.loss_scale.scale.numpy() >= trainer.loss_scale.INITIAL / 8
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:2]), losses


CONV_OPS = ("Conv3D", "Conv3DBackpropInputV2", "Conv3DBackpropFilterV2")


def test_bf16_convolutions_run_in_bf16_on_a_gpu_and_give_the_float32_gradients(device, reference):
    # A 2-deep input: the shape whose bf16 filter gradient oneDNN (the CPU's library) gets
    # wrong, so on a CPU those convolutions may run in float32; on a GPU every one is bf16.
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=4, input_shape=(2, 8, 8, 3))
    dev, _ = twins(device, reference, cfg)
    x, y = batch(cfg, n=4)
    kernels = [w for w in dev.trainable_weights if w.name.endswith("kernel:0") and w.shape.rank == 5]

    def grads(x, dtype):
        with tf.GradientTape() as tape:
            logits = tf.cast(dev(tf.cast(x, dtype), is_train=True), tf.float32)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, kernels)

    with tf.device(device):
        bf16 = tf.function(lambda v: grads(v, tf.bfloat16))
        graph = bf16.get_concrete_function(tf.TensorSpec(x.shape, tf.float32)).graph
        g16 = [g.numpy() for g in bf16(x)]
        g32 = [g.numpy() for g in tf.function(lambda v: grads(v, tf.float32))(x)]
    dtypes = {op.get_attr("T").name for op in graph.get_operations() if op.type in CONV_OPS}
    if TARGET == "GPU":
        assert dtypes == {"bfloat16"}
    else:  # the deeper groups' convolutions (strided to depth 1) are bf16 on any device
        assert "bfloat16" in dtypes
    for a, b, w in zip(g16, g32, kernels):
        cosine = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
        assert np.all(np.isfinite(a)) and cosine > 0.98, (w.name, cosine)


def test_mirrored_strategy_over_every_replica_device_matches_one_device(device, reference, replica_devices,
                                                                        mirrored_over, fp32_exact):
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=10, input_shape=(4, 8, 8, 3), sync_bn=True)
    strategy = mirrored_over(replica_devices)
    single_device = replica_devices[0]
    assert strategy.num_replicas_in_sync == len(replica_devices)
    with tf.device(single_device):
        single = Trainer(build_wrn(cfg), lr=0.1, verbose=False)
    with strategy.scope():
        model = build_wrn(cfg)
    for a, b in zip(single.model.all_weights, model.all_weights):
        b.assign(a.numpy())
    mirrored = Trainer(model, lr=0.1, strategy=strategy, verbose=False)
    for seed in range(2):
        x, y = batch(cfg, n=4 * len(replica_devices), seed=seed)
        with tf.device(single_device):
            a = single.train_step(x, y)
        b = mirrored.train_step(x, y)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["accuracy"] == b["accuracy"]
    for v1, v2 in zip(single.model.all_weights, mirrored.model.all_weights):
        np.testing.assert_allclose(v1.numpy(), v2.numpy(), rtol=1e-4, atol=1e-4, err_msg=v1.name)


def test_export_serves_on_the_device(device, reference, tmp_path, fp32_exact):
    dev, ref = twins(device, reference)
    x, y = batch()
    with tf.device(device):
        Trainer(dev, lr=0.1, verbose=False).train_step(x, y)  # moving BN statistics away from 0 and 1
    for a, b in zip(dev.all_weights, ref.all_weights):
        b.assign(a.numpy())
    norm = {"mean": [100.0, 110.0, 120.0], "std": [50.0, 40.0, 30.0]}
    path = export_saved_model(dev, tmp_path / "served", normalization=norm)
    raw = np.random.default_rng(3).integers(0, 256, size=(5,) + CFG.input_shape).astype(np.uint8)
    with tf.device(reference):
        want = ref((raw - np.float32(norm["mean"])) / np.float32(norm["std"]), is_train=False).numpy()
    with tf.device(device):
        served = tf.saved_model.load(str(path))
        out = served.signatures["serving_default"](volumes=tf.constant(raw.astype(np.float32)))
        out8 = served.signatures["serving_uint8"](volumes=tf.constant(raw))
    assert same_device(out["logits"].device, device)
    assert_close_relative(out["logits"], want, 1e-4, "served logits")
    assert_close_relative(out8["logits"], want, 1e-4, "served logits (uint8)")
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)
