"""Pretrained weights: PyTorch WRNs in (from_torch), 2D -> 3D (inflate), fine-tuning a
subset, the wrn3d-convert CLI, and the padding field they rely on.

The reference networks are tests/fixtures/torch_wrn.py. Without PyTorch the tests run
from its committed fixtures (state dicts as .npz, PyTorch's logits on a fixed input);
with PyTorch they also save real .pt files and compare with PyTorch there and then.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.config import WRNConfig
from wrn3d_tl.commands.convert import main
from wrn3d_tl.convert import ConversionError, from_torch, inflate, load_state_dict
from wrn3d_tl.layers import leaf_layers, variable_name
from wrn3d_tl.model import build_wrn
from wrn3d_tl.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CASES = ["wrn10-1-robustbench", "wrn16-2-robustbench", "wrn10-1-szagoruyko"]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def fixture(case):
    io = np.load(os.path.join(FIXTURES, f"{case}.io.npz"))
    return os.path.join(FIXTURES, f"{case}.npz"), io["x_nchw"].transpose(0, 2, 3, 1), io["logits"]


def rel_diff(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def wrn10():
    path, x, logits = fixture("wrn10-1-robustbench")
    return from_torch(path), x, logits


# ------------------------------------------------------------------ from_torch
@pytest.mark.parametrize("case", CASES)
def test_from_torch_matches_pytorch_logits(case):
    path, x, want = fixture(case)
    model = from_torch(path)
    cfg = model.wrn_config
    assert cfg.padding == "symmetric" and cfg.input_shape == (32, 32, 3) and cfg.num_classes == 10
    assert cfg.name == {"wrn10": "WRN-10-1", "wrn16": "WRN-16-2"}[case[:5]]
    got = model(x, is_train=False).numpy()
    diff = rel_diff(got, want)
    print(f"{case}: max |logit difference| / max |logit| = {diff:.2e}")
    assert diff < 1e-4
    # TensorFlow's "SAME" padding would not match: the stride-2 convolutions pad (0, 1)
    same = build_wrn(WRNConfig(**{**cfg.to_dict(), "padding": "same", "input_shape": cfg.input_shape,
                                  "group_strides": cfg.group_strides}))
    for a, b in zip(same.all_weights, model.all_weights):
        a.assign(b)
    assert rel_diff(same(x, is_train=False).numpy(), want) > 1e-3


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed: the .npz fixtures stand in for .pt files")
@pytest.mark.parametrize("case", ["wrn10-1-robustbench", "wrn10-1-szagoruyko"])
def test_pt_files_from_torch_save_in_their_wrappers(case, tmp_path):
    import torch

    sys.path.insert(0, FIXTURES)
    try:
        import torch_wrn
    finally:
        sys.path.remove(FIXTURES)
    state, forward = torch_wrn.make(case)
    x = torch_wrn.fixed_input()
    with torch.no_grad():
        want = forward(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(want, fixture(case)[2], rtol=1e-6, atol=1e-6)  # the committed fixture is current
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}  # DataParallel inside a wrapper
    torch.save(wrapped, tmp_path / "model.pt")
    got = from_torch(tmp_path / "model.pt")(x.transpose(0, 2, 3, 1), is_train=False).numpy()
    assert rel_diff(got, want) < 1e-4
    torch.save({"params": dict(state)}, tmp_path / "params.pth")
    assert set(load_state_dict(tmp_path / "params.pth")) == set(state)


def test_pt_without_pytorch_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "model.pt").write_bytes(b"not read")
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)       # as if PyTorch were not installed: import fails
    with pytest.raises(ImportError, match=r"reading .*model.pt.* needs PyTorch \(pip install 'wrn3d_tl\[torch\]'"):
        from_torch(str(tmp_path / "model.pt"))
    assert from_torch(fixture(CASES[0])[0]).wrn_config.name == "WRN-10-1"   # .npz and the rest work without torch


def test_strict_loading_names_the_tensor():
    state = load_state_dict(fixture("wrn10-1-robustbench")[0])
    assert "block1.layer.0.bn1.num_batches_tracked" in state  # ignored
    missing = dict(state)
    del missing["block2.layer.0.convShortcut.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor 'block2\.layer\.0\.convShortcut\.weight'"):
        from_torch(missing)
    extra = {**state, "block1.layer.0.conv3.weight": np.zeros((16, 16, 3, 3), np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected tensor 'block1\.layer\.0\.conv3\.weight'"):
        from_torch(extra)
    bad = {**state, "block3.layer.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)}
    with pytest.raises(ConversionError, match=r"tensor 'block3\.layer\.0\.conv2\.weight' has shape \(64, 64, 1, 1\)"):
        from_torch(bad)
    no_bias = from_torch({k: v for k, v in state.items() if k != "fc.bias"})  # RobustBench's bias_last=False
    assert not [v for v in no_bias.all_weights if variable_name(v) == "head/logits/biases"][0].numpy().any()
    # RobustBench's unused sub_block1 is skipped; a module. prefix is stripped
    ok = {**{f"module.{k}": v for k, v in state.items()}, "sub_block1.layer.0.bn1.weight": np.ones(16, np.float32)}
    assert from_torch(ok).wrn_config.name == "WRN-10-1"
    sz = load_state_dict(fixture("wrn10-1-szagoruyko")[0])  # szagoruyko's older runs: {"params", "stats"}
    split = {"params": {k: v for k, v in sz.items() if "running" not in k},
             "stats": {k: v for k, v in sz.items() if "running" in k}, "epoch": 200}
    path, x, want = fixture("wrn10-1-szagoruyko")
    assert rel_diff(from_torch(split)(x, is_train=False).numpy(), want) < 1e-4
    with pytest.raises(ConversionError, match="cannot tell the layout"):
        from_torch({"weights": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="has 1 channels, the weights' stem takes 3"):
        from_torch(state, input_shape=(32, 32, 1))


# ------------------------------------------------------------------- inflate
@pytest.mark.parametrize("depth,strides", [(1, None), (2, None), (5, None), (8, None),
                                            (4, (1, (1, 2, 2), (1, 2, 2)))])
def test_centre_inflation_of_a_repeated_image_gives_the_2d_logits(wrn10, depth, strides):
    model, x, _ = wrn10
    want = model(x, is_train=False).numpy()
    m3 = inflate(model, volume_depth=depth, group_strides=strides)
    assert m3.wrn_config.input_shape == (depth, 32, 32, 3) and m3.wrn_config.layout == "NDHWC"
    got = m3(np.repeat(x[:, None], depth, axis=1), is_train=False).numpy()
    assert rel_diff(got, want) < 1e-5


def test_mean_inflation_reproduces_interior_slices_and_scales_the_edges(wrn10):
    """mode="mean" (I3D): on a depth-constant volume a 3x3x3 convolution gives the 2D
    output on every slice whose depth neighbours exist, and 2/3 of it on the first and
    last slice (zero padding); the logits therefore differ from the 2D model's."""
    model, x, _ = wrn10
    m3 = inflate(model, volume_depth=6, mode="mean")
    stem2 = {layer.name: layer for layer in leaf_layers(model)}["stem/conv"]
    stem3 = {layer.name: layer for layer in leaf_layers(m3)}["stem/conv"]
    want = stem2.forward(tf.constant(x)).numpy()
    got = stem3.forward(tf.constant(np.repeat(x[:, None], 6, axis=1))).numpy()
    np.testing.assert_allclose(got[:, 1:-1], np.repeat(want[:, None], 4, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, [0, -1]], np.repeat(want[:, None], 2, axis=1) * 2 / 3, rtol=1e-5, atol=1e-5)
    logits = m3(np.repeat(x[:, None], 6, axis=1), is_train=False).numpy()
    assert rel_diff(logits, model(x, is_train=False).numpy()) > 1e-3


def test_grey_stem_and_new_head(wrn10, tmp_path):
    model, x, _ = wrn10
    rgb = inflate(model, volume_depth=4)
    grey = inflate(model, volume_depth=4, in_channels=1)
    g = np.repeat(x.mean(-1, keepdims=True)[:, None], 4, axis=1)  # (N, 4, 32, 32, 1)
    np.testing.assert_allclose(grey(g, is_train=False).numpy(), rgb(np.repeat(g, 3, -1), is_train=False).numpy(),
                               rtol=1e-4, atol=1e-5)
    tf.random.set_seed(1)
    five = inflate(model, volume_depth=4, num_classes=5)
    assert five.wrn_config.num_classes == 5
    new = {variable_name(v): v.numpy() for v in five.all_weights}
    old = {variable_name(v): v.numpy() for v in rgb.all_weights}
    assert new["head/logits/weights"].shape == (64, 5) and not new["head/logits/biases"].any()
    assert new["head/logits/weights"].std() > 0
    for name in old:
        if not name.startswith("head/logits/"):
            np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    # from a checkpoint path too; the inflated model's checkpoint is an ordinary one
    path = Trainer(model, verbose=False, normalization={"mean": [0.0] * 3, "std": [1.0] * 3}).save(tmp_path / "2d.h5")
    from_path = inflate(path, volume_depth=4)
    np.testing.assert_allclose(from_path(np.repeat(x[:, None], 4, 1), is_train=False).numpy(),
                               model(x, is_train=False).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs a 2D model"):
        inflate(rgb, volume_depth=4)
    with pytest.raises(ValueError, match="depth_kernel must be 3"):
        inflate(model, volume_depth=4, depth_kernel=5)


# ----------------------------------------------------------------- fine-tuning
def test_fine_tuning_a_subset_leaves_the_rest_bit_identical(wrn10, tmp_path):
    model, _, _ = wrn10
    tf.random.set_seed(2)
    m3 = inflate(model, volume_depth=2, num_classes=3)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 2, 32, 32, 3)).astype("float32"), rng.integers(0, 3, 4)
    t = Trainer(m3, trainable=["group3", "head"], lr=0.05, verbose=False)
    assert t.trainable and all(n.startswith(("group3/", "head/")) for n in t.trainable)
    before = {variable_name(v): v.numpy().copy() for v in m3.trainable_weights}
    for _ in range(5):
        t.train_step(x, y)
    after = {variable_name(v): v.numpy() for v in m3.trainable_weights}
    frozen = [n for n in before if not n.startswith(("group3/", "head/"))]
    assert frozen and all(np.array_equal(before[n], after[n]) for n in frozen)
    assert all(not np.array_equal(before[n], after[n]) for n in t.trainable if n.endswith("kernel"))
    path = t.save(tmp_path / "ft.h5")
    r = Trainer.restore(path, verbose=False)
    assert r.trainable == t.trainable and r.step == 5
    pick = Trainer(build_wrn(m3.wrn_config), trainable=lambda name: name.startswith("head/"), verbose=False)
    assert pick.trainable == ["head/bn/gamma", "head/bn/beta", "head/logits/weights", "head/logits/biases"]
    with pytest.raises(ValueError, match="picks no weight"):
        Trainer(build_wrn(m3.wrn_config), trainable=["group9"], verbose=False)


# ------------------------------------------------------------------ padding
def test_old_configs_load_as_same_padding(tmp_path):
    from wrn3d_tl.checkpoint import read_checkpoint, write_checkpoint

    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(8, 8, 3))
    assert cfg.padding == "same" and cfg.to_dict()["padding"] == "same"
    old = {k: v for k, v in cfg.to_dict().items() if k != "padding"}
    assert WRNConfig.from_dict(old) == cfg
    good = Trainer(build_wrn(cfg), verbose=False, normalization=None)
    good.normalization_known = True
    ck = read_checkpoint(good.save(tmp_path / "new.h5"))
    write_checkpoint(tmp_path / "old.h5", config=old, trainer=ck["trainer"], step=0, normalization=None,
                     weights=ck["weights"], optimizer=ck["optimizer"], state=ck["state"])
    assert Trainer.restore(tmp_path / "old.h5", verbose=False).config.padding == "same"
    with pytest.raises(ValueError, match=r"WRNConfig\.padding must be one of \('same', 'symmetric'\)"):
        WRNConfig(depth=10, widen_factor=1, padding="valid")


# ----------------------------------------------------------------------- CLI
def test_convert_cli_writes_an_ordinary_checkpoint(tmp_path, capsys):
    from wrn3d_tl.checkpoint import read_checkpoint
    from wrn3d_tl.predict import predict

    src, x, _ = fixture("wrn10-1-robustbench")
    out = tmp_path / "wrn3d.h5"
    assert main(["--torch", src, "--out", str(out), "--volume-depth", "4", "--in-channels", "1",
                 "--num-classes", "5", "--mean", "0", "--std", "255"]) == 0
    ck = read_checkpoint(out)
    assert ck["config"]["input_shape"] == [4, 32, 32, 1] and ck["config"]["num_classes"] == 5
    assert ck["config"]["padding"] == "symmetric" and ck["normalization"] == {"mean": [0.0], "std": [255.0]}
    grey = (np.repeat(x.mean(-1, keepdims=True)[:, None], 4, axis=1) * 255).astype("float32")
    assert predict(str(out), grey)["class"].shape == (2,)
    assert "wrn3d-convert: WRN-10-1 3D" in capsys.readouterr().err
    bad = [
        (["--torch", str(tmp_path / "none.pt"), "--out", str(out)], "argument --torch: "),
        (["--torch", src, "--out", str(tmp_path)], "--out"),
        (["--torch", src, "--out", str(out), "--num-classes", "5"], "--num-classes 5: needs --volume-depth"),
        (["--torch", os.path.join(FIXTURES, "wrn10-1-robustbench.io.npz"), "--out", str(out)],
         "cannot tell the layout"),
        (["--torch", src, "--out", str(out), "--mean", "0"], "--mean and --std go together"),
    ]
    for argv, message in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("wrn3d-convert: error: ") and message in err[0], err


def test_wrn3d_train_fine_tunes_an_inflated_checkpoint_with_frozen_groups(tmp_path, capsys):
    from wrn3d_tl.checkpoint import read_checkpoint
    from wrn3d_tl.commands import train
    from wrn3d_tl.data import write_hdf5_volumes

    assert main(["--torch", fixture("wrn10-1-robustbench")[0], "--out", str(tmp_path / "init.h5"),
                 "--volume-depth", "2", "--num-classes", "2", "--mean", "0,0,0", "--std", "255,255,255"]) == 0
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 8)
    volumes = rng.uniform(0, 255, (8, 2, 32, 32, 3)).astype("float32")
    write_hdf5_volumes(tmp_path / "mine.h5", volumes, labels, num_classes=2)
    capsys.readouterr()
    assert train.main(["--data", str(tmp_path / "mine.h5"), "--init-from", str(tmp_path / "init.h5"), "--freeze",
                       "stem", "group1", "group2", "--batch-size", "4", "--iters", "3", "--no-report",
                       "--out", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out
    assert f"--init-from {tmp_path / 'init.h5'}: WRN-10-1, padding symmetric" in out
    assert "normalisation: --init-from's" in out  # the file has none: the pretrained units
    init, ft = read_checkpoint(tmp_path / "init.h5"), read_checkpoint(tmp_path / "ft" / "last.h5")
    assert ft["config"] == init["config"] and ft["step"] == 3 and ft["normalization"] == init["normalization"]
    trainable = [n for n in init["weights"] if not n.endswith(("moving_mean", "moving_var"))]
    frozen = [n for n in trainable if n.split("/")[0] in ("stem", "group1", "group2")]
    assert frozen and all(np.array_equal(init["weights"][n], ft["weights"][n]) for n in frozen)
    assert not np.array_equal(init["weights"]["head/logits/weights"], ft["weights"]["head/logits/weights"])
    assert sorted(ft["optimizer"]) == sorted(set(trainable) - set(frozen))
    # a network whose shape is not the data's is named, in one line
    assert train.main(["--data", str(tmp_path / "mine.h5"), "--init-from", fixture_checkpoint(tmp_path),
                       "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--init-from" in err and "but the data has (2, 32, 32, 3) and 2 classes" in err
    assert train.main(["--data", str(tmp_path / "mine.h5"), "--freeze", "layer9"]) == 2
    assert "'layer9' is not a layer prefix" in capsys.readouterr().err


def fixture_checkpoint(tmp_path):
    """The 2D WRN-10-1 of the fixtures as a wrn3d_tl checkpoint (10 classes, 32x32x3)."""
    path = tmp_path / "2d.h5"
    if not path.exists():
        assert main(["--torch", fixture("wrn10-1-robustbench")[0], "--out", str(path)]) == 0
    return str(path)


def test_cifar_script_starts_from_a_converted_checkpoint(cifar_script, tmp_path, capsys):
    from wrn3d_tl.checkpoint import read_checkpoint

    assert main(["--torch", fixture("wrn10-1-robustbench")[0], "--out", str(tmp_path / "init.h5"),
                 "--volume-depth", "2"]) == 0
    cifar_script.main(["--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test", "8",
                       "--volume-depth", "2", "--batch-size", "8", "--iters", "2", "--eval-samples", "8",
                       "--init-from", str(tmp_path / "init.h5"), "--freeze", "stem", "group1",
                       "--checkpoint", str(tmp_path / "ft.h5")])
    assert f"--init-from {tmp_path / 'init.h5'}: WRN-10-1, padding symmetric" in capsys.readouterr().out
    init, ft = read_checkpoint(tmp_path / "init.h5"), read_checkpoint(tmp_path / "ft.h5")
    assert ft["config"] == init["config"] and ft["step"] == 2
    assert np.array_equal(init["weights"]["stem/conv/kernel"], ft["weights"]["stem/conv/kernel"])
    assert np.array_equal(init["weights"]["group1/block1/conv2/kernel"], ft["weights"]["group1/block1/conv2/kernel"])
    assert not np.array_equal(init["weights"]["group3/block1/conv1/kernel"], ft["weights"]["group3/block1/conv1/kernel"])


def test_symmetric_padding_in_the_twin_export_and_counts(wrn10, tmp_path):
    from wrn3d_tl.export import export_saved_model
    from wrn3d_tl.keras_twin import build_keras_wrn, tl_to_keras
    from wrn3d_tl.memory import estimate_memory
    from wrn3d_tl.model import count_flops, count_params

    model, x, want = wrn10
    cfg = model.wrn_config
    twin = tl_to_keras(model, build_keras_wrn(cfg))
    np.testing.assert_allclose(twin(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4)
    served = tf.saved_model.load(export_saved_model(model, str(tmp_path / "sm")))
    np.testing.assert_allclose(served.serve(tf.constant(x))["logits"].numpy(), want, rtol=1e-4, atol=1e-4)
    same = WRNConfig(depth=10, widen_factor=1, input_shape=(32, 32, 3))
    assert count_flops(cfg) == count_flops(same) and estimate_memory(cfg, 8) == estimate_memory(same, 8)
    assert count_params(model) == count_params(build_wrn(same))
