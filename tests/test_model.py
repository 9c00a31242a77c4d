"""WRNConfig validation, build_wrn shapes, the paper's parameter counts, FLOPs, gradients."""

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.layers import leaf_layers
from wrn3d_tl.model import WRNConfig, build_wrn, count_flops, count_params, group_shapes, summary

TINY3D = dict(depth=10, widen_factor=1, input_shape=(4, 16, 16, 3))


@pytest.mark.parametrize("kw,batch,want", [
    (dict(depth=10, widen_factor=1, input_shape=(4, 16, 16, 3)), 1, (1, 10)),
    (dict(depth=10, widen_factor=2, input_shape=(4, 16, 16, 3), num_classes=7), 3, (3, 7)),
    (dict(depth=16, widen_factor=1, input_shape=(16, 16, 3)), 3, (3, 10)),
    (dict(depth=10, widen_factor=2, input_shape=(16, 16, 1), num_classes=100), 1, (1, 100)),
    (dict(depth=10, widen_factor=1, input_shape=(3, 9, 9, 2), group_strides=(1, (1, 2, 2), 2)), 3, (3, 10)),
])
def test_output_shapes(kw, batch, want):
    cfg = WRNConfig(**kw)
    model = build_wrn(cfg)
    x = np.random.default_rng(0).normal(size=(batch,) + cfg.input_shape).astype("float32")
    for is_train in (True, False):
        y = model(x, is_train=is_train)
        assert tuple(y.shape) == want and y.dtype == tf.float32
        assert np.all(np.isfinite(y.numpy()))


@pytest.mark.parametrize("name,exact,paper_millions", [
    ("WRN-40-4", 8_949_210, 8.9),
    ("WRN-16-8", 10_961_370, 11.0),
    ("WRN-28-10", 36_479_194, 36.5),
    ("WRN-40-1", 563_930, 0.6),
])
def test_param_counts_match_the_paper(name, exact, paper_millions):
    cfg = WRNConfig.from_name(name, input_shape=(32, 32, 3))
    assert sum(row[3] for row in group_shapes(cfg)) == exact
    rel = abs(exact / 1e6 - paper_millions) / paper_millions
    # The paper rounds to 0.1M: WRN-40-1's 0.56M is printed as 0.6M.
    assert rel < (0.07 if paper_millions < 1 else 0.01)


@pytest.mark.parametrize("name", ["WRN-40-1", "WRN-16-8"])
def test_built_model_has_the_analytic_param_count(name):
    cfg = WRNConfig.from_name(name, input_shape=(32, 32, 3))
    assert count_params(build_wrn(cfg)) == sum(row[3] for row in group_shapes(cfg))


def test_3d_param_count_and_group_shapes():
    cfg = WRNConfig(depth=16, widen_factor=4, input_shape=(8, 32, 32, 3))
    model = build_wrn(cfg)
    assert count_params(model) == 8_150_330
    rows = group_shapes(cfg)
    assert [r[1] for r in rows[:4]] == [(8, 32, 32), (8, 32, 32), (4, 16, 16), (2, 8, 8)]
    assert [r[2] for r in rows] == [16, 64, 128, 256, 10]
    text = summary(cfg)
    assert "WRN-16-4" in text and "8,150,330" in text and "2x8x8" in text


def test_anisotropic_strides_keep_depth():
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(4, 16, 16, 3), group_strides=(1, (1, 2, 2), (1, 2, 2)))
    assert [r[1] for r in group_shapes(cfg)[:4]] == [(4, 16, 16), (4, 16, 16), (4, 8, 8), (4, 4, 4)]
    model = build_wrn(cfg)
    conv = {layer.name: layer for layer in leaf_layers(model)}["group3/block1/conv1"]
    assert conv._strides == (1, 2, 2)


def test_count_flops_by_hand():
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(4, 8, 8, 3))
    k = 27
    stem = 2 * (4 * 8 * 8) * k * 3 * 16
    g1 = 2 * (2 * (4 * 8 * 8) * k * 16 * 16)
    g2 = 2 * (2 * 4 * 4) * (k * 16 * 32 + k * 32 * 32 + 16 * 32)
    g3 = 2 * (1 * 2 * 2) * (k * 32 * 64 + k * 64 * 64 + 32 * 64)
    head = 2 * 64 * 10
    assert count_flops(cfg) == stem + g1 + g2 + g3 + head


def test_count_flops_2d_wrn_28_10_is_about_5_gmacs():
    # WRN-28-10 on CIFAR is commonly quoted at ~5.25 GMACs.
    flops = count_flops(WRNConfig.from_name("WRN-28-10", input_shape=(32, 32, 3)))
    assert 5.2e9 < flops / 2 < 5.3e9


@pytest.mark.parametrize("field,value", [
    ("depth", 12), ("depth", 4), ("depth", 16.0), ("depth", True),
    ("widen_factor", 0), ("widen_factor", 2.5),
    ("num_classes", 1), ("num_classes", "10"),
    ("input_shape", (32, 32)), ("input_shape", (4, 0, 32, 3)), ("input_shape", (4, 32, 32.0, 3)),
    ("input_shape", (1, 2, 3, 4, 5)),
    ("dropout", 1.0), ("dropout", -0.1), ("dropout", "0.3"),
    ("group_strides", (1, 2)), ("group_strides", (1, 0, 2)), ("group_strides", (1, (2, 2), 2)),
    ("bn_decay", 1.0), ("bn_epsilon", 0.0), ("sync_bn", 1),
])
def test_invalid_fields_raise_naming_the_field(field, value):
    kw = dict(depth=10, widen_factor=1, input_shape=(4, 16, 16, 3))
    kw[field] = value
    with pytest.raises(ValueError, match=rf"WRNConfig\.{field} must be ") as err:
        WRNConfig(**kw)
    assert str(err.value).endswith(f"got {value!r}")


def test_from_name_and_dict_round_trip():
    cfg = WRNConfig.from_name("wrn-28-10", num_classes=100, input_shape=(16, 32, 32, 1),
                              group_strides=(1, (1, 2, 2), 2), dropout=0.3)
    assert (cfg.depth, cfg.widen_factor, cfg.blocks_per_group, cfg.widths) == (28, 10, 4, (160, 320, 640))
    assert cfg.group_strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    assert WRNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="WRN-<depth>-<widen_factor>"):
        WRNConfig.from_name("ResNet-50")
    with pytest.raises(ValueError, match="unknown fields"):
        WRNConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_every_weight_gets_a_finite_gradient():
    cfg = WRNConfig(dropout=0.2, **TINY3D)
    model = build_wrn(cfg)
    x = np.random.default_rng(0).normal(size=(3,) + cfg.input_shape).astype("float32")
    y = np.array([1, 2, 3])
    with tf.GradientTape() as tape:
        logits = model(x, is_train=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    grads = tape.gradient(loss, model.trainable_weights)
    # stem 1; blocks 6 each (bn1 2, conv1, bn2 2, conv2) + 2 shortcuts; head bn 2 + dense 2
    assert len(grads) == 1 + 3 * 6 + 2 + 4
    for w, g in zip(model.trainable_weights, grads):
        assert g is not None, w.name
        assert np.all(np.isfinite(g.numpy())), w.name
        assert np.any(g.numpy() != 0), w.name


def test_layer_and_weight_names_are_hierarchical():
    model = build_wrn(WRNConfig(**TINY3D))
    names = [w.name for w in model.all_weights]
    assert "stem/conv/kernel:0" in names
    assert "group2/block1/shortcut/kernel:0" in names
    assert "group1/block1/shortcut/kernel:0" not in names  # 16 -> 16, stride 1: identity
    assert "head/logits/weights:0" in names and "head/bn/moving_var:0" in names
    assert len(set(names)) == len(names)


def test_numpy_integers_are_accepted_and_stored_as_ints():
    cfg = WRNConfig(depth=np.int64(16), widen_factor=np.int32(2), input_shape=tuple(np.array([4, 8, 8, 3])),
                    group_strides=(1, np.array([1, 2, 2]), 2))
    assert (cfg.depth, cfg.widen_factor, cfg.input_shape) == (16, 2, (4, 8, 8, 3))
    assert all(type(v) is int for v in (cfg.depth, cfg.widen_factor, *cfg.input_shape, *cfg.group_strides[1]))
    assert WRNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="WRNConfig.depth"):
        WRNConfig(depth=np.bool_(True), widen_factor=1)


def test_block_plan_is_the_built_network():
    """The plan (WRNConfig.blocks) is what build_wrn builds: names, strides, shortcuts and
    each block's output shape, for 2D and anisotropic 3D configs."""
    for cfg in (WRNConfig(depth=16, widen_factor=2, input_shape=(5, 9, 9, 2), group_strides=(1, (1, 2, 2), 2)),
                WRNConfig(depth=10, widen_factor=1, input_shape=(16, 16, 3))):
        plan = cfg.blocks()
        assert [b.name for b in plan] == [f"group{g}/block{i}" for g in (1, 2, 3)
                                          for i in range(1, cfg.blocks_per_group + 1)]
        assert cfg.layout == ("NDHWC" if cfg.spatial_rank == 3 else "NHWC")
        model = build_wrn(cfg)
        leaves = {layer.name: layer for layer in leaf_layers(model)}
        blocks = {layer.name: layer for layer in model.all_layers}
        x = tf.zeros((1,) + cfg.input_shape)
        h = blocks["stem/conv"](x)
        for b in plan:
            assert leaves[f"{b.name}/conv1"]._strides == b.strides
            assert (f"{b.name}/shortcut" in leaves) == b.projection
            h = blocks[b.name](h)
            assert tuple(h.shape[1:]) == b.out_spatial + (b.out_channels,), b
        # the rule itself: a projection exactly where channels or stride change
        assert [b.projection for b in plan] == [b.in_channels != b.out_channels or b.strides != (1,) * cfg.spatial_rank
                                                for b in plan]
        assert plan[0].in_channels == cfg.stem_width == 16


def test_create_wrn_by_name_with_weights_from_a_checkpoint(tmp_path):
    from wrn3d_tl.checkpoint import CheckpointError
    from wrn3d_tl.loading import create_wrn
    from wrn3d_tl.train import Trainer

    model = create_wrn("WRN-16-2", input_shape=(4, 8, 8, 1), num_classes=3, dropout=0.3)
    assert model.wrn_config == WRNConfig(depth=16, widen_factor=2, num_classes=3, input_shape=(4, 8, 8, 1),
                                         dropout=0.3)
    assert create_wrn("wrn-10-1", input_shape=(8, 8, 3), num_classes=2).wrn_config.name == "WRN-10-1"
    for bad in ("WRN-16", "ResNet-16-4", 16, "WRN-16-x"):
        with pytest.raises(ValueError, match=r"^name must look like 'WRN-<depth>-<widen_factor>'"):
            create_wrn(bad, input_shape=(8, 8, 3), num_classes=2)
    with pytest.raises(ValueError, match=r"WRNConfig\.depth must be"):
        create_wrn("WRN-12-1", input_shape=(8, 8, 3), num_classes=2)
    # weights: every variable (BN statistics too) from a checkpoint of the same architecture
    trained = build_wrn(model.wrn_config)
    x = np.random.default_rng(0).normal(size=(2, 4, 8, 8, 1)).astype("float32")
    trained(x, is_train=True)   # moves the BN statistics away from their initial values
    path = Trainer(trained, verbose=False, normalization=None).save(tmp_path / "c.h5")
    loaded = create_wrn("WRN-16-2", input_shape=(4, 8, 8, 1), num_classes=3, dropout=0.3, weights=path)
    np.testing.assert_array_equal(loaded(x, is_train=False).numpy(), trained(x, is_train=False).numpy())
    with pytest.raises(CheckpointError, match=r"c\.h5.*'head/logits/weights' has shape \(128, 3\), the model "
                                              r"expects \(128, 5\)"):
        create_wrn("WRN-16-2", input_shape=(4, 8, 8, 1), num_classes=5, weights=path)


def test_the_package_face_loads_its_names_on_first_use():
    """``import wrn3d_tl`` imports no TensorFlow; each public name comes from the module that
    defines it, the same object as there."""
    import importlib
    import subprocess
    import sys

    import wrn3d_tl

    out = subprocess.run([sys.executable, "-c", "import sys, wrn3d_tl; print('tensorflow' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-500:]
    assert set(wrn3d_tl._PUBLIC) <= set(dir(wrn3d_tl)) and "create_wrn" in wrn3d_tl.__all__
    for name, module in wrn3d_tl._PUBLIC.items():
        assert getattr(wrn3d_tl, name) is getattr(importlib.import_module(f"wrn3d_tl.{module}"), name), name
    with pytest.raises(AttributeError, match="has no attribute 'Trainerr'"):
        wrn3d_tl.Trainerr


def test_one_precision_vocabulary_for_training_inference_and_the_commands(capsys):
    from wrn3d_tl.commands import Parser, add_training_flags
    from wrn3d_tl.commands.export import main as export_main
    from wrn3d_tl.commands.predict import _parser as predict_parser
    from wrn3d_tl.config import INFERENCE_PRECISIONS, PRECISIONS, check_mixed_precision, check_precision
    from wrn3d_tl.memory import estimate_memory
    from wrn3d_tl.model import PRECISION_DTYPES, inference_dtype
    from wrn3d_tl.train import Trainer

    assert PRECISIONS == ("fp32", "bf16", "fp16") and set(INFERENCE_PRECISIONS) < set(PRECISIONS)
    assert [PRECISION_DTYPES[p] for p in PRECISIONS] == [tf.float32, tf.bfloat16, tf.float16]
    assert [inference_dtype(p) for p in INFERENCE_PRECISIONS] == [tf.float32, tf.bfloat16]
    with pytest.raises(ValueError, match=r"^precision must be one of 'fp32', 'bf16', got 'fp16'$"):
        check_precision("fp16", allowed=INFERENCE_PRECISIONS)
    assert [check_mixed_precision(p) for p in (None, "fp32", "bf16", "fp16")] == [None, None, "bf16", "fp16"]
    with pytest.raises(ValueError, match=r"^mixed_precision must be None or one of 'fp32', 'bf16', 'fp16', got 'none'"):
        check_mixed_precision("none")
    # the commands offer the same words ("none" is fp32 on the training flag)
    parser = Parser(prog="t")
    add_training_flags(parser, iters_help="")
    assert parser.parse_args(["--mixed-precision", "bf16"]).mixed_precision == "bf16"
    choices = {a.dest: a.choices for a in parser._actions}
    assert list(choices["mixed_precision"]) == ["none", *PRECISIONS[1:]]
    assert list({a.dest: a.choices for a in predict_parser()._actions}["precision"]) == list(INFERENCE_PRECISIONS)
    assert export_main(["--help"]) == 0 and "{fp32,bf16}" in capsys.readouterr().out
    # "fp32" and None are the same training precision
    cfg = WRNConfig(**TINY3D)
    assert Trainer(build_wrn(cfg), mixed_precision="fp32", verbose=False).mixed_precision is None
    assert estimate_memory(cfg, 2, mixed_precision="fp32") == estimate_memory(cfg, 2)


def test_the_config_owns_the_layer_names():
    """Layer names are written once, in wrn3d_tl.config: the built model has exactly them, and
    no other library module spells one out."""
    import ast
    import re
    from pathlib import Path

    from wrn3d_tl.config import TOP_LAYERS
    from wrn3d_tl.layers import variable_name

    cfg = WRNConfig(**TINY3D)
    model = build_wrn(cfg)
    assert {variable_name(v).split("/")[0] for v in model.all_weights} == set(TOP_LAYERS)
    layers = {layer.name for layer in [*model.all_layers, *leaf_layers(model)]}
    assert cfg.feature_layers()[0] == "stem/conv" and cfg.feature_layers()[-1] == "head/bn"
    assert set(cfg.feature_layers()) <= layers and len(cfg.feature_layers()) == 2 + 3 * cfg.blocks_per_group
    package = Path(__file__).resolve().parent.parent / "wrn3d_tl"
    spelled = [f"{path.name}:{node.lineno} {node.value!r}"
               for path in sorted(package.rglob("*.py")) if path.name != "config.py"
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and re.match(r"^(stem/|head/|group\d)", node.value)]
    assert spelled == []
