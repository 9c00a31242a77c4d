"""Using a trained model: SavedModel export (served without this library), predict(), wrn3d-predict."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.checkpoint import CheckpointError
from wrn3d_tl.data import Normalization, write_hdf5_volumes
from wrn3d_tl.export import export_saved_model
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.commands.predict import main
from wrn3d_tl.predict import Predictor, predict
from wrn3d_tl.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 16, 16, 3)
CLASSES = 6
MEAN = np.array([120.0, 100.0, 80.0], np.float32)
STD = np.array([60.0, 50.0, 40.0], np.float32)
TOL = 1e-5


def _raw(n, seed=0):
    """Raw volumes in 0..255 units (float32, NDHWC)."""
    return np.random.default_rng(seed).uniform(0, 255, size=(n,) + SHAPE).astype(np.float32)


def _normalised(raw):
    return (raw.astype(np.float32) - MEAN) / STD


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A WRN-10-1 (dropout, so inference mode matters) trained a few steps with
    normalisation, its checkpoint and its SavedModel."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=CLASSES, input_shape=SHAPE, dropout=0.3)
    tf.random.set_seed(0)
    trainer = Trainer(build_wrn(cfg), lr=0.05, normalization=Normalization(MEAN, STD), verbose=False)
    rng = np.random.default_rng(1)
    for _ in range(4):
        raw = _raw(8, seed=int(rng.integers(1 << 30)))
        trainer.train_step(_normalised(raw), rng.integers(0, CLASSES, 8))
    ckpt = trainer.save(str(tmp / "model.h5"))
    saved = export_saved_model(trainer, str(tmp / "saved_model"))
    return dict(trainer=trainer, model=trainer.model, ckpt=ckpt, saved=saved, tmp=tmp)


def _tl_logits(model, x):
    return model(tf.constant(x, tf.float32), is_train=False).numpy()


# ------------------------------------------------------------------ SavedModel

@pytest.mark.slow  # a second TensorFlow process; fast tier: test_reading's raw scans served by TensorFlow alone
def test_saved_model_serves_without_wrn3d_tl_or_tensorlayer(trained):
    raw = _raw(5, seed=7)
    np.save(trained["tmp"] / "raw.npy", raw)
    out_path = trained["tmp"] / "served_logits.npy"
    code = (
        "import sys, json, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({trained['saved']!r})\n"
        f"x = np.load({str(trained['tmp'] / 'raw.npy')!r})\n"
        "out = m.signatures['serving_default'](volumes=tf.constant(x))\n"
        "assert sorted(out) == ['logits', 'probabilities'], sorted(out)\n"
        "out8 = m.signatures['serving_uint8'](volumes=tf.constant(np.round(x).astype(np.uint8)))\n"
        "assert out8['logits'].shape == out['logits'].shape\n"
        "meta = json.loads(m.metadata().numpy())\n"
        "assert meta['layout'] == 'NDHWC' and meta['config']['num_classes'] == out['logits'].shape[1]\n"
        f"np.save({str(out_path)!r}, out['logits'].numpy())\n"
        "assert 'tensorlayer' not in sys.modules, 'tensorlayer imported'\n"
        "assert not any(k == 'wrn3d_tl' or k.startswith('wrn3d_tl.') for k in sys.modules), 'wrn3d_tl imported'\n"
        "print('SERVED-OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # cwd outside the repo, no PYTHONPATH: the library is not even importable by accident.
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(trained["tmp"]), env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "SERVED-OK" in proc.stdout, proc.stderr[-3000:]
    served = np.load(out_path)
    np.testing.assert_allclose(served, _tl_logits(trained["model"], _normalised(raw)), atol=TOL, rtol=0)


def test_saved_model_logits_equal_tl_inference(trained):
    served = tf.saved_model.load(trained["saved"])
    raw = _raw(7, seed=3)
    ref = _tl_logits(trained["model"], _normalised(raw))
    out = served.signatures["serving_default"](volumes=tf.constant(raw))
    np.testing.assert_allclose(out["logits"].numpy(), ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(out["probabilities"].numpy(), tf.nn.softmax(ref).numpy(), atol=TOL, rtol=0)
    # Inference mode: no dropout, so repeated calls agree exactly; batch size is free.
    again = served.serve(tf.constant(raw[:2]))["logits"].numpy()
    np.testing.assert_allclose(again, out["logits"].numpy()[:2], atol=TOL, rtol=0)
    # uint8 signature = float32 signature on the same (integer) values.
    ints = np.round(raw).astype(np.uint8)
    a = served.signatures["serving_uint8"](volumes=tf.constant(ints))["logits"].numpy()
    b = served.signatures["serving_default"](volumes=tf.constant(ints.astype(np.float32)))["logits"].numpy()
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    # Signature calls do not enforce the declared shape by themselves; the graph does.
    for bad in (raw[:, :, :, :8], raw[0], raw[..., :2], raw[None]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"volumes must have shape \(N,\) \+ \(4, 16, 16, 3\)"):
            served.signatures["serving_default"](volumes=tf.constant(bad))


def test_normalization_is_baked_in_and_none_passes_through(trained, tmp_path):
    served = tf.saved_model.load(trained["saved"])
    raw = _raw(4, seed=11)
    meta = json.loads(served.metadata().numpy())
    np.testing.assert_allclose(meta["normalization"]["mean"], MEAN)
    np.testing.assert_allclose(meta["normalization"]["std"], STD)
    got = served.signatures["serving_default"](volumes=tf.constant(raw))["logits"].numpy()
    np.testing.assert_allclose(got, _tl_logits(trained["model"], (raw - MEAN) / STD), atol=TOL, rtol=0)
    # The raw input is NOT what the network sees.
    assert np.abs(got - _tl_logits(trained["model"], raw)).max() > 1e-3
    # serving_preprocessed takes what the training pipeline fed the network: normalised already
    pre = served.signatures["serving_preprocessed"](volumes=tf.constant(_normalised(raw)))["logits"].numpy()
    np.testing.assert_allclose(pre, got, atol=TOL, rtol=0)

    # A bare model (no stats): the input passes unchanged.
    bare = export_saved_model(trained["model"], str(tmp_path / "bare"))
    plain = tf.saved_model.load(bare)
    x = _normalised(raw)
    np.testing.assert_allclose(plain.signatures["serving_default"](volumes=tf.constant(x))["logits"].numpy(),
                               _tl_logits(trained["model"], x), atol=TOL, rtol=0)
    assert json.loads(plain.metadata().numpy())["normalization"] is None
    # An explicit normalization overrides the trainer's.
    other = {"mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]}
    over = tf.saved_model.load(export_saved_model(trained["trainer"], str(tmp_path / "over"), normalization=other))
    np.testing.assert_allclose(over.serve(tf.constant(raw))["logits"].numpy(),
                               _tl_logits(trained["model"], raw / 255.0), atol=TOL, rtol=0)


def test_export_keeps_training_working_and_checks_arguments(trained, tmp_path):
    trainer = trained["trainer"]
    with pytest.raises(TypeError, match="build_wrn"):
        export_saved_model(object(), str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"normalization has 1 channels but input_shape \(4, 16, 16, 3\) has 3"):
        export_saved_model(trainer, str(tmp_path / "x"), normalization={"mean": [0.0], "std": [1.0]})
    with pytest.raises(ValueError, match=r"std must be > 0"):
        export_saved_model(trainer, str(tmp_path / "x"), normalization={"mean": [0.0] * 3, "std": [1.0, 0.0, 1.0]})
    # Exporting traced the model in inference mode; a train step afterwards still trains
    # (batch statistics move), i.e. the layers' modes were restored.
    bn = next(layer for layer in trainer.model.all_layers if layer.name == "head/bn")
    before = bn.moving_mean.numpy().copy()
    m = trainer.train_step(_normalised(_raw(8, seed=5)), np.arange(8) % CLASSES)
    assert np.isfinite(m["loss"])
    assert np.abs(bn.moving_mean.numpy() - before).max() > 0
    # restore the trainer for the other tests
    trainer.load(trained["ckpt"])


def test_export_2d_config(tmp_path):
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(8, 8, 2))
    model = build_wrn(cfg)
    norm = {"mean": [1.0, 2.0], "std": [2.0, 4.0]}
    served = tf.saved_model.load(export_saved_model(model, str(tmp_path / "sm2d"), normalization=norm))
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype(np.float32)
    ref = _tl_logits(model, (x - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32))
    np.testing.assert_allclose(served.signatures["serving_default"](volumes=tf.constant(x))["logits"].numpy(), ref,
                               atol=TOL, rtol=0)
    assert json.loads(served.metadata().numpy())["layout"] == "NHWC"


# --------------------------------------------------------------------- predict

def _manual(model, raw):
    logits = _tl_logits(model, _normalised(raw))
    return logits, tf.nn.softmax(logits).numpy()


def test_predict_matches_manual_inference(trained, tmp_path):
    raw = _raw(11, seed=21)
    logits, probs = _manual(trained["model"], raw)
    out = predict(trained["ckpt"], raw, batch_size=4, top_k=3)
    assert out["class"].shape == (11,) and out["top_k_classes"].shape == (11, 3)
    np.testing.assert_array_equal(out["class"], logits.argmax(1))
    np.testing.assert_allclose(out["probability"], probs.max(1), atol=TOL)
    np.testing.assert_allclose(out["logits"], logits, atol=TOL, rtol=0)
    np.testing.assert_array_equal(out["top_k_classes"], np.argsort(-probs, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(out["top_k_probabilities"], -np.sort(-probs, axis=1)[:, :3], atol=TOL)
    assert np.all(np.diff(out["top_k_probabilities"], axis=1) <= 0)

    # top_k larger than num_classes is clipped; a Predictor is reusable.
    pred = Predictor(trained["ckpt"])
    assert pred.normalization == {"mean": MEAN.tolist(), "std": STD.tolist()}
    full = predict(pred, raw, top_k=50)
    assert full["top_k_classes"].shape == (11, CLASSES)

    # HDF5 (path + key) and .npy sources, streamed in batches, give the same answer.
    h5 = str(tmp_path / "vols.h5")
    write_hdf5_volumes(h5, raw, np.zeros(11, np.int64), x_key="test/volumes", y_key="test/labels")
    from_h5 = predict(pred, h5, key="test/volumes", batch_size=5)
    np.testing.assert_allclose(from_h5["logits"], logits, atol=TOL, rtol=0)
    npy = str(tmp_path / "vols.npy")
    np.save(npy, raw)
    np.testing.assert_allclose(predict(pred, npy, batch_size=100)["logits"], logits, atol=TOL, rtol=0)

    # Documented conversions: float64 and integer volumes become float32.
    np.testing.assert_allclose(predict(pred, raw.astype(np.float64))["logits"], logits, atol=TOL, rtol=0)
    ints = np.round(raw).astype(np.int32)
    ref_int, _ = _manual(trained["model"], ints.astype(np.float32))
    np.testing.assert_allclose(predict(pred, ints)["logits"], ref_int, atol=TOL, rtol=0)
    np.testing.assert_allclose(predict(pred, ints.astype(np.uint8))["logits"], ref_int, atol=TOL, rtol=0)
    # A Trainer works too (its current weights and normalisation).
    np.testing.assert_allclose(predict(trained["trainer"], raw)["logits"], logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("make, pattern", [
    (lambda: _raw(2)[0], r"single volume\? add a batch axis"),
    (lambda: _raw(2)[..., 0], r"expected a 5-D NDHWC array"),
    (lambda: _raw(2)[:, :, :8], r"spatial shape \(4, 8, 16\)"),
    (lambda: _raw(2)[..., :1], r"1 channel\(s\).*expects 3"),
    (lambda: np.zeros((0,) + SHAPE, np.float32), r"no volumes"),
    (lambda: np.where(np.arange(2)[:, None, None, None, None] == 1, np.nan, _raw(2)), r"volume 1 contains NaN"),
    (lambda: np.full((2,) + SHAPE, 1e300), r"volume 0 contains NaN or Inf \(or a value beyond the float32"),
    (lambda: _raw(2) > 100, r"real numbers"),
])
def test_predict_rejects_bad_volumes(trained, make, pattern):
    pred = Predictor(trained["ckpt"])
    with pytest.raises(ValueError, match=pattern):
        predict(pred, make())


def test_predict_rejects_bad_files(trained, tmp_path):
    raw = _raw(2)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        predict(trained["ckpt"], str(tmp_path / "missing.h5"))
    h5 = str(tmp_path / "v.h5")
    write_hdf5_volumes(h5, raw, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"no dataset at key 'nope'; datasets present: \['labels', 'volumes'\]"):
        predict(trained["ckpt"], h5, key="nope")
    with pytest.raises(CheckpointError, match="not a wrn3d_tl checkpoint"):
        predict(h5, raw)
    with pytest.raises(FileNotFoundError, match="nothere.h5"):
        predict(str(tmp_path / "nothere.h5"), raw)


# ------------------------------------------------------------------------- CLI

def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_writes_csv(trained, tmp_path, capsys):
    raw = _raw(9, seed=4)
    h5 = str(tmp_path / "data.h5")
    write_hdf5_volumes(h5, raw, np.zeros(9, np.int64))
    out = str(tmp_path / "preds.csv")
    assert main(["--checkpoint", trained["ckpt"], "--hdf5", h5, "--out", out, "--batch-size", "4"]) == 0
    rows = _read_csv(out)
    assert len(rows) == 9
    assert list(rows[0]) == ["index", "class", "probability", "top5", "top5_probabilities"]
    logits, probs = _manual(trained["model"], raw)
    for i, row in enumerate(rows):
        assert int(row["index"]) == i
        assert int(row["class"]) == int(logits[i].argmax())
        assert abs(float(row["probability"]) - probs[i].max()) < 1e-5
        top = [int(c) for c in row["top5"].split()]
        assert top == list(np.argsort(-probs[i], kind="stable")[:5])
        tp = [float(p) for p in row["top5_probabilities"].split()]
        np.testing.assert_allclose(tp, probs[i][top], atol=1e-5)
    # --npy and --key.
    npy = str(tmp_path / "data.npy")
    np.save(npy, raw[:3].astype(np.float64))
    out2 = str(tmp_path / "preds2.csv")
    assert main(["--checkpoint", trained["ckpt"], "--npy", npy, "--out", out2]) == 0
    assert [r["class"] for r in _read_csv(out2)] == [r["class"] for r in rows[:3]]
    write_hdf5_volumes(h5, raw[:2], np.zeros(2, np.int64), x_key="other", y_key="other_y", mode="a")
    out3 = str(tmp_path / "preds3.csv")
    assert main(["--checkpoint", trained["ckpt"], "--hdf5", h5, "--key", "other", "--out", out3]) == 0
    assert len(_read_csv(out3)) == 2


def _bad_cases(tmp, ckpt):
    raw = _raw(3)
    paths = {}

    def h5(name, arr, **kw):
        p = str(tmp / name)
        write_hdf5_volumes(p, arr, np.zeros(len(arr), np.int64), **kw)
        return p

    def npy(name, arr):
        p = str(tmp / name)
        np.save(p, arr)
        return p

    paths["good"] = h5("good.h5", raw)
    nan = raw.copy()
    nan[2, 1, 2, 3, 0] = np.nan
    text = tmp / "notes.txt"
    text.write_text("not a checkpoint\n")
    return [
        # (argv, regex on the one-line message)
        (["--hdf5", npy("rank.npy", raw[..., 0])], r"--hdf5 .*rank\.npy: not an HDF5 file"),
        (["--npy", npy("rank.npy", raw[..., 0])], r"--npy .*rank\.npy.*expected a 5-D NDHWC array"),
        (["--hdf5", h5("spatial.h5", raw[:, :, :8])], r"--hdf5 .*spatial\.h5.*spatial shape \(4, 8, 16\)"),
        (["--hdf5", h5("chan.h5", raw[..., :1])], r"--hdf5 .*chan\.h5.*1 channel\(s\)"),
        (["--npy", npy("nan.npy", nan)], r"--npy .*nan\.npy.*volume 2 contains NaN"),
        (["--npy", npy("empty.npy", np.zeros((0,) + SHAPE, np.float32))], r"--npy .*empty\.npy.*no volumes"),
        (["--hdf5", str(tmp / "missing.h5")], r"--hdf5 .*missing\.h5: no such file"),
        (["--hdf5", paths["good"], "--key", "nokey"], r"--hdf5 .*good\.h5.*no dataset at key 'nokey'"),
        (["--npy", str(text)], r"--npy .*notes\.txt.*is not a \.npy file \(it does not start with numpy's magic"),
        (["--hdf5", paths["good"], "--checkpoint", paths["good"]],
         r"--checkpoint .*good\.h5.*not a wrn3d_tl checkpoint"),
        (["--hdf5", paths["good"], "--checkpoint", str(text)], r"--checkpoint .*notes\.txt.*not a readable HDF5"),
        (["--hdf5", paths["good"], "--checkpoint", str(tmp / "nockpt.h5")],
         r"--checkpoint .*nockpt\.h5.*does not exist"),
        (["--hdf5", paths["good"], "--batch-size", "0"], r"argument --batch-size: expected a positive int, got '0'"),
        (["--hdf5", paths["good"], "--out", str(tmp / "nodir" / "p.csv")], r"--out .*nodir.*does not exist"),
    ]


def test_cli_bad_inputs_exit_2_with_one_line(trained, tmp_path, capsys):
    for argv, pattern in _bad_cases(tmp_path, trained["ckpt"]):
        full = list(argv) if "--checkpoint" in argv else argv + ["--checkpoint", trained["ckpt"]]
        if "--out" not in full:
            full += ["--out", str(tmp_path / "p.csv")]
        capsys.readouterr()
        assert main(full) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
        assert err.startswith("wrn3d-predict: error: "), err
        assert re.search(pattern, err), (pattern, err)
        assert not os.path.exists(tmp_path / "p.csv"), "no CSV may be left behind on error"
        assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    # argparse errors (missing source) also exit 2.
    assert main(["--checkpoint", trained["ckpt"], "--out", "x.csv"]) == 2


@pytest.mark.slow     # a fresh process (TensorFlow and the model loaded): the in-process main() tests above are its fast side
def test_cli_as_a_process_exits_2_with_only_our_line(trained, tmp_path):
    """As a process, with TF_CPP_MIN_LOG_LEVEL unset (the CLI quiets TensorFlow's C++ log
    itself): after TensorFlow and the model are loaded, a bad input gives exit status 2 and
    stderr holds our one line, no traceback and no TensorFlow chatter."""
    bad = str(tmp_path / "bad.npy")
    np.save(bad, _raw(2)[..., :2])
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "wrn3d_tl.commands.predict", "--checkpoint", trained["ckpt"], "--npy", bad,
                           "--out", str(tmp_path / "p.csv")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrn3d-predict: error: --npy "), proc.stderr[-2000:]
    assert "2 channel(s)" in lines[0] and "bad.npy" in lines[0]


def test_export_of_a_model_built_under_a_strategy(two_cpu_strategy, tmp_path):
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(2, 8, 8, 3))
    with two_cpu_strategy.scope():
        model = build_wrn(cfg)
    with two_cpu_strategy.scope(), pytest.raises(RuntimeError, match="outside `strategy.scope"):
        export_saved_model(model, str(tmp_path / "inside"))
    served = tf.saved_model.load(export_saved_model(model, str(tmp_path / "mirrored")))
    x = np.random.default_rng(2).normal(size=(3, 2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(served.serve(tf.constant(x))["logits"].numpy(), _tl_logits(model, x),
                               atol=TOL, rtol=0)


# ------------------------------------------------------------------ bf16 inference

def _conv_dtypes(concrete):
    return {op.get_attr("T").name for op in concrete.graph.get_operations() if op.type in ("Conv3D", "Conv2D")}


def test_bf16_inference_in_predictor_export_and_cli(trained, tmp_path, capsys):
    from wrn3d_tl.commands.predict import main as predict_main

    raw = _raw(12, seed=31)
    fp32_predictor = Predictor(trained["ckpt"])
    fp32 = fp32_predictor.predict(raw)
    bf16 = Predictor(trained["ckpt"], precision="bf16")
    assert bf16.precision == "bf16"
    got = bf16.predict(raw)
    # the same network run in bfloat16 by hand: fp32 kernels cast to bf16 on the way in (fed
    # the same normalised input: a 1-ulp difference in it can change its bf16 rounding)
    x = _normalised(raw)
    by_hand = trained["model"](tf.cast(x, tf.bfloat16), is_train=False).numpy()
    np.testing.assert_allclose(Predictor(trained["model"], precision="bf16").predict(x)["logits"], by_hand,
                               atol=1e-5, rtol=0)
    assert got["logits"].dtype == got["probabilities"].dtype == np.float32
    diff = np.abs(got["logits"] - fp32["logits"]).max()
    assert 0 < diff < 0.05 * np.abs(fp32["logits"]).max()  # it did compute in bf16, and closely
    # kernels are stored in bf16 (no cast per call) and every convolution computes in bf16
    kernels = [v for v in bf16.model.trainable_weights if "conv" in v.name or "shortcut" in v.name]
    assert kernels and {v.dtype for v in kernels} == {tf.bfloat16}
    assert _conv_dtypes(bf16.inference_graph) == {"bfloat16"}
    assert _conv_dtypes(fp32_predictor.inference_graph) == {"float32"}

    # the SavedModel: same logits, bf16 kernels on disk (a smaller file), precision in its metadata
    path = export_saved_model(trained["ckpt"], str(tmp_path / "bf16"), precision="bf16")
    served = tf.saved_model.load(path)
    out = served.signatures["serving_default"](volumes=tf.constant(raw))
    np.testing.assert_allclose(out["logits"].numpy(), got["logits"], atol=1e-5, rtol=0)
    assert json.loads(served.metadata().numpy())["precision"] == "bf16"
    assert json.loads(tf.saved_model.load(trained["saved"]).metadata().numpy())["precision"] == "fp32"

    def size(folder):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(folder, "variables"))
                   for f in fs)
    assert size(path) < 0.75 * size(trained["saved"])

    # wrn3d-predict --precision bf16
    npy, csv_out = str(tmp_path / "x.npy"), str(tmp_path / "p.csv")
    np.save(npy, raw)
    assert predict_main(["--checkpoint", trained["ckpt"], "--npy", npy, "--out", csv_out, "--precision", "bf16"]) == 0
    assert [int(r["class"]) for r in _read_csv(csv_out)] == list(got["class"])
    assert predict_main(["--checkpoint", trained["ckpt"], "--npy", npy, "--out", csv_out, "--precision", "fp16"]) == 2
    assert "--precision" in capsys.readouterr().err
    # where bf16 cannot run (oneDNN capped to AVX2 on a bf16 CPU): one line, not a traceback
    from wrn3d_tl import cpu
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "has_bf16_instructions", lambda: True)
        mp.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert predict_main(["--checkpoint", trained["ckpt"], "--npy", npy, "--out", csv_out,
                             "--precision", "bf16"]) != 0
    err = capsys.readouterr().err
    assert "bf16 inference refused: oneDNN is capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    # precision is checked, and a Predictor is not silently used in another precision
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', got 'fp16'"):
        Predictor(trained["ckpt"], precision="fp16")
    with pytest.raises(ValueError, match="precision='fp32', but the Predictor given computes in 'bf16'"):
        predict(bf16, raw, precision="fp32")
    np.testing.assert_array_equal(predict(bf16, raw)["logits"], got["logits"])
    with pytest.raises(ValueError, match="precision must be one of"):
        export_saved_model(trained["ckpt"], str(tmp_path / "bad"), precision="float16")


def test_inference_copy_is_a_checked_snapshot(two_cpu_strategy):
    from wrn3d_tl.model import inference_copy

    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(2, 8, 8, 3))
    trainer = Trainer(build_wrn(cfg), verbose=False)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 2, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, 4)
    trainer.train_step(x, y)
    copy = inference_copy(trainer.model, "bf16")
    for dst, src in zip(copy.all_weights, trainer.model.all_weights):
        conv_kernel = src.name.endswith("kernel:0") and "logits" not in src.name
        assert dst.dtype == (tf.bfloat16 if conv_kernel else tf.float32), src.name
        np.testing.assert_array_equal(dst.numpy(), tf.cast(src, dst.dtype).numpy())
    # a snapshot: later training does not reach a bf16 Predictor; a fp32 one reads the live weights
    live, frozen = Predictor(trainer), Predictor(trainer, precision="bf16")
    before = live.predict(x)["logits"], frozen.predict(x)["logits"]
    trainer.train_step(x, y)
    assert np.abs(live.predict(x)["logits"] - before[0]).max() > 1e-4
    np.testing.assert_array_equal(frozen.predict(x)["logits"], before[1])
    # refused: training an inference copy, a copy inside a strategy scope, another network's weights
    with pytest.raises(ValueError, match="model: its weights must be float32 to train, it has bfloat16 ones"):
        Trainer(copy, verbose=False)
    with two_cpu_strategy.scope(), pytest.raises(RuntimeError, match="outside `strategy.scope"):
        inference_copy(trainer.model, "bf16")
    other = build_wrn(WRNConfig(depth=10, widen_factor=2, num_classes=3, input_shape=(2, 8, 8, 3)))
    other.wrn_config = cfg
    with pytest.raises(ValueError, match="inference_copy: model's weights are not those of build_wrn"):
        inference_copy(other, "bf16")


def test_compiled_functions_are_traced_without_autograph(tmp_path, monkeypatch):
    """The step, evaluation, inference, Grad-CAM and the SavedModel's signatures are traced
    as written (wrn3d_tl.model.graph_function): AutoGraph converts none of our or
    TensorLayer's code, the rewrite that cost most of a first step's tracing."""
    from tensorflow.python.autograph.impl import api

    from wrn3d_tl.explain import grad_cam

    converted = []
    convert = api.converted_call

    def spy(f, *args, **kwargs):
        converted.append(getattr(f, "__module__", None) or "")
        return convert(f, *args, **kwargs)

    monkeypatch.setattr(api, "converted_call", spy)
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(2, 8, 8, 1))
    x = np.random.default_rng(0).normal(size=(4,) + cfg.input_shape).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    trainer = Trainer(build_wrn(cfg), (x, y), batch_size=4, normalization=Normalization([0.0], [1.0]), verbose=False)
    assert np.isfinite(trainer.train_step()["loss"])
    assert trainer.evaluate((x, y))["samples"] == 4
    predictor = Predictor(trainer)
    assert predictor.predict(x)["probabilities"].shape == (4, 3)
    assert grad_cam(predictor, x[:2]).shape == (2, 2, 8, 8)
    export_saved_model(trainer, str(tmp_path / "sm"))
    assert converted, "the spy saw no call at all: TensorFlow's AutoGraph entry point moved"
    ours = [m for m in converted if m.split(".")[0] in ("wrn3d_tl", "tensorlayer")]
    assert ours == []


def test_one_resolver_for_paths_trainers_predictors_and_models(trained):
    """Predictor, export_saved_model and inflate take the same things, through
    wrn3d_tl.loading.resolve: a checkpoint path, a Trainer or Predictor, a build_wrn model."""
    from wrn3d_tl.loading import resolve

    x = _normalised(_raw(2, seed=9))
    want = _tl_logits(trained["model"], x)
    from_path = resolve(trained["ckpt"])
    assert from_path.source == trained["ckpt"] and from_path.normalization == {"mean": MEAN.tolist(),
                                                                               "std": STD.tolist()}
    for source in (trained["trainer"], Predictor(trained["ckpt"]), trained["model"]):
        loaded = resolve(source)
        assert loaded.config == from_path.config
        np.testing.assert_allclose(_tl_logits(loaded.model, x), want, rtol=1e-5, atol=1e-5)
        assert loaded.normalization == (None if source is trained["model"] else from_path.normalization)
    assert resolve(trained["model"]).source == "model" and resolve(trained["trainer"]).source == "trainer"
    with pytest.raises(TypeError, match=r"^checkpoint must be a checkpoint path, a wrn3d_tl Trainer or Predictor"):
        Predictor(3)
