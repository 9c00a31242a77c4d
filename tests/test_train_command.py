"""wrn3d-train and wrn3d-prepare: every data source end to end through the command, the
val-best selection, early stopping, balanced class weights, the stratified split, the report's
curves, and run.json re-running to the same weights."""

import csv
import json
import os

import numpy as np
import pytest

from wrn3d_tl.commands import train as command

TINY = ["--depth", "10", "--width", "1", "--batch-size", "4"]


def _scan(rng, c, shape=(6, 8, 8)):
    v = rng.normal(size=shape).astype(np.float32)
    v[3 * c:3 * c + 3] += 3.0   # the class is where a bright slab lies along depth
    return v * 50 + 300


def _write_scans(root, counts, *, flip_labels=(), seed=0):
    """NIfTI scans and one CSV table per split (class-name labels); splits named in
    ``flip_labels`` get the other class's name (a validation set the training set contradicts)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    tables = {}
    for split, n in counts.items():
        (root / split).mkdir(parents=True)
        rows = [("path", "label")]
        for i in range(n):
            c = i % 2
            nib.save(nib.Nifti1Image(_scan(rng, c), np.diag([1.5, 1.0, 1.0, 1.0])), root / split / f"{i}.nii.gz")
            shown = 1 - c if split in flip_labels else c
            rows.append((f"{split}/{i}.nii.gz", ("left", "right")[shown]))
        tables[split] = root / f"{split}.csv"
        with open(tables[split], "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return tables


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    return _write_scans(root, {"train": 24, "val": 8, "test": 8})


def _run(argv, capsys=None):
    status = command.main([str(a) for a in argv])
    return status


def _weights(path):
    from wrn3d_tl.checkpoint import read_checkpoint

    return read_checkpoint(str(path))


def test_nifti_tables_train_select_test_report_and_export(scans, tmp_path, capsys):
    out, exported = tmp_path / "run", tmp_path / "model"
    argv = [str(a) for a in ["--data", scans["train"], "--val", scans["val"], "--test", scans["test"], *TINY,
                             "--iters", "6", "--eval-every", "3", "--class-weight", "balanced", "--out", out,
                             "--export", exported]]
    assert _run(argv) == 0
    text = capsys.readouterr().out
    assert "val   step 3" in text and "val   step 6" in text and "test  (step" in text
    for name in ("best.h5", "last.h5", "metrics.json", "run.json", "index.html", "logs/metrics.csv",
                 "val/confusion.png", "test/roc.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["samples"] == 8 and metrics["val"]["samples"] == 8
    assert metrics["test"]["class_names"] == ["left", "right"]
    assert set(metrics["test"]["per_class"]) == {"left", "right"}
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 8
    assert [h["step"] for h in metrics["selected"]["history"]] == [3, 6]
    last = _weights(out / "last.h5")
    assert last["step"] == 6
    assert last["trainer"]["class_names"] == ["left", "right"]
    assert last["trainer"]["preprocessing"]["reader"] == "nifti"
    # balanced weights of 12 left and 12 right training scans: N / (K * count) = 1 each
    assert last["trainer"]["class_weight"] == [1.0, 1.0]
    # the report page has the training curves, the evaluation and Grad-CAM montages
    page = (out / "index.html").read_text()
    assert "Loss and accuracy against step" in page and "No curves" not in page
    assert "Grad-CAM" in page and len(os.listdir(out / "cams")) >= 1
    # run.json: the command, versions, CPU, the data's fingerprints
    record = json.loads((out / "run.json").read_text())
    assert record["argv"] == argv
    assert record["command"].startswith("wrn3d-train --data ")
    assert record["versions"]["tensorflow"] and record["cpu"]["model"]
    assert record["data"]["--data"]["scans"] == 24 and len(record["data"]["--data"]["sha256"]) == 64
    assert record["data"]["--data"]["scan_bytes"] == sum(p.stat().st_size for p in (scans["train"].parent /
                                                                                     "train").iterdir())
    assert record["data"]["--test"]["scans"] == 8 and record["selected_step"] == metrics["selected"]["step"]
    # the export serves raw scans with the training reading, and agrees with the selected checkpoint
    import nibabel as nib
    import tensorflow as tf

    from wrn3d_tl.predict import Predictor

    raw = np.stack([np.asarray(nib.load(scans["test"].parent / "test" / f"{i}.nii.gz").dataobj, np.float32)
                    for i in range(4)])[..., None]
    module = tf.saved_model.load(str(exported))
    served = module.signatures["serving_default"](volumes=tf.constant(raw))["probabilities"].numpy()
    np.testing.assert_allclose(served, Predictor(str(out / "best.h5")).predict(raw)["probabilities"], atol=1e-5)


def test_the_selected_checkpoint_is_the_validation_best_and_patience_stops(tmp_path, capsys):
    """A validation set whose labels contradict the training set's: the more the network
    learns, the worse it scores there, so the best step comes early and the last is worse."""
    tables = _write_scans(tmp_path / "s", {"train": 16, "val": 8, "test": 8}, flip_labels=("val",))
    out = tmp_path / "run"
    assert _run(["--data", tables["train"], "--val", tables["val"], "--test", tables["test"], *TINY,
                 "--iters", "12", "--eval-every", "1", "--select", "loss", "--patience", "3", "--lr", "0.1",
                 "--schedule", "constant", "--out", out]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["selected"]["history"]
    losses = [h["loss"] for h in history]
    best = history[int(np.argmin(losses))]
    assert metrics["selected"]["step"] == best["step"] and metrics["selected"]["value"] == pytest.approx(best["loss"])
    assert history[-1]["loss"] > best["loss"]            # the last step is worse than the selected one
    # patience 3: training stopped 3 evaluations after the best, before the planned 12 steps
    assert metrics["selected"]["stopped_early"] and metrics["selected"]["steps_trained"] == best["step"] + 3 < 12
    assert _weights(out / "best.h5")["step"] == best["step"]
    assert _weights(out / "last.h5")["step"] == best["step"] + 3
    # the reported val metrics are the selected checkpoint's, not the last step's
    assert metrics["val"]["loss"] == pytest.approx(best["loss"], rel=1e-5)
    from wrn3d_tl.predict import Predictor

    import nibabel as nib

    x = np.stack([np.asarray(nib.load(tmp_path / "s" / "test" / f"{i}.nii.gz").dataobj, np.float32)
                  for i in range(8)])[..., None]
    predicted = Predictor(str(out / "best.h5")).predict(x)["class"]
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean(predicted == np.arange(8) % 2))


def test_run_json_reruns_to_the_same_weights(scans, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["--data", str(scans["train"]), "--val-split", "0.25", *TINY, "--iters", "3", "--no-report",
            "--augment", "flip=HW,crop=1"]
    assert _run([*argv, "--out", first, "--export", tmp_path / "model"]) == 0
    assert _run(["--rerun", first / "run.json", "--out", again]) == 0
    # the re-run's record is the command itself (never --rerun), its --export dropped: nothing of the first is touched
    assert json.loads((again / "run.json").read_text())["argv"] == [*argv, "--out", str(again)]
    assert json.loads((first / "run.json").read_text())["argv"] == [*argv, "--out", str(first), "--export",
                                                                     str(tmp_path / "model")]
    for name in ("best.h5", "last.h5"):
        a, b = _weights(first / name), _weights(again / name)
        assert a["step"] == b["step"] == 3
        assert a["weights"].keys() == b["weights"].keys()
        for key in a["weights"]:
            np.testing.assert_array_equal(a["weights"][key], b["weights"][key], err_msg=f"{name}: {key}")


def test_val_split_of_a_table_is_stratified_disjoint_and_seeded(scans, tmp_path):
    out = tmp_path / "run"
    assert _run(["--data", scans["train"], "--val-split", "0.25", *TINY, "--iters", "1", "--no-report",
                 "--out", out]) == 0

    def rows(name):
        with open(out / "splits" / name, newline="") as fh:
            return [(r["path"], r["label"]) for r in csv.DictReader(fh)]

    train, val = rows("train.csv"), rows("val.csv")
    with open(scans["train"], newline="") as fh:
        table = [(str(scans["train"].parent / r["path"]), r["label"]) for r in csv.DictReader(fh)]
    assert sorted(train + val) == sorted(table) and not set(train) & set(val)
    assert sorted(label for _, label in val) == ["left"] * 3 + ["right"] * 3     # 25% of 12 per class
    assert json.loads((out / "metrics.json").read_text())["val"]["samples"] == 6
    # seeded: the same seed splits the same way, another seed another way
    for seed, same in ((0, True), (1, False)):
        folder = tmp_path / f"seed{seed}"
        command.open_data(command.parse_args(["--data", str(scans["train"]), "--val-split", "0.25", "--seed",
                                              str(seed)]), str(folder))
        assert ((folder / "splits" / "val.csv").read_text() == (out / "splits" / "val.csv").read_text()) == same


def test_stratified_split_and_balanced_weights_follow_their_definitions():
    from sklearn.utils.class_weight import compute_class_weight

    from wrn3d_tl.data import balanced_class_weights, stratified_split

    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = stratified_split(y, 0.2, seed=3)
    assert np.bincount(y[held]).tolist() == [10, 6, 4]
    assert not set(keep) & set(held) and sorted(np.concatenate([keep, held])) == list(range(100))
    assert np.array_equal(stratified_split(y, 0.2, seed=3)[1], held)
    assert not np.array_equal(stratified_split(y, 0.2, seed=4)[1], held)
    np.testing.assert_allclose(balanced_class_weights(y, 3), compute_class_weight("balanced", classes=np.arange(3), y=y))
    np.testing.assert_allclose(balanced_class_weights(y, 3), 100 / (3 * np.array([50, 30, 20])))
    with pytest.raises(ValueError, match="class 3 has none"):
        balanced_class_weights(y, 4)
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(y, 1.0)


def test_class_weight_changes_the_loss_exactly_as_the_formula_says():
    import tensorflow as tf

    from wrn3d_tl.data import balanced_class_weights
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(2, 8, 8, 1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 2, 8, 8, 1)).astype(np.float32)
    y = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    w = balanced_class_weights(y, 3)
    losses = {}
    for name, weights in (("plain", None), ("balanced", w)):
        tf.random.set_seed(0)
        model = build_wrn(cfg)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(tf.constant(x), is_train=True)).numpy()
        trainer = Trainer(model, lr=0.1, class_weight=weights, verbose=False)
        losses[name] = (trainer.train_step(x, y)["loss"], ce)
        assert trainer.hyperparameters()["class_weight"] == (None if weights is None else list(w))
    loss, ce = losses["balanced"]
    assert loss == pytest.approx(np.sum(w[y] * ce) / len(y), rel=1e-5)     # sum_i w[y_i] CE_i / B
    assert losses["plain"][0] == pytest.approx(np.mean(losses["plain"][1]), rel=1e-5)
    assert loss != pytest.approx(losses["plain"][0], rel=1e-3)
    with pytest.raises(ValueError, match="class_weight must be None or 3 finite numbers > 0"):
        Trainer(build_wrn(cfg), class_weight=[1.0, 0.0, 1.0], verbose=False)


def _write_cifar10(folder, n=8, n_test=6):
    import pickle

    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        k = n_test if name == "test_batch" else n
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in np.arange(k) % 10]}, fh, protocol=2)


@pytest.mark.parametrize("source", ["prepared-hdf5", "nifti-folder", "medmnist", "cifar10", "synthetic"])
def test_every_data_source_trains_through_the_command(source, scans, tmp_path, monkeypatch, capsys):
    from wrn3d_tl.commands import prepare

    out = tmp_path / "run"
    extra = []
    if source == "prepared-hdf5":      # wrn3d-prepare, then the HDF5 it wrote
        for split in ("train", "val"):
            assert prepare.main([str(scans[split]), "--out", str(tmp_path / f"{split}.h5")]) == 0
        assert "train.h5: 24 volumes of (6, 8, 8, 1) float32 (left, right)" in capsys.readouterr().out
        data = [tmp_path / "train.h5", "--val", tmp_path / "val.h5"]
    elif source == "nifti-folder":     # class sub-folders
        import shutil

        for i, label in enumerate(["left", "right"] * 6):
            (tmp_path / "folders" / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(scans["train"].parent / "train" / f"{i}.nii.gz", tmp_path / "folders" / label / f"{i}.nii.gz")
        data = [tmp_path / "folders", "--val-split", "0.25"]
    elif source == "medmnist":
        from wrn3d_tl.data import MEDMNIST3D

        rng = np.random.default_rng(0)
        arrays = {}
        for split, n in MEDMNIST3D["nodulemnist3d"]["n_samples"].items():
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
        (tmp_path / "mm").mkdir()
        np.savez(tmp_path / "mm" / "nodulemnist3d.npz", **arrays)
        data = ["medmnist:nodulemnist3d", "--data-dir", tmp_path / "mm", "--limit", "16"]
        extra = ["--eval-every", "0"]
    elif source == "cifar10":
        _write_cifar10(tmp_path / "cifar")
        data = ["cifar10", "--data-dir", tmp_path / "cifar", "--volume-depth", "2", "--val-split", "0.2"]
    else:
        data = ["synthetic", "--synthetic-train", "40", "--synthetic-test", "12", "--volume-depth", "2",
                "--dims", "2"]
    assert _run(["--data", *data, *TINY, *extra, "--iters", "2", "--no-report", "--out", out]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ck = _weights(out / "best.h5")
    assert ck["step"] <= 2 and _weights(out / "last.h5")["step"] == 2
    expected = {"prepared-hdf5": ("val", 8, ["left", "right"]), "nifti-folder": ("val", 4, ["left", "right"]),
                "medmnist": ("test", 16, ["benign", "malignant"]), "cifar10": ("test", 6, None),
                "synthetic": ("test", 12, None)}[source]
    split, n, names = expected
    assert metrics[split]["samples"] == n
    if names:
        assert metrics[split]["class_names"] == names and ck["trainer"]["class_names"] == names
    if source == "prepared-hdf5":      # the reading travels from the scans through the HDF5 to the checkpoint
        assert ck["trainer"]["preprocessing"]["reader"] == "nifti"
    if source == "synthetic":
        assert ck["config"]["input_shape"] == [32, 32, 3]


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.csv"], "--data missing.csv: no such file or folder"),
    (["--data", "medmnist:organmnist3d", "--val", "x.csv"], "brings its own splits"),
    (["--data", "synthetic", "--val-split", "1.5"], "--val-split: expected a fraction in (0, 1)"),
    (["--data", "synthetic", "--augment", "flip=Q"], "--augment: expected none or a comma list"),
    (["--data", "synthetic", "--checkpoint", "c.h5"], "wrn3d-train writes last.h5, best.h5 and logs/ into --out"),
    ([], "--data is required"),
])
def test_bad_flags_are_one_line_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wrn3d-train: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_a_bad_scan_and_a_missing_cifar_are_one_line_naming_the_file(scans, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{scans['train'].parent / 'train' / '0.nii.gz'},left\n{tmp_path / 'gone.nii.gz'},right\n")
    assert _run(["--data", bad, *TINY, "--iters", "1", "--out", tmp_path / "r1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wrn3d-train: error: --data ") and "gone.nii.gz" in err and "\n" not in err
    assert _run(["--data", "cifar10", "--data-dir", tmp_path, *TINY, "--iters", "1", "--out", tmp_path / "r2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wrn3d-train: error: --data cifar10: ") and "\n" not in err


def test_a_run_folder_is_never_overwritten_without_resume(scans, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["--data", scans["train"], *TINY, "--iters", "1", "--no-report", "--out", out]) == 0
    before = (out / "last.h5").read_bytes()
    assert _run(["--data", scans["train"], *TINY, "--iters", "2", "--no-report", "--out", out]) == 2
    assert "holds a run already (run.json); pass --resume" in capsys.readouterr().err
    assert (out / "last.h5").read_bytes() == before


def test_a_validation_score_that_is_never_finite_selects_the_last_step_loudly(tmp_path, capsys):
    tables = _write_scans(tmp_path / "s", {"train": 8, "val": 1})     # one val scan: one class, AUC undefined
    out = tmp_path / "run"
    assert _run(["--data", tables["train"], "--val", tables["val"], *TINY, "--iters", "2", "--select", "auc",
                 "--no-report", "--out", out]) == 0
    assert "!!! no validation auc was finite" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected"]["step"] == 2 and _weights(out / "best.h5")["step"] == 2


def test_batch_size_auto_and_bf16_go_through_to_the_trainer(scans, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["--data", scans["train"], "--depth", "10", "--width", "1", "--batch-size", "auto",
                 "--memory-budget", "0.13", "--mixed-precision", "bf16", "--iters", "1", "--no-report",
                 "--out", out]) == 0
    from wrn3d_tl.memory import largest_batch
    from wrn3d_tl.model import WRNConfig

    ck = _weights(out / "last.h5")
    cfg = WRNConfig.from_dict(ck["config"])
    expected = largest_batch(cfg, 0.13 * 2 ** 30, mixed_precision="bf16")
    assert expected < 24 and f"--batch-size auto: {expected}" in capsys.readouterr().out
    assert ck["trainer"]["batch_size"] == expected and ck["trainer"]["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_distribute_mirrored_over_two_cpus_in_its_own_process(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "wrn3d_tl.commands.train", "--data", "synthetic", "--synthetic-train",
                           "32", "--synthetic-test", "8", "--volume-depth", "2", *TINY, "--iters", "2", "--no-report",
                           "--distribute", "mirrored", "--cpu-replicas", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 replica(s)" in done.stdout
    assert _weights(out / "last.h5")["step"] == 2


def test_resume_refuses_other_data_or_selection_and_forgets_evaluations_after_its_step(scans, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", scans["train"], "--val", scans["val"], *TINY, "--schedule", "constant", "--eval-every", "1",
              "--no-report", "--out", out]
    assert _run([*common, "--iters", "3", "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    assert _run([*common, "--iters", "3", "--resume", "--select", "loss"]) == 2
    assert "--select loss (the run's: accuracy)" in capsys.readouterr().err
    no_val = [a for a in common if a not in (scans["val"], "--val")]
    assert _run([*no_val, "--iters", "3", "--resume"]) == 2
    assert "--val: not given" in capsys.readouterr().err
    # last.h5 damaged: the run resumes at step 2, evaluates step 3 again, and keeps one entry per step
    with open(out / "last.h5", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert _run([*common, "--iters", "3", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["selected"]["history"]] == [1, 2, 3]
    record = json.loads((out / "run.json").read_text())
    assert "--resume" not in record["argv"] and len(record["resumed"]) == 1   # the run's own command is kept


def test_hdf5_val_of_other_classes_is_one_line(tmp_path, capsys):
    from wrn3d_tl.data import write_hdf5_volumes

    x = np.zeros((4, 2, 8, 8, 1), "float32")
    write_hdf5_volumes(tmp_path / "train.h5", x, [0, 1, 0, 1], class_names=["a", "b"])
    write_hdf5_volumes(tmp_path / "val3.h5", x, [0, 1, 2, 1])
    write_hdf5_volumes(tmp_path / "val_named.h5", x, [0, 1, 0, 1], class_names=["b", "a"])
    for val, message in (("val3.h5", "it has 3 classes, the training data 2"),
                         ("val_named.h5", "its classes are ['b', 'a'], the training data's ['a', 'b']")):
        assert _run(["--data", tmp_path / "train.h5", "--val", tmp_path / val, *TINY, "--iters", "1",
                     "--out", tmp_path / f"run-{val}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"wrn3d-train: error: --val {tmp_path / val}: ") and message in err and "\n" not in err


def test_without_validation_last_h5_is_written_every_epoch(scans, tmp_path, monkeypatch):
    from wrn3d_tl.train import Trainer

    saved, save = [], Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, path: saved.append((self.step, os.path.basename(path)))
                        or save(self, path))
    assert _run(["--data", scans["train"], *TINY, "--iters", "12", "--no-report", "--out", tmp_path / "run"]) == 0
    # 24 scans in batches of 4: an epoch is 6 steps
    assert [s for s in saved if s[1] == "last.h5"][:2] == [(6, "last.h5"), (12, "last.h5")]


def test_the_scan_reading_flags_travel_to_the_checkpoint(scans, tmp_path):
    out = tmp_path / "run"
    assert _run(["--data", scans["train"], *TINY, "--iters", "1", "--target-shape", "4,8,8", "--intensity",
                 "window:0:600", "--augment", "flip=W,crop=1", "--no-report", "--out", out]) == 0
    ck = _weights(out / "last.h5")
    assert ck["config"]["input_shape"] == [4, 8, 8, 1]
    assert ck["trainer"]["preprocessing"] == {"reader": "nifti", "intensity": ["window", 0.0, 600.0],
                                              "target_shape": [4, 8, 8]}


def test_prepare_numbers_a_table_as_asked_and_names_a_bad_one(scans, tmp_path, capsys):
    from wrn3d_tl.commands import prepare
    from wrn3d_tl.data import hdf5_info

    assert prepare.main([str(scans["val"]), "--out", str(tmp_path / "v.h5"), "--classes", "right,left",
                         "--target-shape", "4,8,8"]) == 0
    info = hdf5_info(tmp_path / "v.h5")
    assert info.class_names == ("right", "left") and info.volume_shape == (4, 8, 8, 1) and info.n == 8
    assert info.preprocessing == {"reader": "nifti", "intensity": "zscore", "target_shape": [4, 8, 8]}
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nnowhere.nii.gz,left\n")
    capsys.readouterr()
    assert prepare.main([str(bad), "--out", str(tmp_path / "b.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"wrn3d-prepare: error: table {bad}: ") and "nowhere.nii.gz" in err and "\n" not in err
    assert not (tmp_path / "b.h5").exists()
