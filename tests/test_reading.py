"""What a scan becomes travels with the model (issue 23): the stored reading and class names
reach predict on files AND arrays, grad_cam, the SavedModel (served by TensorFlow alone),
wrn3d-predict's CSV, the report and the montages; bad files are found before training."""

import csv
import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.data import hdf5_dataset, nifti_dataset, nifti_info, write_hdf5_volumes
from wrn3d_tl.data.reading import apply_reading, apply_reading_tf, preprocessing_of
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.predict import Predictor, predict
from wrn3d_tl.commands.predict import main as predict_main
from wrn3d_tl.loading import load_for_inference
from wrn3d_tl.train import Trainer

NAMES = ("apex", "body", "tail")        # the class = where a bright slab lies along depth (sorted names)
TARGET = (8, 8, 8)


def scan(rng, label, depth):
    """int16 voxels (stored with a scaling slope 0.5 and intercept -1000: CT-like units) of
    shape (depth, 8, 9), a bright 2-slice slab in the class's third of the central 8 slices."""
    x = rng.normal(size=(depth, 8, 9))
    top = (depth - 8) // 2 + [0, 3, 6][label]
    x[top:top + 2] += 4.0
    return np.round((x * 60 + 1300) * 2).astype(np.int16)


def save(path, data):
    img = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]))   # not the identity: ignored, as stored
    img.header.set_slope_inter(0.5, -1000)
    nib.save(img, path)
    return os.fspath(path)


def raw_of(path):
    """A scan's voxels as a user reads them with nibabel (scaling applied), channel axis added."""
    return np.asarray(nib.load(path).dataobj, np.float32)[..., None]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A WRN-10-1 trained on 36 scans named by class in a CSV (.nii and .nii.gz, depths 9-11
    cropped to 8: the stored reading is z-score + crop/pad), and 9 held-out test scans."""
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(3)
    tables = {}
    for split, n in (("train", 36), ("test", 9)):
        rows = ["path,label"]
        for i in range(n):
            label = i % 3
            name = f"{split}{i:02d}.nii" + (".gz" if i % 2 else "")
            save(root / name, scan(rng, label, 9 + i % 3))
            rows.append(f"{name},{NAMES[label]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        tables[split] = os.fspath(root / f"{split}.csv")
    train = nifti_dataset(tables["train"], batch_size=12, training=True, repeat=True, target_shape=TARGET, seed=0)
    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=TARGET + (1,)))
    trainer = Trainer(model, train, lr=0.05, verbose=False)
    trainer.fit(30, progress=False)
    ckpt = trainer.save(os.fspath(root / "wrn.h5"))
    test_paths = list(nifti_info(tables["test"]).paths)
    return {"root": root, "tables": tables, "trainer": trainer, "ckpt": ckpt, "test_paths": test_paths,
            "test_labels": [i % 3 for i in range(9)]}


def test_checkpoint_holds_the_reading_and_the_class_names(trained):
    _, _, _, reading, names = load_for_inference(trained["ckpt"])
    assert reading == preprocessing_of("zscore", TARGET)
    assert names == NAMES == trained["trainer"].class_names
    assert Trainer.restore(trained["ckpt"], verbose=False).class_names == NAMES


def test_raw_arrays_give_the_file_paths_classes(trained):
    ckpt, paths = trained["ckpt"], trained["test_paths"]
    by_files = predict(ckpt, trained["tables"]["test"])
    assert by_files["class"].tolist() == trained["test_labels"], "the model should have learnt the slabs"
    predictor = Predictor(ckpt)
    for i, path in enumerate(paths):   # scans of different depths: one array each
        out = predict(predictor, raw_of(path)[None])
        assert out["class"][0] == by_files["class"][i]
        np.testing.assert_allclose(out["probabilities"][0], by_files["probabilities"][i], atol=1e-6)
        assert out["reading"] == {"preprocessing": preprocessing_of("zscore", TARGET), "normalization": None}
        assert out["class_name"] == [NAMES[by_files["class"][i]]]
    # the opt-out: arrays that had the reading applied go straight in ...
    read = np.stack([apply_reading(raw_of(p)[None], preprocessing_of("zscore", TARGET))[0] for p in paths])
    done = predict(predictor, read, preprocessed=True)
    np.testing.assert_allclose(done["probabilities"], by_files["probabilities"], atol=1e-6)
    assert done["reading"]["preprocessing"] is None
    # ... and raw arrays fed as if preprocessed (what users got before): other answers
    cropped = np.stack([raw_of(p)[(raw_of(p).shape[0] - 8) // 2:][:8, :8, :8] for p in paths])
    wrong = predict(predictor, cropped, preprocessed=True)
    # logits, not probabilities: a saturated softmax can hide a large change
    assert np.abs(wrong["logits"] - by_files["logits"]).max() > 1.0, np.abs(wrong["logits"] - by_files["logits"]).max()
    assert by_files["path"] == paths and by_files["class_name"] == [NAMES[c] for c in by_files["class"]]


def test_apply_reading_tf_equals_numpy(rng):
    x = (rng.normal(size=(3, 9, 7, 10, 2)) * 80 + 300).astype(np.float32)
    x[0, ..., 1] = 5.0                     # a constant channel: centred, not scaled
    x[1, :2] = 0.0                         # zeros for zscore_nonzero
    for intensity in ("zscore", "zscore_nonzero", ("window", 250, 350), None):
        for target in (None, (8, 8, 8), (5, 9, 11)):
            reading = preprocessing_of(intensity, target)
            want = apply_reading(x, reading)
            got = apply_reading_tf(tf.constant(x), reading).numpy()
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6, err_msg=f"{intensity} {target}")


def test_saved_model_serves_raw_scans_with_tensorflow_alone(trained, tmp_path):
    from wrn3d_tl.commands.export import main as export_main

    out = tmp_path / "served"
    assert export_main(["--checkpoint", trained["ckpt"], "--out", str(out)]) == 0
    by_files = predict(trained["ckpt"], trained["tables"]["test"])
    arrays = tmp_path / "raw.npz"
    np.savez(arrays, *[raw_of(p) for p in trained["test_paths"]])
    code = f"""
import json, sys
import numpy as np, tensorflow as tf
served = tf.saved_model.load({str(out)!r})
raw = np.load({str(arrays)!r})
probs = [served.signatures["serving_default"](volumes=tf.constant(raw[k][None]))["probabilities"].numpy()[0].tolist()
         for k in sorted(raw.files, key=lambda k: int(k.split("_")[1]))]
meta = json.loads(served.metadata().numpy())
print(json.dumps({{"probs": probs, "meta": meta, "ours": [m for m in sys.modules if m.startswith(("wrn3d_tl",
                                                                                                    "tensorlayer"))]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ours"] == []
    probs = np.array(result["probs"])
    np.testing.assert_allclose(probs, by_files["probabilities"], atol=1e-5)
    assert probs.argmax(axis=1).tolist() == by_files["class"].tolist()
    meta = result["meta"]
    assert meta["preprocessing"] == preprocessing_of("zscore", TARGET)
    assert meta["class_names"] == list(NAMES)
    assert meta["input_shape"] == [None, None, None, None, 1]
    assert meta["signatures"] == ["serving_default", "serving_uint8", "serving_preprocessed"]
    # the second signature takes the network's input as the training pipeline gave it
    served = tf.saved_model.load(str(out))
    read = np.stack([apply_reading(raw_of(p)[None], meta["preprocessing"])[0] for p in trained["test_paths"]])
    pre = served.signatures["serving_preprocessed"](volumes=tf.constant(read))["probabilities"].numpy()
    np.testing.assert_allclose(pre, by_files["probabilities"], atol=1e-5)


def test_class_names_in_the_csv_the_report_and_the_montage_titles(trained, tmp_path, monkeypatch):
    from wrn3d_tl import evaluation, explain, report

    out_csv = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", trained["ckpt"], "--nifti", trained["tables"]["test"],
                         "--out", str(out_csv)]) == 0
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class_name"] for r in rows] == [NAMES[c] for c in trained["test_labels"]]
    assert [r["path"] for r in rows] == trained["test_paths"]
    # report pictures: the confusion matrix's and the ROC legend's labels, and the per-class table
    ticks = {}
    original_confusion, original_roc = evaluation.confusion_figure, evaluation.roc_figure

    def confusion(*a, **k):
        fig = original_confusion(*a, **k)
        ticks["confusion"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        return fig

    def roc(*a, **k):
        fig = original_roc(*a, **k)
        ticks["roc"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return fig

    monkeypatch.setattr(evaluation, "confusion_figure", confusion)
    monkeypatch.setattr(evaluation, "roc_figure", roc)
    trainer = trained["trainer"]
    test = nifti_dataset(trained["tables"]["test"], batch_size=9, target_shape=TARGET, classes=NAMES)
    result = trainer.evaluate(test, report_dir=tmp_path / "eval", log=False)
    assert ticks["confusion"] == list(NAMES)
    assert all(any(name in text for text in ticks["roc"]) for name in NAMES), ticks["roc"]
    with open(result["report"]["metrics"]) as fh:
        assert json.load(fh)["class_names"] == list(NAMES)
    page = report.write_run_report(tmp_path / "page", config=trainer.config, evaluation=result)
    html = open(page, encoding="utf-8").read()
    assert all(f"<td>{name}</td>" in html for name in NAMES)
    # montage titles name the file and the class
    titles = []
    monkeypatch.setattr(explain, "save_montage", lambda volume, path, **k: titles.append(k["title"]))
    assert predict_main(["--checkpoint", trained["ckpt"], "--nifti", trained["tables"]["test"],
                         "--out", str(tmp_path / "q.csv"), "--cam-dir", str(tmp_path / "cams")]) == 0
    assert titles == [f"{os.path.basename(p)}: Grad-CAM of {NAMES[c]}"
                      for p, c in zip(trained["test_paths"], trained["test_labels"])]


def test_grad_cam_on_raw_arrays_applies_the_reading(trained):
    from wrn3d_tl.explain import grad_cam

    raw = raw_of(trained["test_paths"][0])[None]
    read = apply_reading(raw, preprocessing_of("zscore", TARGET))
    cam = grad_cam(trained["ckpt"], raw)
    assert cam.shape == (1,) + TARGET
    np.testing.assert_allclose(cam, grad_cam(trained["ckpt"], read, preprocessed=True), atol=1e-6)


def test_old_checkpoints_load_without_class_names(trained, tmp_path, monkeypatch):
    trainer = trained["trainer"]
    hp = trainer.hyperparameters
    monkeypatch.setattr(trainer, "hyperparameters", lambda: {k: v for k, v in hp().items() if k != "class_names"})
    path = trainer.save(os.fspath(tmp_path / "old.h5"))
    monkeypatch.undo()
    assert load_for_inference(path)[4] is None
    out = predict(path, raw_of(trained["test_paths"][0])[None])
    assert "class_name" not in out and out["class"][0] == trained["test_labels"][0]


def test_hdf5_class_names_travel_to_the_trainer(tmp_path, rng):
    x = rng.normal(size=(4, 4, 8, 8, 1)).astype(np.float32)
    info = write_hdf5_volumes(tmp_path / "v.h5", x, [0, 1, 2, 1], class_names=["a", "b", "c"])
    assert info.class_names == ("a", "b", "c")
    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(4, 8, 8, 1)))
    trainer = Trainer(model, hdf5_dataset(info.path, batch_size=2, normalization=None), lr=0.01, verbose=False)
    assert trainer.class_names == ("a", "b", "c")
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes=3"):
        write_hdf5_volumes(tmp_path / "w.h5", x, [0, 1, 2, 1], class_names=["a", "b"], num_classes=3)


# ------------------------------------------------------------- bad files, found early
def bad_table(root, rng):
    """Four scans, two bad: a truncated .nii.gz (line 3) and one with a NaN voxel (line 5)."""
    rows = ["path,label"]
    for i in range(4):
        name = f"s{i}.nii.gz"
        data = scan(rng, i % 3, 8).astype(np.float32)
        if i == 3:
            data[1, 2, 3] = np.nan
        img = nib.Nifti1Image(data, np.eye(4))
        nib.save(img, root / name)
        rows.append(f"{name},{NAMES[i % 3]}")
    blob = (root / "s1.nii.gz").read_bytes()
    (root / "s1.nii.gz").write_bytes(gzip.compress(gzip.decompress(blob)[:-500]))   # voxels cut short
    (root / "t.csv").write_text("\n".join(rows) + "\n")
    return os.fspath(root / "t.csv")


def test_the_check_lists_every_bad_file_before_training(tmp_path, rng):
    table = bad_table(tmp_path, rng)
    nifti_info(table)                                 # headers alone pass
    with pytest.raises(ValueError) as e:
        nifti_info(table, check=True)
    lines = str(e.value).splitlines()
    assert lines[0] == f"table {table!r}: 2 of 4 files cannot be used:"
    assert "line 3 ('s1.nii.gz')" in lines[1] and "line 5 ('s3.nii.gz')" in lines[2] and "NaN" in lines[2]
    with pytest.raises(ValueError, match="2 of 4 files cannot be used"):   # the training entry point
        nifti_dataset(table, batch_size=2)


def test_a_bad_file_met_in_training_is_one_line(tmp_path, rng):
    table = bad_table(tmp_path, rng)
    ds = nifti_dataset(table, batch_size=4, check=False)
    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(8, 8, 9, 1)))
    trainer = Trainer(model, ds, lr=0.01, verbose=False)
    with pytest.raises(ValueError) as e:
        trainer.train_step()
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message and "line 3 ('s1.nii.gz')" in message
    assert trainer.step == 0


def test_predict_skip_bad_predicts_the_rest(trained, tmp_path, rng, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, path in enumerate(trained["test_paths"][:3]):
        (folder / os.path.basename(path)).write_bytes(open(path, "rb").read())
    (folder / "zz_broken.nii.gz").write_bytes(b"\x1f\x8b not a scan" * 20)
    out = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", trained["ckpt"], "--nifti", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zz_broken.nii.gz" in err[0] and "--skip-bad" in err[0] and not out.exists()
    assert predict_main(["--checkpoint", trained["ckpt"], "--nifti", str(folder), "--out", str(out),
                         "--skip-bad"]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [os.path.basename(r["path"]) for r in rows] == [os.path.basename(p) for p in trained["test_paths"][:3]]
    assert [r["class_name"] for r in rows] == [NAMES[c] for c in trained["test_labels"][:3]]
    with open(tmp_path / "p_skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert len(skipped) == 1 and skipped[0]["path"].endswith("zz_broken.nii.gz")
    assert "not a readable NIfTI file" in skipped[0]["reason"]
