"""The Keras twin of build_wrn: parameter counts, shapes, weight transfer both ways, the example."""

import importlib.util
import pathlib
import re

import keras
import numpy as np
import pytest

from wrn3d_tl.layers import leaf_layers
from wrn3d_tl.keras_twin import build_keras_wrn, count_keras_params, keras_layer_name, keras_to_tl, tl_to_keras
from wrn3d_tl.model import WRNConfig, build_wrn, count_params, group_shapes

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "cifar_wide_resnet_keras.py"

CONFIGS = {
    "3d-10-1": dict(depth=10, widen_factor=1, input_shape=(4, 16, 16, 3)),
    "3d-10-2-aniso-dropout": dict(depth=10, widen_factor=2, input_shape=(4, 16, 16, 3), dropout=0.3,
                                  group_strides=(1, (1, 2, 2), (2, 2, 1))),
    "2d-10-2-c100": dict(depth=10, widen_factor=2, input_shape=(16, 16, 3), num_classes=100),
    "2d-16-1-stride2-first": dict(depth=16, widen_factor=1, input_shape=(16, 16, 1), group_strides=(2, 1, 2)),
}


def _perturb_tl(model, rng):
    """Random BN statistics/affines and a random dense bias, so transfer tests are not trivial."""
    for w in model.all_weights:
        short = w.name.split(":")[0].rsplit("/", 1)[-1]
        if short in ("moving_var", "gamma"):
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        elif short in ("moving_mean", "beta", "biases"):
            w.assign(rng.normal(0.0, 0.2, w.shape).astype("float32"))


def _perturb_keras(model, rng):
    for layer in model.layers:
        for v in layer.weights:
            short = v.name.rsplit("/", 1)[-1]
            if short in ("moving_variance", "gamma"):
                v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
            elif short in ("moving_mean", "beta", "bias"):
                v.assign(rng.normal(0.0, 0.2, v.shape).astype("float32"))


def _x(cfg, batch, rng):
    return rng.normal(size=(batch,) + cfg.input_shape).astype("float32")


@pytest.mark.parametrize("key", list(CONFIGS))
def test_param_counts_and_output_shapes_match(key, rng):
    cfg = WRNConfig(**CONFIGS[key])
    tl_model, k_model = build_wrn(cfg), build_keras_wrn(cfg)
    assert count_keras_params(k_model) == count_params(tl_model) == sum(r[3] for r in group_shapes(cfg))
    # Non-trainable weights are the BN moving statistics on both sides.
    assert sum(int(np.prod(w.shape)) for w in k_model.non_trainable_weights) == \
        sum(int(np.prod(w.shape)) for w in tl_model.all_weights if not w.trainable)
    x = _x(cfg, 2, rng)
    tl_model.eval()
    assert tuple(k_model(x, training=False).shape) == tuple(tl_model(x).shape) == (2, cfg.num_classes)
    assert tuple(k_model.output.shape) == (None, cfg.num_classes)


def test_layer_names_follow_the_mapping():
    cfg = WRNConfig(**CONFIGS["3d-10-2-aniso-dropout"])
    k_names = {layer.name for layer in build_keras_wrn(cfg).layers}
    tl_names = [layer.name for layer in leaf_layers(build_wrn(cfg))]
    assert "group2/block1/conv1" in tl_names and keras_layer_name("group2/block1/conv1") == "group2_block1_conv1"
    # input/check is TensorLayer's shape guard; keras.Input guards the shape itself
    assert "input/check" in tl_names
    assert {keras_layer_name(n) for n in tl_names if n != "input/check"} <= k_names
    assert {"group1_block1_bn1_relu", "head_bn_relu", "group3_block1_dropout"} <= k_names
    strides = {layer.name: layer.strides for layer in build_keras_wrn(cfg).layers if hasattr(layer, "strides")}
    assert strides["group2_block1_conv1"] == strides["group2_block1_shortcut"] == (1, 2, 2)
    assert strides["group3_block1_conv1"] == (2, 2, 1) and strides["group3_block1_conv2"] == (1, 1, 1)


@pytest.mark.parametrize("key", ["3d-10-2-aniso-dropout", "2d-10-2-c100"])
def test_tl_to_keras_gives_equal_logits(key, rng):
    cfg = WRNConfig(**CONFIGS[key])
    tl_model, k_model = build_wrn(cfg), build_keras_wrn(cfg)
    _perturb_tl(tl_model, rng)
    x = _x(cfg, 3, rng)
    tl_model.eval()
    want = tl_model(x).numpy()
    before = k_model(x, training=False).numpy()
    assert not np.allclose(before, want, atol=1e-3)
    assert tl_to_keras(tl_model, k_model) is k_model
    got = k_model(x, training=False).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.std(want) > 1e-2  # the comparison is not between two constant vectors
    # Every variable was copied, moving statistics included.
    k_vars = {v.path: v.numpy() for v in k_model.weights}
    np.testing.assert_array_equal(k_vars["group2_block1_bn1/moving_variance"],
                                  _tl_layer(tl_model, "group2/block1/bn1").moving_var.numpy())
    np.testing.assert_array_equal(k_vars["head_logits/bias"], _tl_layer(tl_model, "head/logits").b.numpy())


def _tl_layer(model, name):
    return {layer.name: layer for layer in leaf_layers(model)}[name]


@pytest.mark.parametrize("key", ["3d-10-1", "2d-16-1-stride2-first"])
def test_keras_to_tl_gives_equal_logits(key, rng):
    cfg = WRNConfig(**CONFIGS[key])
    tl_model, k_model = build_wrn(cfg), build_keras_wrn(cfg)
    _perturb_keras(k_model, rng)
    x = _x(cfg, 3, rng)
    want = k_model(x, training=False).numpy()
    tl_model.eval()
    assert not np.allclose(tl_model(x).numpy(), want, atol=1e-3)
    assert keras_to_tl(k_model, tl_model) is tl_model
    np.testing.assert_allclose(tl_model(x).numpy(), want, rtol=1e-5, atol=1e-5)
    # And back again into a fresh Keras model.
    k2 = tl_to_keras(tl_model, build_keras_wrn(cfg))
    np.testing.assert_allclose(k2(x, training=False).numpy(), want, rtol=1e-5, atol=1e-5)


def test_trained_moving_statistics_transfer(rng):
    """After a few Keras training-mode passes the statistics are data-driven, not random."""
    cfg = WRNConfig(**CONFIGS["3d-10-1"])
    tl_model, k_model = build_wrn(cfg), build_keras_wrn(cfg)
    x = _x(cfg, 4, rng) * 2.0 + 0.5
    for _ in range(3):
        k_model(x, training=True)
    keras_to_tl(k_model, tl_model)
    tl_model.eval()
    np.testing.assert_allclose(tl_model(x).numpy(), k_model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other,pattern", [
    (dict(widen_factor=2), r"layer 'group1/block1/conv1'.*expected \(3, 3, 3, 16, 32\).*given \(3, 3, 3, 16, 16\)"),
    (dict(num_classes=7), r"layer 'head/logits'.*expected \(64, 7\).*given \(64, 10\)"),
    (dict(depth=16), r"layer 'group1_block2_bn1'"),
    (dict(group_strides=(1, (1, 2, 2), 2)), r"layer 'group2/block1/(shortcut|conv1)'.*strides.*\(2, 2, 2\).*\(1, 2, 2\)"),
    (dict(input_shape=(4, 16, 16, 1)), r"layer 'stem/conv'.*expected \(3, 3, 3, 1, 16\).*given \(3, 3, 3, 3, 16\)"),
    (dict(input_shape=(16, 16, 3)), r"layer 'stem/conv'.*strides"),
])
def test_mismatched_configs_raise_naming_the_layer(other, pattern):
    base = CONFIGS["3d-10-1"]
    src = build_wrn(WRNConfig(**base))
    dst = build_keras_wrn(WRNConfig(**{**base, **other}))
    before = [v.numpy().copy() for v in dst.weights]
    with pytest.raises(ValueError, match=pattern):
        tl_to_keras(src, dst)
    # A failed transfer writes nothing.
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, dst.weights))


def test_mismatch_raises_in_the_other_direction_too():
    src = build_keras_wrn(WRNConfig(depth=10, widen_factor=2, input_shape=(16, 16, 3)))
    dst = build_wrn(WRNConfig(depth=10, widen_factor=1, input_shape=(16, 16, 3)))
    with pytest.raises(ValueError, match=r"layer 'group1/block1/conv1'.*expected \(3, 3, 16, 16\).*given \(3, 3, 16, 32\)"):
        keras_to_tl(src, dst)


def test_type_errors():
    with pytest.raises(TypeError):
        build_keras_wrn({"depth": 10})
    cfg = WRNConfig(**CONFIGS["3d-10-1"])
    with pytest.raises(TypeError, match="keras.Model"):
        tl_to_keras(build_keras_wrn(cfg), build_wrn(cfg))  # arguments swapped


def _load_example():
    spec = importlib.util.spec_from_file_location("cifar_wide_resnet_keras", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keras_example_runs_two_iterations(capsys, monkeypatch):
    example = _load_example()
    built, pipelines = [], []  # (config, initial weights, model); make_dataset's arguments
    real_build, real_make = example.build_keras_wrn, example.data.make_dataset

    def recording_build(config, *args, **kwargs):
        model = real_build(config, *args, **kwargs)
        built.append((config, model.get_weights(), model))
        return model

    def recording_make(*args, **kwargs):
        pipelines.append((args, kwargs))
        return real_make(*args, **kwargs)

    monkeypatch.setattr(example, "build_keras_wrn", recording_build)
    monkeypatch.setattr(example.data, "make_dataset", recording_make)
    keras.backend.clear_session()
    result = example.main(["--iters", "2", "--dataset", "synthetic", "--depth", "10", "--width", "1",
                           "--dims", "3", "--volume-depth", "2", "--batch-size", "4", "--lr", "0.01"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"iter\s+\d+/2\s", line)]
    assert len(lines) == 2, out
    printed = []
    for i, line in enumerate(lines, start=1):
        m = re.match(r"iter\s+(\d+)/2\s+loss ([\d.]+)\s+acc ([\d.]+)\s+vol/s ([\d.]+)", line)
        assert m, line
        assert int(m.group(1)) == i and np.isfinite(float(m.group(2)))
        assert float(m.group(4)) > 0
        printed.append((float(m.group(2)), float(m.group(3))))
    assert len(built) == 1
    config, initial, model = built[0]
    (train_args, train_kw), = [p for p in pipelines if p[1].get("training")]
    (test_args, test_kw), = [p for p in pipelines if not p[1].get("training")]
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Iteration 1 reports the training-mode loss and accuracy of the initial network on the
    # first batch of the (deterministic) training pipeline: recompute them on a fresh copy.
    x1, y1 = next(iter(real_make(*train_args, **train_kw)))
    assert x1.shape == (4, 2, 32, 32, 3)
    fresh = real_build(config)
    fresh.set_weights(initial)
    logits = fresh(x1, training=True).numpy()
    assert printed[0][0] == pytest.approx(float(xent(y1, logits)), abs=2e-4)
    assert printed[0][1] == pytest.approx(np.mean(logits.argmax(1) == y1.numpy()), abs=1e-9)
    assert printed[1][1] * 4 == pytest.approx(round(printed[1][1] * 4), abs=1e-3)  # k of 4 right

    # Two iterations moved the weights and the BN statistics.
    after = model.get_weights()
    changed = {v.path for v, a, b in zip(model.weights, initial, after) if not np.array_equal(a, b)}
    assert {v.path for v in model.trainable_weights} <= changed
    assert any(v.path.endswith("moving_mean") for v in model.non_trainable_weights if v.path in changed)

    # The final test metrics are the trained network's, in inference mode, on the test split.
    xs, ys = zip(*[(bx.numpy(), by.numpy()) for bx, by in real_make(*test_args, **test_kw)])
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert len(y) == len(test_args[1]) > 0  # every test sample, once
    logits = model(x, training=False).numpy()
    assert result["test_acc"] == pytest.approx(np.mean(logits.argmax(1) == y), abs=1e-9)
    assert result["test_loss"] == pytest.approx(float(xent(y, logits)), rel=1e-5)
    assert f"final test  loss {result['test_loss']:.4f}  acc {result['test_acc']:.4f}" in out


def test_keras_example_falls_back_to_synthetic_with_one_loud_line(capsys, monkeypatch):
    example = _load_example()

    def missing(name, data_dir=None, **kwargs):
        raise FileNotFoundError(f"{name} not under {data_dir}")

    monkeypatch.setattr(example.data, "load_cifar", missing)
    keras.backend.clear_session()
    example.main(["--iters", "1", "--dataset", "cifar100", "--data-dir", "/nonexistent", "--depth", "10",
                  "--width", "1", "--dims", "2", "--batch-size", "4"])
    out = capsys.readouterr().out
    loud = [line for line in out.splitlines() if "SYNTHETIC" in line]
    assert len(loud) == 1 and "CIFAR100" in loud[0], out
    assert len([line for line in out.splitlines() if re.match(r"iter\s+1/1\s.*img/s", line)]) == 1, out
    assert "final test" in out
