"""A newcomer's usual mistakes (issue 11): each gives one clear line or the documented
behaviour, never a silent wrong result."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(2, 8, 8, 3))


def _one_line_exit(capsys, call):
    with pytest.raises(SystemExit) as info:
        call()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------- the model
def test_model_refuses_a_volume_without_its_batch_axis_like_train_step():
    tf.random.set_seed(0)
    model = build_wrn(CFG)
    trainer = Trainer(model, verbose=False)
    one = np.zeros(CFG.input_shape, "float32")
    with pytest.raises(ValueError) as from_model:
        model(one, is_train=False)
    with pytest.raises(ValueError) as from_step:
        trainer.train_step(one, np.zeros(2, "int64"))
    assert str(from_model.value).startswith(
        "model: x must have shape (batch,) + (2, 8, 8, 3) (NDHWC), got (2, 8, 8, 3)")
    assert str(from_model.value).split(": ", 1)[1] == str(from_step.value).split(": ", 1)[1]
    with pytest.raises(ValueError, match=r"got \(4, 2, 8, 8, 1\)"):
        model(np.zeros((4, 2, 8, 8, 1), "float32"), is_train=True)
    # a shape unknown until run time is checked in the graph
    fn = tf.function(lambda x: model(x, is_train=False), input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"model: x must have shape"):
        fn(tf.constant(one))
    assert fn(tf.zeros((2,) + CFG.input_shape)).shape == (2, 3)


# --------------------------------------------------------- the scripts' flags
@pytest.mark.parametrize("argv,flag", [
    (["--iters", "0"], "argument --iters: expected a positive int, got '0'"),
    (["--epochs", "0"], "argument --epochs: expected a number > 0, got '0'"),
    (["--depth", "11"], "--depth 11: must be an int of the form 6n + 4"),
    (["--width", "0"], "--width 0: must be an int >= 1"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive int, got '0'"),
    (["--dropout", "1"], "--dropout 1.0: must be a float in [0, 1)"),
    (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder: no such file or folder"),
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint"),
])
def test_cifar_script_flags_fail_in_one_line(cifar_script, capsys, argv, flag):
    line = _one_line_exit(capsys, lambda: cifar_script.parse_args(argv))
    assert ": error: " in line and flag in line.split(": error: ", 1)[1]


def test_wrn3d_train_files_and_flags_fail_in_one_line_before_training(tmp_path, capsys, monkeypatch):
    import h5py

    from wrn3d_tl.commands import train
    from wrn3d_tl.data import write_hdf5_volumes

    write_hdf5_volumes(tmp_path / "ok.h5", np.zeros((4, 2, 8, 8, 1), "float32"), [0, 1, 1, 0], num_classes=2)
    write_hdf5_volumes(tmp_path / "other_shape.h5", np.zeros((4, 2, 12, 12, 1), "float32"), [0, 1, 1, 0])
    write_hdf5_volumes(tmp_path / "one_class.h5", np.zeros((4, 2, 8, 8, 1), "float32"), [0, 0, 0, 0])
    with h5py.File(tmp_path / "float_label.h5", "w") as f:
        f["volumes"] = np.zeros((4, 2, 8, 8, 1), "float32")
        f["labels"] = np.array([0.0, 1.0, 1.0, 0.0])
    (tmp_path / "notes.h5").write_text("hello")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("training started"))
    ok = str(tmp_path / "ok.h5")
    cases = [
        (["--data", str(tmp_path / "missing.h5")], "--data " + str(tmp_path / "missing.h5") + ": no such file"),
        (["--data", ok, "--val", str(tmp_path / "other_shape.h5")],
         "its volumes have shape (2, 12, 12, 1), the training volumes (2, 8, 8, 1)"),
        (["--data", str(tmp_path / "one_class.h5")], "num_classes must be an int >= 2"),
        (["--data", ok, "--out", str(tmp_path / "a_file")], "is a file; give a folder"),
        (["--data", ok, "--resume"], "--resume: no verified checkpoint in"),
        (["--data", str(tmp_path / "float_label.h5")], "labels must be integers, got dtype float64"),
        (["--data", str(tmp_path / "notes.h5")], "is not an HDF5 file"),
        (["--data", ok, "--batch-size", "0"], "argument --batch-size: expected a positive int, got '0'"),
        (["--data", ok, "--iters", "0"], "argument --iters: expected a positive int, got '0'"),
        (["--data", ok, "--epochs", "0"], "argument --epochs: expected a number > 0, got '0'"),
        (["--data", ok, "--depth", "11"], "--depth 11: must be an int of the form 6n + 4"),
        (["--data", ok, "--width", "0"], "--width 0: must be an int >= 1"),
    ]
    for argv, expected in cases:
        assert train.main([*argv, *([] if "--out" in argv else ["--out", str(tmp_path / "run")])]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wrn3d-train: error: ") and expected in lines[0], (argv, lines)


def test_help_is_fast_and_shows_every_default():
    code = ("import runpy, sys\n"
            "sys.argv = ['cifar_wide_resnet_tl.py', '--help']\n"
            "try:\n    runpy.run_path({!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TF-IMPORTED' if 'tensorflow' in sys.modules else 'TF-NOT-IMPORTED')\n")
    for path, lr in ((os.path.join(ROOT, "examples", "cifar_wide_resnet_tl.py"), "0.1"),
                     (os.path.join(ROOT, "wrn3d_tl", "commands", "train.py"), "0.05")):
        out = subprocess.run([sys.executable, "-c", code.format(path)], capture_output=True, text=True,
                             timeout=60, cwd=ROOT).stdout
        assert out.rstrip().endswith("TF-NOT-IMPORTED"), out[-300:]
        assert "(default: 16)" in " ".join(out.split()) and f"(default: {lr})" in " ".join(out.split())
    cifar = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "cifar_wide_resnet_tl.py"), "--help"],
                           capture_output=True, text=True, timeout=60).stdout
    cifar = " ".join(cifar.split())
    assert "(default: step)" in cifar and "wrn3d-train defaults to cosine" in cifar
    assert "Not the whole process" in cifar


# ---------------------------------------------------------------- predict CLI
@pytest.fixture
def checkpoint(tmp_path):
    tf.random.set_seed(0)
    trainer = Trainer(build_wrn(CFG), normalization={"mean": [10.0, 20.0, 30.0], "std": [2.0, 4.0, 8.0]},
                      verbose=False)
    return trainer.save(tmp_path / "c.h5")


def test_predict_cli_checks_out_and_input_type_before_inference(checkpoint, tmp_path, capsys, monkeypatch):
    import wrn3d_tl.commands.predict as predict

    np.save(tmp_path / "x.npy", np.zeros((2,) + CFG.input_shape, "float32"))
    (tmp_path / "notes.txt").write_text("a note, not an array")
    (tmp_path / "outdir").mkdir()
    monkeypatch.setattr(predict, "Predictor", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = [
        (["--npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "outdir")], "--out", "is a folder"),
        (["--npy", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "p.csv")], "--npy",
         "is not a .npy file (it does not start with numpy's magic bytes"),
        (["--hdf5", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")], "--hdf5", "not an HDF5 file"),
    ]
    for argv, flag, message in cases:
        code = predict.main(["--checkpoint", checkpoint, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"wrn3d-predict: error: {flag} "), err
        assert message in err[0]
    assert predict.main(["--checkpoint", checkpoint, "--npy", str(tmp_path / "x.npy"), "--out", "p.csv",
                         "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == \
        "wrn3d-predict: error: argument --batch-size: expected a positive int, got '0'"


def test_huge_finite_volumes_behave_as_documented(checkpoint):
    """docs/faults.md: predict does not range-check finite inputs. Logits that stay finite
    (however huge) are returned; logits that overflow are refused, naming the volume."""
    from wrn3d_tl.predict import predict

    out = predict(checkpoint, np.full((2,) + CFG.input_shape, 1e25, "float32"))
    assert np.all(np.isfinite(out["logits"])) and np.abs(out["logits"]).max() > 1e20
    assert np.all(out["probability"] == 1.0)
    with pytest.raises(ValueError, match="volume 0 gives non-finite logits"):
        predict(checkpoint, np.full((2,) + CFG.input_shape, 3e38, "float32"))
    text = open(os.path.join(ROOT, "docs", "faults.md")).read()
    row = [line for line in text.splitlines() if line.startswith("| finite but huge volumes") and "predict" in line]
    assert len(row) == 1 and "not range-checked" in row[0] and "gives non-finite logits" in row[0], row


# ---------------------------------------------------- files, export and its CLI
def test_write_hdf5_volumes_creates_its_folder(tmp_path):
    from wrn3d_tl.data import write_hdf5_volumes

    info = write_hdf5_volumes(tmp_path / "new" / "deeper" / "v.h5", np.zeros((2, 2, 8, 8, 1), "uint8"), [0, 1])
    assert info.n == 2 and (tmp_path / "new" / "deeper" / "v.h5").is_file()


def test_export_takes_a_checkpoint_path_and_the_cli_writes_a_servable_model(checkpoint, tmp_path, capsys):
    from wrn3d_tl.commands.export import main
    from wrn3d_tl.export import export_saved_model
    from wrn3d_tl.predict import predict

    raw = np.random.default_rng(0).uniform(0, 60, (3,) + CFG.input_shape).astype("float32")
    want = predict(checkpoint, raw)["logits"]
    served = tf.saved_model.load(export_saved_model(checkpoint, str(tmp_path / "api")))
    np.testing.assert_allclose(served.serve(tf.constant(raw))["logits"].numpy(), want, atol=1e-4, rtol=1e-4)
    meta = json.loads(served.metadata().numpy())  # a scalar string tensor holding JSON
    assert meta["normalization"] == {"mean": [10.0, 20.0, 30.0], "std": [2.0, 4.0, 8.0]} and meta["layout"] == "NDHWC"
    assert main(["--checkpoint", checkpoint, "--out", str(tmp_path / "cli")]) == 0
    cli = tf.saved_model.load(str(tmp_path / "cli"))
    np.testing.assert_allclose(cli.signatures["serving_default"](volumes=tf.constant(raw))["logits"].numpy(), want,
                               atol=1e-4, rtol=1e-4)
    assert "wrn3d-export: SavedModel of WRN-10-1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--checkpoint", checkpoint, "--out", str(tmp_path / "file")]) == 2
    assert main(["--checkpoint", str(tmp_path / "none.h5"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"wrn3d-export: error: --out {tmp_path / 'file'}: is a file; give a folder for the SavedModel"
    assert err[1].startswith(f"wrn3d-export: error: --checkpoint {tmp_path / 'none.h5'}: ")
    # the graph's shape error shows the whole shape
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        cli.signatures["serving_default"](volumes=tf.zeros((2, 2, 8, 8, 1)))
    assert "volumes must have shape (N,) + (2, 8, 8, 3) (NDHWC); got shape:] [2 2 8 8 1]" in str(info.value)


# ------------------------------------------------------------------ --resume
def test_resume_applies_precision_extends_constant_and_refuses_the_rest(cifar_script, tmp_path, capsys):
    common = ["--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "16", "--depth", "10",
              "--width", "1", "--volume-depth", "2", "--batch-size", "8", "--eval-samples", "16",
              "--checkpoint", str(tmp_path / "run" / "last.h5"), "--logdir", str(tmp_path / "logs")]
    cifar_script.main([*common, "--iters", "4", "--schedule", "step", "--checkpoint-every", "2"])
    capsys.readouterr()
    refusals = [
        (["--iters", "4", "--schedule", "step", "--lr", "0.05", "--resume"], "--lr 0.05 (stored 0.1)"),
        (["--iters", "4", "--schedule", "cosine", "--resume"], "--schedule cosine (stored 'step')"),
        (["--iters", "8", "--schedule", "step", "--resume"], "--iters/--epochs: 8 steps (stored plan: 4 steps on the "
                                                               "step schedule"),
    ]
    for extra, expected in refusals:
        message = _one_line_exit(capsys, lambda: cifar_script.main([*common, *extra]))
        assert ": error: --resume: " in message and expected in message, message
        assert "iter " not in capsys.readouterr().out
    # fewer steps than planned: stops early on the stored schedule; precision may change
    os.remove(tmp_path / "run" / "last.h5")
    os.remove(tmp_path / "run" / "ckpt-00000004.h5")
    cifar_script.main([*common, "--iters", "3", "--schedule", "step", "--mixed-precision", "bf16", "--resume"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "ckpt-00000002.h5 at step 2" in out and "precision bf16" in out
    from wrn3d_tl.checkpoint import read_checkpoint

    ck = read_checkpoint(tmp_path / "run" / "last.h5")
    assert ck["step"] == 3 and ck["trainer"]["mixed_precision"] == "bf16" and ck["trainer"]["total_steps"] == 4
    # the log goes on from the resumed step: steps 3 and 4 of the first run are gone, 3 is the new one
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    assert [(r["step"], r["split"]) for r in rows] == [("1", "train"), ("2", "train"), ("3", "train"), ("3", "eval")]


def test_fp16_on_a_cpu_says_so():
    with pytest.warns(UserWarning, match="fp16 is a GPU setting; on CPUs with AVX512_BF16/AMX use 'bf16'"):
        Trainer(build_wrn(CFG), mixed_precision="fp16", verbose=False)


# ------------------------------------- the documented path, end to end (issue 11 #1)
def _python_block_after(doc, marker):
    """The first ```python block after the line holding ``marker`` in docs/``doc``."""
    text = open(os.path.join(ROOT, "docs", doc), encoding="utf-8").read()
    start = text.index(marker)
    body = text.index("```python\n", start) + len("```python\n")
    return text[body:text.index("```", body)]


def _run(code, namespace, subs=()):
    for old, new in subs:
        assert old in code, f"the documented block no longer holds {old!r}"
        code = code.replace(old, new)
    exec(compile(code, "<docs block>", "exec"), namespace)
    return namespace


def test_documented_hdf5_training_then_predict_export_and_twin_agree(tmp_path, monkeypatch):
    """docs/data.md's "Training on your own HDF5 file" block, then docs/using-a-trained-model.md's
    export and Keras-twin blocks, on a 5-class file whose classes differ in raw intensity
    (100..260) and which stores its normalisation: predict, the SavedModel and the twin
    give what evaluate measured."""
    from wrn3d_tl.data import hdf5_dataset, write_hdf5_volumes
    from wrn3d_tl.predict import predict

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 5
    raw = (100 + 40 * labels[:, None, None, None, None] + rng.normal(0, 8, (60, 2, 8, 8, 1))).astype("float32")
    write_hdf5_volumes("my_volumes.h5", raw, labels, normalization="compute", num_classes=5)
    tf.random.set_seed(0)
    ns = _run(_python_block_after("data.md", "Training on your own HDF5 file"), {},
              subs=(("depth=16, widen_factor=4", "depth=10, widen_factor=1"), ("range(100)", "range(40)")))
    trainer = ns["trainer"]
    assert trainer.normalization is not None  # taken from the pipeline, not repeated by the user
    trainer.save("runs/ckpt-00010000.h5")
    trainer.save("runs/last.h5")
    evaluated = trainer.evaluate(hdf5_dataset("my_volumes.h5", batch_size=32))
    assert evaluated["accuracy"] >= 0.6, evaluated  # learnt: the comparison below is not between two chance levels
    predicted = predict("runs/last.h5", "my_volumes.h5")
    assert np.mean(predicted["class"] == labels) == pytest.approx(evaluated["accuracy"], abs=1e-9)

    _run(_python_block_after("using-a-trained-model.md", "## Export a SavedModel"), {})
    for folder in ("exported/wrn", "exported/wrn-last"):
        served = tf.saved_model.load(folder)
        out = served.signatures["serving_default"](volumes=tf.constant(raw))
        np.testing.assert_array_equal(out["probabilities"].numpy().argmax(-1), predicted["class"])

    twin = _run(_python_block_after("using-a-trained-model.md", "## Weights into plain Keras"), {"raw": raw})
    norm = trainer.normalization
    want = trainer.model((raw - np.float32(norm["mean"])) / np.float32(norm["std"]), is_train=False).numpy()
    np.testing.assert_allclose(np.asarray(twin["logits"]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(twin["logits"]).argmax(-1), predicted["class"])


# ------------------------------------------ normalisation: carried, compared, warned
def _volumes(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 255, (n,) + CFG.input_shape)).astype("float32"), rng.integers(0, 3, n)


def test_pipeline_stats_travel_and_a_mismatch_is_refused(tmp_path):
    import warnings

    from wrn3d_tl.checkpoint import CheckpointError
    from wrn3d_tl.data import compute_normalization, make_dataset, normalization_of

    x, y = _volumes()
    norm = compute_normalization(x)
    tagged = make_dataset(x, y, batch_size=4, volume_depth=None, normalization=norm, training=True,
                          repeat=True)
    assert normalization_of(tagged) == (True, norm.to_dict())
    assert normalization_of(tagged.skip(1)) == (False, None)  # derived datasets carry no tag
    raw = make_dataset(x, y, batch_size=4, volume_depth=None, training=False)
    assert normalization_of(raw) == (True, None)

    tf.random.set_seed(0)
    t = Trainer(build_wrn(CFG), train_data=tagged, verbose=False)
    assert t.normalization == norm.to_dict() and t.normalization_known
    with pytest.raises(ValueError, match=r"evaluate: the pipeline's batches are normalised with nothing \(raw\)"):
        t.evaluate(raw)
    other = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    with pytest.raises(ValueError, match="train_data: the pipeline's batches are normalised with"):
        Trainer(build_wrn(CFG), train_data=tagged, normalization=other, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known stats: no warning
        path = t.save(tmp_path / "c.h5")
    # restoring with a pipeline of other stats is refused; without a pipeline the stored ones are taken
    with pytest.raises(CheckpointError, match="was trained on batches normalised with"):
        Trainer.restore(path, make_dataset(x, y, batch_size=4, volume_depth=None, normalization=other,
                                           training=True), verbose=False)
    assert Trainer.restore(path, verbose=False).normalization == norm.to_dict()


def test_saving_without_known_stats_warns(tmp_path):
    import warnings

    from wrn3d_tl.export import export_saved_model

    x, y = _volumes()
    tf.random.set_seed(0)
    t = Trainer(build_wrn(CFG), train_data=(x, y), batch_size=4, verbose=False)  # plain arrays: stats unknown
    with pytest.warns(UserWarning, match="this checkpoint holds no normalisation stats"):
        t.save(tmp_path / "c.h5")
    with pytest.warns(UserWarning, match="this SavedModel holds no normalisation stats"):
        export_saved_model(t, str(tmp_path / "sm"))
    raw = Trainer(build_wrn(CFG), verbose=False)
    from wrn3d_tl.data import make_dataset

    raw.train_data = make_dataset(x, y, batch_size=4, volume_depth=None, training=True)  # tagged raw: known to be raw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw.save(tmp_path / "raw.h5")


def test_resume_checks_the_pipeline_stats_and_switching_to_fp16_starts_at_the_initial_scale(tmp_path):
    from wrn3d_tl.data import compute_normalization, make_dataset
    from wrn3d_tl.experiment import ResumeError, find_resume_point, resume
    from wrn3d_tl.optim import LossScale

    x, y = _volumes()
    norm = compute_normalization(x)
    data = make_dataset(x, y, batch_size=4, volume_depth=None, normalization=norm, training=True, repeat=True)
    tf.random.set_seed(0)
    t = Trainer(build_wrn(CFG), train_data=data, verbose=False)
    t.train_step()
    t.save(tmp_path / "last.h5")
    point = find_resume_point(tmp_path / "last.h5")
    assert point[0] == str(tmp_path / "last.h5") and point[1]["step"] == 1
    other = make_dataset(x * 2, y, batch_size=4, volume_depth=None, normalization=compute_normalization(x * 2),
                         training=True)
    with pytest.raises(ResumeError, match="the training data's normalisation"):
        resume(point, CFG, other, verbose=False)
    with pytest.warns(UserWarning, match="fp16"):
        r = resume(point, CFG, data, settings={"mixed_precision": "fp16"}, verbose=False)
    assert r.mixed_precision == "fp16" and r.loss_scale.scale.numpy() == LossScale.INITIAL and r.step == 1


def test_resume_keeps_the_stored_plan_and_auto_batch(cifar_script, tmp_path, capsys):
    common = ["--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "16", "--depth", "10",
              "--width", "1", "--volume-depth", "2", "--eval-samples", "16", "--schedule", "step",
              "--checkpoint", str(tmp_path / "last.h5")]
    cifar_script.main([*common, "--batch-size", "8", "--iters", "3"])
    capsys.readouterr()
    # no --iters: the stored plan (3 steps), so nothing is left to train; auto: the stored batch
    cifar_script.main([*common, "--batch-size", "auto", "--resume"])
    out = capsys.readouterr().out
    assert "--batch-size auto: 8 (the resumed run's)" in out
    assert "nothing to train: the checkpoint is at step 3, the run plans 3" in out and "iter " not in out


def test_cifar_script_data_and_option_errors_are_one_line(cifar_script, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _one_line_exit(capsys, lambda: cifar_script.main(["--data-dir", str(tmp_path / "empty")]))
    assert ": error: " in line and "cifar" in line.lower() and str(tmp_path / "empty") in line
    line = _one_line_exit(capsys, lambda: cifar_script.main(["--dataset", "synthetic", "--synthetic-train", "16",
                                                             "--dropout", "0.3", "--recompute"]))
    assert "--recompute needs --dropout 0" in line
