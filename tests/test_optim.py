"""The optimizer (wrn3d_tl.optim) against a NumPy reference over several steps, fp16
divergence, and trainer settings that must survive a checkpoint."""

import re

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.layers import variable_name
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.optim import FP16_MAX_FLOOR_SKIPS, LossScale
from wrn3d_tl.train import Trainer

CFG = WRNConfig(depth=10, widen_factor=1, num_classes=4, input_shape=(8, 8, 3))


def make(**kw):
    tf.random.set_seed(0)
    return Trainer(build_wrn(CFG), verbose=False, **kw)


def batch(seed, n=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + CFG.input_shape).astype("float32"), rng.integers(0, CFG.num_classes, n)


def weights(trainer):
    return {variable_name(w): w.numpy().copy() for w in trainer.model.trainable_weights}


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_matches_a_numpy_reference_over_six_steps(nesterov):
    """Torch's SGD: g += wd * w on kernels only; v = m v + g; w -= lr (g + m v) (Nesterov)
    or lr v. Six steps with warm-up then the step schedule, so the velocity differs from the
    gradient from step 2 on and a no-op momentum update would fail."""
    base, m, wd = 0.1, 0.9, 5e-3
    t = make(lr=base, momentum=m, nesterov=nesterov, weight_decay=wd, schedule="step", total_steps=6,
             warmup_steps=2)
    # warm-up 0.05, 0.1; then x0.2 at steps >= 1.8, 3.6, 4.8 (30/60/80% of 6)
    expected_lr = [0.05, 0.1, 0.02, 0.02, 0.004, 0.0008]
    w = weights(t)
    v = {k: np.zeros_like(a) for k, a in w.items()}
    decayed = {k for k in w if re.search(r"/(kernel|weights)$", k)}
    assert "head/logits/weights" in decayed and "head/logits/biases" not in decayed
    assert not any("/bn" in k or k.endswith("gamma") for k in decayed)
    for step, lr in enumerate(expected_lr):
        x, y = batch(step)
        with tf.GradientTape() as tape:
            logits = t.model(x, is_train=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, t.model.trainable_weights)
        for var, g in zip(t.model.trainable_weights, grads):
            k = variable_name(var)
            g = g.numpy() + (wd * w[k] if k in decayed else 0.0)
            v[k] = m * v[k] + g
            w[k] = w[k] - lr * (g + m * v[k] if nesterov else v[k])
        out = t.train_step(x, y)
        assert out["lr"] == pytest.approx(lr, rel=1e-12)
        got = weights(t)
        for k in w:
            np.testing.assert_allclose(got[k], w[k], rtol=2e-4, atol=2e-6, err_msg=f"step {step + 1}: {k}")
    slots = {variable_name(wv): s.numpy() for wv, s in zip(t.optimizer.weights, t.optimizer.slots)}
    for k in v:
        np.testing.assert_allclose(slots[k], v[k], rtol=2e-4, atol=2e-6, err_msg=k)


def test_lr_override_and_settings_survive_save_and_restore(tmp_path):
    t = make(lr=0.2, schedule="cosine", total_steps=10, keep_checkpoints=5, jit_compile=True)
    t.learning_rate = 0.033
    path = t.save(tmp_path / "c.h5")
    r = Trainer.restore(path, verbose=False)
    assert r.learning_rate == 0.033 and r.scheduled_lr(0) == 0.2
    assert r.keep_checkpoints == 5 and r.jit_compile is True
    assert r.hyperparameters() == t.hyperparameters()
    r.jit_compile = False  # XLA is slow for convolutions on CPU; the restored flag is what is tested
    assert r.train_step(*batch(0))["lr"] == 0.033


def test_fp16_run_that_stays_non_finite_at_the_smallest_scale_raises():
    """Inputs beyond float16's range make every step non-finite: the scale halves from 2**15
    to 1.0 in 15 skipped steps, then FP16_MAX_FLOOR_SKIPS steps at 1.0 end the run."""
    t = make(mixed_precision="fp16")
    x, y = batch(0)
    x = np.full_like(x, 1e6)  # finite in float32, inf in float16
    before = weights(t)
    for i in range(15 + FP16_MAX_FLOOR_SKIPS - 1):  # every step skipped: the scale halves to the floor
        assert t.train_step(x, y)["step"] == i + 1
        assert t.loss_scale.scale.numpy() == max(2.0 ** (14 - i), LossScale.FLOOR)
    assert int(t.loss_scale.floor_skips.numpy()) == FP16_MAX_FLOOR_SKIPS - 1
    with pytest.raises(FloatingPointError, match=rf"fp16: {FP16_MAX_FLOOR_SKIPS} consecutive non-finite steps"):
        t.train_step(x, y)
    after = weights(t)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # a finite step at the floor resets the count; the scale then grows again only slowly
    assert np.isfinite(t.train_step(*batch(1))["loss"])
    assert int(t.loss_scale.floor_skips.numpy()) == 0


@pytest.mark.parametrize("norm,match", [
    ({"mean": [0.0, 0.0, 0.0]}, "'mean' and 'std'"),
    ({"mu": [0.0] * 3, "sigma": [1.0] * 3}, "'mean' and 'std'"),
    ({"mean": [0.0] * 3, "std": [1.0, 0.0, 1.0]}, "std must be > 0"),
    ({"mean": [0.0] * 2, "std": [1.0] * 2}, "2 channels"),
    ({"mean": [0.0, float("nan"), 0.0], "std": [1.0] * 3}, "finite"),
    ("zscore", "normalization must be None"),
])
def test_malformed_normalization_is_refused_on_the_way_in(norm, match):
    with pytest.raises(ValueError, match=match):
        make(normalization=norm)


def test_a_checkpoint_with_malformed_normalization_is_a_one_line_predict_error(tmp_path, capsys):
    from wrn3d_tl.checkpoint import read_checkpoint, write_checkpoint
    from wrn3d_tl.commands.predict import main

    good = make().save(tmp_path / "good.h5")
    ck = read_checkpoint(good)
    write_checkpoint(tmp_path / "bad.h5", config=ck["config"], trainer=ck["trainer"], step=ck["step"],
                     normalization={"mu": [0.0] * 3}, weights=ck["weights"], optimizer=ck["optimizer"],
                     state=ck["state"])
    np.save(tmp_path / "x.npy", np.zeros((2,) + CFG.input_shape, "float32"))
    code = main(["--checkpoint", str(tmp_path / "bad.h5"), "--npy", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("wrn3d-predict: error: --checkpoint") and "invalid normalization" in err[0]
    with pytest.raises(Exception, match="invalid normalization"):
        Trainer.restore(tmp_path / "bad.h5", verbose=False)


def test_worker_errors_are_reported_as_lost_only_when_they_are():
    from wrn3d_tl.distribute import worker_failure_message

    lost = worker_failure_message(tf.errors.UnavailableError(None, None, "peer 1 is gone"), 7)
    assert lost.startswith("[wrn3d_tl] ERROR: lost contact with another worker at step 7") and "--resume" in lost
    maybe = worker_failure_message(tf.errors.InternalError(None, None, "a kernel failed:\n  details"), 7)
    assert "ERROR at step 7: InternalError: a kernel failed: details" in maybe
    assert "may mean a lost contact" in maybe and not maybe.startswith("[wrn3d_tl] ERROR: lost contact")
    assert "may mean" in worker_failure_message(tf.errors.CancelledError(None, None, "cancelled"), 1)
    assert worker_failure_message(ValueError("bad input"), 1) is None
    assert worker_failure_message(tf.errors.InvalidArgumentError(None, None, "shape"), 1) is None


def test_plot_metrics_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    from wrn3d_tl.logs import MetricsLogger, plot_metrics

    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log(step, "train", {"loss": 1.0 / step, "accuracy": 0.2 * step})
    logger.close()
    original = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        figures = plt.get_fignums()
        png = plot_metrics(logger.csv_path, tmp_path / "curves.png")
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == figures
    finally:
        matplotlib.use(original)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_step_refused_for_its_inputs_leaves_the_loss_scale_alone():
    def state(ls):
        return ls.scale.numpy(), ls.good_steps.numpy(), ls.floor_skips.numpy()

    ls = LossScale(enabled=True)
    ls.update(tf.constant(True))
    before = state(ls)
    ls.update(tf.constant(False), counts=tf.constant(False))  # refused input: not an overflow
    assert state(ls) == before
    ls.update(tf.constant(False), counts=tf.constant(True))   # a real overflow halves the scale
    assert state(ls) == (before[0] / 2, 0, 0)
