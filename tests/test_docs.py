"""Every fenced code block in README.md and docs/*.md is run by a test, every relative link
points at a file that exists, and the numbers the docs quote follow the code.

* ```python blocks are executed, each in a fresh working directory that a fixture fills
  with the files the block reads (a tiny HDF5 volume file, a small checkpoint, CIFAR in
  its real pickle format, ...). ``PYTHON_BLOCKS`` lists, next to each block, what it needs
  and the substitutions applied to keep the suite fast; a substitution whose target text
  is not in the block fails the test, so the docs and this file cannot drift apart.
* ```bash blocks are either executed (``BASH_RUN``: every command in-process through the
  script's ``main(argv)``, with substitutions as above) or mapped to the test that mirrors
  them (``BASH_MAPPED``, keyed by the block's first line). A bash block in neither, or a
  mapped test that does not exist, fails.
* ```text blocks are output, not code; a block without a language tag fails (tag it).

Both tiers run the blocks (about 15 s per process on 2 cores).
"""

import ast
import dataclasses
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
CODE_LANGS = ("python", "bash")

# The tiny network every fixture file is made for: 3D, 5 classes, 4x8x8x3 volumes.
CFG_KW = dict(depth=10, widen_factor=1, num_classes=5, input_shape=(4, 8, 8, 3))
NORM = {"mean": [110.0, 120.0, 130.0], "std": [40.0, 50.0, 60.0]}


# ================================================================ the blocks

@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def first_line(self):
        return self.text.splitlines()[0].strip() if self.text.strip() else ""

    @property
    def id(self):
        return f"{self.path}:{self.line}"


def fenced_blocks(path):
    """The fenced code blocks of a markdown file, in order."""
    blocks, lines = [], Path(path).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
        if m:
            start, lang, body = i, m.group(1), []
            i += 1
            while i < len(lines) and not re.match(r"^```\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"{path}:{start + 1}: unclosed code fence"
            blocks.append(Block(str(Path(path).relative_to(ROOT)), start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return blocks


ALL_BLOCKS = [b for p in DOC_FILES for b in fenced_blocks(p)]


def blocks_of(lang):
    return [b for b in ALL_BLOCKS if b.lang == lang]


def substitute(block, subs):
    """Apply (old, new) substitutions; each ``old`` must be in the block."""
    text = block.text
    for old, new in subs:
        assert old in text, (f"{block.id}: the substitution target {old!r} is not in the block any more; "
                             "update the block's entry in tests/test_docs.py")
        text = text.replace(old, new)
    return text


# ================================================================ files the blocks read

def _tiny_trainer(**kw):
    import tensorflow as tf

    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    tf.random.set_seed(0)
    return Trainer(build_wrn(WRNConfig(**CFG_KW)), lr=0.05, normalization=NORM, verbose=False, **kw)


def _raw_volumes(n, seed=0):
    """Volumes in raw units (like uint8 data), float32, for the tiny network."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, size=(n,) + CFG_KW["input_shape"]).astype(np.float32)


def _labels(n, seed=0):
    return np.random.default_rng(seed + 1).integers(0, CFG_KW["num_classes"], n)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Files made once per module and copied into each block's working directory."""
    from wrn3d_tl.data import write_hdf5_volumes

    root = tmp_path_factory.mktemp("docs-store")
    trainer = _tiny_trainer()
    for s in range(2):
        trainer.train_step(_raw_volumes(8, s) / 255.0, _labels(8, s))
    ckpt = trainer.save(str(root / "ckpt.h5"))

    periodic = root / "periodic"
    t = _tiny_trainer(checkpoint_dir=str(periodic), checkpoint_every=1, keep_checkpoints=3)
    for s in range(4):
        t.train_step(_raw_volumes(8, s) / 255.0, _labels(8, s))
    newest = sorted(n for n in os.listdir(periodic) if n.startswith("ckpt-"))[-1]
    damaged = periodic / f"ckpt-{int(newest[5:13]) + 1:08d}.h5"  # newer by name, truncated
    data = (periodic / newest).read_bytes()
    damaged.write_bytes(data[: len(data) // 2])

    from wrn3d_tl.export import export_saved_model
    from wrn3d_tl.train import Trainer

    export_saved_model(Trainer.restore(ckpt, verbose=False), str(root / "exported"))

    vols, labels = _raw_volumes(16, 3), _labels(16, 3)
    write_hdf5_volumes(str(root / "volumes.h5"), vols, labels, normalization="compute",
                       num_classes=CFG_KW["num_classes"])
    np.save(root / "volumes.npy", vols)
    return {"ckpt": ckpt, "periodic": periodic, "newest": newest, "damaged": damaged.name,
            "exported": root / "exported", "volumes.h5": root / "volumes.h5", "volumes.npy": root / "volumes.npy"}


def _write_cifar10(folder, n_per_batch=4, n_test=3):
    """A tiny cifar-10-batches-py folder in the official python-pickle format."""
    import pickle

    folder = Path(folder) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"filenames": [b"img%d.png" % k for k in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def _write_nifti_scans(root, shape=(6, 8, 8)):
    """Learnable scans: the class ("left"/"right") is where a bright slab lies along depth."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8), ("test", 8), ("new", 4)):
        folder = root / ("new_scans" if split == "new" else f"scans/{split}")
        folder.mkdir(parents=True)
        rows = ["path,label"]
        for i in range(n):
            v = rng.normal(size=shape).astype(np.float32)
            c = i % 2
            v[3 * c:3 * c + 3] += 3.0
            nib.save(nib.Nifti1Image(v * 50 + 300, np.diag([1.5, 1.0, 1.0, 1.0])), folder / f"{i}.nii.gz")
            rows.append(f"{split}/{i}.nii.gz,{('left', 'right')[c]}")
        if split != "new":
            (root / "scans" / f"{split}.csv").write_text("\n".join(rows) + "\n")


def _write_medmnist(folder, flag):
    """``{flag}.npz`` in the official layout with the release's split sizes (random voxels)."""
    from wrn3d_tl.data import MEDMNIST3D

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    spec, arrays = MEDMNIST3D[flag], {}
    for split, n in spec["n_samples"].items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, spec["num_classes"], (n, 1), dtype=np.uint8)
    np.savez(folder / f"{flag}.npz", **arrays)


def prepare(needs, store, workdir, monkeypatch):
    """Put what a block reads into ``workdir``; returns the names preset for the block."""
    names = {}
    for need in needs:
        if need == "cifar":  # load_cifar("cifar10") finds it through $WRN3D_DATA_DIR
            _write_cifar10(workdir / "cifar-data")
            monkeypatch.setenv("WRN3D_DATA_DIR", str(workdir / "cifar-data"))
            monkeypatch.setenv("HOME", str(workdir))
            monkeypatch.delenv("KERAS_HOME", raising=False)
        elif need == "checkpoints":  # runs/ckpt-00010000.h5 and runs/last.h5
            (workdir / "runs").mkdir(exist_ok=True)
            shutil.copyfile(store["ckpt"], workdir / "runs" / "ckpt-00010000.h5")
            shutil.copyfile(store["ckpt"], workdir / "runs" / "last.h5")
        elif need == "periodic":  # runs/ with ckpt-* from checkpoint_every=1, the newest by name damaged
            shutil.copytree(store["periodic"], workdir / "runs")
        elif need == "exported":
            shutil.copytree(store["exported"], workdir / "exported" / "wrn")
        elif need == "my_volumes":  # my_volumes.h5 and my_val.h5
            shutil.copyfile(store["volumes.h5"], workdir / "my_volumes.h5")
            shutil.copyfile(store["volumes.h5"], workdir / "my_val.h5")
        elif need == "predict_files":  # test.h5 / test.npy, and c.h5 / data.h5 / data.npy for the CLI
            shutil.copyfile(store["volumes.h5"], workdir / "test.h5")
            shutil.copyfile(store["volumes.npy"], workdir / "test.npy")
            shutil.copyfile(store["ckpt"], workdir / "c.h5")
            shutil.copyfile(store["volumes.h5"], workdir / "data.h5")
            shutil.copyfile(store["volumes.npy"], workdir / "data.npy")
        elif need == "few_volumes":  # data.npy of 5 volumes: a montage per volume costs ~1 s
            np.save(workdir / "data.npy", np.load(store["volumes.npy"])[:5])
        elif need == "pretrained":  # Standard.npz (a PyTorch WRN-10-1 state dict) and 2x32x32x3 5-class volumes
            from wrn3d_tl.data import write_hdf5_volumes

            shutil.copyfile(ROOT / "tests" / "fixtures" / "wrn10-1-robustbench.npz", workdir / "Standard.npz")
            rng = np.random.default_rng(5)
            for name in ("my_volumes.h5", "my_val.h5"):
                write_hdf5_volumes(workdir / name, rng.uniform(0, 255, (8, 2, 32, 32, 3)).astype(np.float32),
                                   np.arange(8) % 5, num_classes=5)
        elif need == "nifti_scans":  # scans/{train,val,test}.csv (class-name labels) and new_scans/
            _write_nifti_scans(workdir)
        elif need == "dicom_series":  # ct/patient07/series2: one DICOM series of 7x6x5 voxels
            from _dicom_series import volume, write_series

            write_series(workdir / "ct" / "patient07" / "series2", volume())
        elif need == "medmnist":  # an official-layout organmnist3d.npz (release split sizes) in $WRN3D_DATA_DIR
            _write_medmnist(workdir / "medmnist-data", "organmnist3d")
            monkeypatch.setenv("WRN3D_DATA_DIR", str(workdir / "medmnist-data"))
        elif need == "volumes":  # in-memory raw volumes under the names the blocks use
            vols = _raw_volumes(6, 7)
            names.update(volumes=vols, labels=_labels(6, 7), raw_volumes=vols, raw=vols, x=vols)
        else:
            raise AssertionError(f"unknown fixture {need!r}")
    return names


# ================================================================ python blocks

@dataclasses.dataclass(frozen=True)
class Py:
    needs: tuple = ()  # see prepare()
    subs: tuple = ()  # (old, new): applied to the block before it runs; old must be present
    check: object = None  # check(namespace, workdir, store) after the block ran


def _check_trainer_stepped(ns, workdir, store):
    assert ns["trainer"].step == 3 and set(ns["metrics"]) >= {"loss", "accuracy", "lr", "step", "samples_per_sec"}


def _check_hdf5_training(ns, workdir, store):
    assert ns["trainer"].step == 2 and ns["info"].num_classes == CFG_KW["num_classes"]


def _check_written_hdf5(ns, workdir, store):
    from wrn3d_tl.data import hdf5_info

    info = hdf5_info(str(workdir / "my_volumes.h5"))
    assert info.n == 6 and info.num_classes == 5 and info.normalization is not None


def _check_export(ns, workdir, store):
    assert (workdir / "exported" / "wrn" / "saved_model.pb").exists()


def _check_served(ns, workdir, store):
    assert ns["classes"].shape == (6,) and ns["out"]["logits"].shape == (6, CFG_KW["num_classes"])
    assert ns["meta"]["layout"] == "NDHWC" and set(ns["meta"]["normalization"]) == {"mean", "std"}


def _check_predicted(ns, workdir, store):
    out = ns["out"]
    assert out["class"].shape == (16,) and out["top_k_classes"].shape == (16, CFG_KW["num_classes"])


def _check_bf16_inference(ns, workdir, store):
    import tensorflow as tf

    out, fast = ns["out"], ns["fast"]
    assert fast.precision == "bf16" and out["logits"].dtype == np.float32
    np.testing.assert_allclose(out["logits"], fast.predict(ns["volumes"])["logits"], atol=1e-5)
    served = tf.saved_model.load(str(workdir / "exported" / "wrn-bf16"))
    assert json.loads(served.metadata().numpy())["precision"] == "bf16"


def _check_keras(ns, workdir, store):
    assert ns["logits"].shape == (6, CFG_KW["num_classes"]) and (workdir / "wrn.keras").exists()


def _check_manager(ns, workdir, store):
    manager = ns["manager"]
    assert os.path.basename(manager.latest()) == store["damaged"]  # the newest by name ...
    assert os.path.basename(manager.newest_verified()) == store["newest"]  # ... is skipped: it is damaged
    assert [step for step, _ in manager.checkpoints()] == sorted(step for step, _ in manager.checkpoints())


def _check_nifti_readme(ns, workdir, store):
    assert ns["info"].class_names == ("left", "right") and ns["trainer"].step == 30
    result = ns["trainer"].evaluate(log=False)
    assert result["accuracy"] >= 0.75 and set(result) >= {"auc", "confusion_matrix", "per_class_accuracy"}
    assert predict_classes_shape(workdir) == (4,)


def predict_classes_shape(workdir):
    from wrn3d_tl.predict import predict

    return predict(str(workdir / "runs" / "scans.h5"), str(workdir / "new_scans"))["class"].shape


def _check_blob_montage(ns, workdir, store):
    import matplotlib.image

    assert ns["cams"].shape == (1, 8, 8, 8) and matplotlib.image.imread(workdir / "blob_cam.png").ndim == 3


def test_readme_grad_cam_lines_are_the_example_s():
    """The README's Grad-CAM lines are what examples/explain_blobs.py runs (its flags aside)."""
    (block,) = [b for b in blocks_of("python") if b.path == "README.md" and b.first_line.startswith(
        "from wrn3d_tl.data import synthetic_blobs")]
    script = (ROOT / "examples" / "explain_blobs.py").read_text()
    script = script.replace("args.steps", "100").replace("args.out", '"docs/images/blob_cam.png"')
    code = [line.strip() for line in block.text.splitlines() if line.strip() and not line.startswith(("from ",
                                                                                                        "import "))]
    missing = [line for line in code if line not in {s.strip() for s in script.splitlines()}]
    assert not missing and len(code) == 6, missing


def _check_augment3d(ns, workdir, store):
    from wrn3d_tl.data import make_dataset

    def first(seed):
        ds = make_dataset(ns["x"], np.arange(8) % 2, batch_size=4, volume_depth=None, augment=ns["aug"], seed=seed)
        return next(iter(ds))[0].numpy()

    x1 = next(iter(ns["ds"]))[0].numpy()
    assert x1.shape == (4, 16, 16, 16, 1) and np.array_equal(x1, first(1)) and not np.array_equal(x1, first(2))


def _check_datasets(ns, workdir, store):
    x, y = next(iter(ns["train"]))
    assert x.shape[1:] == (8, 32, 32, 3) and x.dtype == "float32" and y.dtype == "int64"


# Keyed by (file, first line of the block).
def _check_pretrained_python(ns, workdir, store):
    assert ns["model_3d"].wrn_config.input_shape == (8, 32, 32, 3) and ns["model_3d"].wrn_config.num_classes == 5
    assert ns["trainer"].trainable and all(n.startswith(("group3/", "head/")) for n in ns["trainer"].trainable)


def _check_pretrained_cli(workdir):
    from wrn3d_tl.checkpoint import read_checkpoint

    init, tuned = read_checkpoint(workdir / "runs" / "wrn28-10-3d.h5"), read_checkpoint(workdir / "runs" / "fine-tuned" / "last.h5")
    assert init["config"]["input_shape"] == [2, 32, 32, 3] and init["config"]["num_classes"] == 5
    assert tuned["config"] == init["config"] and tuned["normalization"] == {"mean": [0.0] * 3, "std": [255.0] * 3}
    for name in ("stem/conv/kernel", "group1/block1/conv1/kernel"):
        assert np.array_equal(init["weights"][name], tuned["weights"][name]), name


def _check_shards(ns, workdir, store):
    # the share is the second half of the first global batch (asserted in the block), and the
    # resumed pipeline starts at global batch 1000 of the same stream, still splittable
    assert ns["later"].wrn3d_pipeline.start == 1000
    assert ns["part"].wrn3d_pipeline.replica_batch == 8 and ns["x1"].shape[0] == 8


def _check_scan_reading(ns, workdir, store):
    assert ns["train"].wrn3d_preprocessing == {"reader": "nifti", "intensity": "zscore", "target_shape": [96, 96, 96],
                                               "orientation": "RAS", "spacing": [1.0, 1.0, 1.0]}
    assert ns["voxels"].shape == (9, 8, 8, 1) and np.allclose(np.diag(ns["affine"])[:3], 1.0)   # 6 x 1.5 mm


PYTHON_BLOCKS = {
    ("README.md", "import numpy as np"): Py(),
    ("README.md", "from wrn3d_tl.experiment import make_trainer"): Py(
        subs=(("range(10)", "range(3)"),
              # 64 training and 16 test images instead of the synthetic set's 10000 and 2000
              ("batch_size=16)", "batch_size=16, synthetic_train=64, synthetic_test=16)")),
        check=_check_trainer_stepped),
    ("docs/data.md", 'from wrn3d_tl.data import load_cifar'): Py(needs=("cifar",)),
    ("docs/data.md", "from wrn3d_tl.data import load_cifar, compute_normalization, make_dataset"): Py(
        needs=("cifar",), check=_check_datasets),
    ("docs/data.md", "from wrn3d_tl.data import write_hdf5_volumes, hdf5_info"): Py(
        needs=("volumes",), check=_check_written_hdf5),
    ("docs/data.md", "from wrn3d_tl.data import hdf5_dataset, hdf5_info"): Py(
        needs=("my_volumes",),
        subs=(("depth=16, widen_factor=4", "depth=10, widen_factor=1"), ("range(100)", "range(2)")),
        check=_check_hdf5_training),
    ("docs/data.md", "from wrn3d_tl.data import nifti_dataset, nifti_info"): Py(
        needs=("nifti_scans",),
        subs=(("depth=16, widen_factor=4", "depth=10, widen_factor=1"), ("total_steps=2000", "total_steps=30"),
              ("trainer.fit(2000)", "trainer.fit(30)")),
        check=_check_nifti_readme),
    ("docs/data.md", "from wrn3d_tl.data import Augment3D, make_dataset"): Py(check=_check_augment3d),
    ("docs/data.md", "from wrn3d_tl.data import nifti_dataset, read_scan"): Py(
        needs=("nifti_scans",), check=_check_scan_reading),
    ("README.md", "from wrn3d_tl.data import synthetic_blobs"): Py(
        subs=(("total_steps=100", "total_steps=10"), ("trainer.fit(100)", "trainer.fit(10)"),
              ('"docs/images/blob_cam.png"', '"blob_cam.png"')),
        check=_check_blob_montage),
    ("docs/memory.md", "from wrn3d_tl.memory import estimate_memory, largest_batch"): Py(),
    ("docs/distributed.md", "import numpy as np"): Py(check=_check_shards),
    ("docs/performance.md", "import numpy as np, tensorflow as tf"): Py(),
    ("docs/training.md", "from wrn3d_tl.checkpoint import CheckpointManager"): Py(
        needs=("periodic",), check=_check_manager),
    ("docs/using-a-trained-model.md", "from wrn3d_tl.train import Trainer"): Py(
        needs=("checkpoints",), check=_check_export),
    ("docs/pretrained.md", "from wrn3d_tl.convert import from_torch, inflate"): Py(
        needs=("pretrained",), subs=(('from_torch("Standard.pt")', 'from_torch("Standard.npz")'),),
        check=_check_pretrained_python),
    ("docs/using-a-trained-model.md", "import json"): Py(
        needs=("exported", "volumes"), check=_check_served),
    ("docs/using-a-trained-model.md", "from wrn3d_tl.predict import predict, Predictor"): Py(
        needs=("checkpoints", "predict_files", "volumes"), check=_check_predicted),
    ("docs/using-a-trained-model.md", "from wrn3d_tl.export import export_saved_model"): Py(
        needs=("checkpoints", "volumes"), check=_check_bf16_inference),
    ("docs/using-a-trained-model.md", "from wrn3d_tl.keras_twin import build_keras_wrn, tl_to_keras, keras_to_tl"): Py(
        needs=("checkpoints", "volumes"), check=_check_keras),
}


@pytest.mark.parametrize("block", blocks_of("python"), ids=lambda b: b.id)
def test_python_block_runs(block, store, tmp_path, monkeypatch):
    spec = PYTHON_BLOCKS.get((block.path, block.first_line))
    assert spec is not None, (f"{block.id}: a python block that tests/test_docs.py does not know; add it to "
                              f"PYTHON_BLOCKS under {(block.path, block.first_line)!r}")
    code = substitute(block, spec.subs)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_block__", **prepare(spec.needs, store, tmp_path, monkeypatch)}
    exec(compile(code, block.id, "exec"), namespace)  # noqa: S102 - the documented code is what is tested
    if spec.check is not None:
        spec.check(namespace, tmp_path, store)


# ================================================================ bash blocks

@dataclasses.dataclass(frozen=True)
class Bash:
    needs: tuple = ()
    subs: tuple = ()
    check: object = None  # check(workdir)


def _check_hdf5_cli(workdir):
    from wrn3d_tl.checkpoint import read_checkpoint

    assert read_checkpoint(str(workdir / "runs" / "wrn" / "last.h5"))["step"] == 2


def _check_medmnist_cli(workdir):
    metrics = json.loads((workdir / "runs" / "organmnist3d" / "metrics.json").read_text())
    assert metrics["test"]["samples"] == 16 and metrics["val"]["samples"] == 16
    assert metrics["test"]["class_names"][:2] == ["liver", "kidney-right"]
    assert 0 <= metrics["test"]["accuracy"] <= 1 and sum(map(sum, metrics["test"]["confusion_matrix"])) == 16
    run = json.loads((workdir / "runs" / "organmnist3d" / "run.json").read_text())
    assert run["data"]["--data"]["flag"] == "organmnist3d" and run["trainer"]["total_steps"] == 2


def _check_explain_cli(workdir):
    from wrn3d_tl.predict import predict

    classes = predict(str(workdir / "c.h5"), str(workdir / "data.npy"))["class"]
    assert sorted(os.listdir(workdir / "cams")) == sorted(f"{i}_{classes[i]}.png" for i in (0, 3))
    assert sorted(os.listdir(workdir / "cams_all")) == sorted(f"{i}_{c}.png" for i, c in enumerate(classes))


def _check_scans_to_served_model(workdir):
    import csv

    from wrn3d_tl.checkpoint import read_checkpoint

    run = workdir / "runs" / "scans"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["samples"] == 8 and metrics["test"]["class_names"] == ["left", "right"]
    assert metrics["test"]["accuracy"] >= 0.75
    assert read_checkpoint(str(run / "best.h5"))["step"] == metrics["selected"]["step"]
    assert (run / "index.html").is_file() and (workdir / "runs" / "model" / "saved_model.pb").is_file()
    with open(run / "new_scans.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["class_name"] for r in rows} <= {"left", "right"}


def _check_prepared_reading(workdir):
    import csv

    import nibabel as nib

    from wrn3d_tl.checkpoint import read_checkpoint

    reading = read_checkpoint(str(workdir / "runs" / "ras" / "best.h5"))["trainer"]["preprocessing"]
    assert reading == {"reader": "nifti", "intensity": "zscore", "target_shape": [9, 8, 8], "orientation": "RAS",
                       "spacing": [1.0, 1.0, 1.0]}
    with open(workdir / "series2.csv", newline="") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [str(workdir / "ct" / "patient07" / "series2")]
    maps = sorted(os.listdir(workdir / "cams_nifti"))
    assert len(maps) == 4 and all(m.endswith(".nii.gz") for m in maps)
    for name in maps:
        scan = workdir / "new_scans" / (name.split("_", 2)[2])
        assert nib.load(workdir / "cams_nifti" / name).shape == nib.load(scan).shape


def _check_export_cli(workdir):
    import tensorflow as tf

    served = tf.saved_model.load(str(workdir / "exported" / "wrn-cli"))
    meta = json.loads(served.metadata().numpy())
    assert meta["format"] == "wrn3d_tl-saved-model" and meta["normalization"] is not None


def _check_bf16_cli(workdir):
    import csv

    import tensorflow as tf

    with open(workdir / "preds_bf16.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) > 0
    assert json.loads(tf.saved_model.load(str(workdir / "exported" / "wrn-bf16")).metadata().numpy())[
        "precision"] == "bf16"


def _check_predict_csv(workdir):
    import csv

    text_blocks = [b for b in blocks_of("text") if b.path == "docs/using-a-trained-model.md"
                   and b.first_line.startswith("index,")]
    assert len(text_blocks) == 1, "the CSV example of wrn3d-predict"
    documented_header = text_blocks[0].first_line
    for name, k in (("preds.csv", 3), ("preds_npy.csv", 5), ("preds_module.csv", 5)):
        rows = list(csv.reader(open(workdir / name)))
        assert len(rows) == 1 + 16, name
        assert rows[0] == ["index", "class", "probability", f"top{k}", f"top{k}_probabilities"], name
    assert open(workdir / "preds_npy.csv").readline().strip() == documented_header


# Executed: keyed by the block's first line.
BASH_RUN = {
    "wrn3d-train --data my_volumes.h5 --val my_val.h5 --depth 16 --width 4 --batch-size 16 --epochs 30 --out runs/wrn": Bash(
        needs=("my_volumes",),
        subs=(("--depth 16 --width 4 --batch-size 16 --epochs 30", "--depth 10 --width 1 --batch-size 4 --iters 2"),),
        check=_check_hdf5_cli),
    "wrn3d-predict --checkpoint c.h5 --hdf5 data.h5 [--key volumes] --out preds.csv [--batch-size N] [--top-k K]": Bash(
        needs=("predict_files",),
        subs=(("[--key volumes]", "--key volumes"), ("[--batch-size N]", "--batch-size 4"), ("[--top-k K]", "--top-k 3"),
              ("--npy data.npy --out preds.csv", "--npy data.npy --out preds_npy.csv"),
              ("python -m wrn3d_tl.commands.predict ...", "python -m wrn3d_tl.commands.predict --checkpoint c.h5 --npy data.npy "
                                                 "--out preds_module.csv")),
        check=_check_predict_csv),
    "wrn3d-convert --torch Standard.pt --out runs/wrn28-10-3d.h5 --volume-depth 8 --num-classes 5 --mean 0,0,0 --std 255,255,255": Bash(
        needs=("pretrained",), subs=(("Standard.pt", "Standard.npz"), ("--volume-depth 8", "--volume-depth 2"))),
    "wrn3d-train --data my_volumes.h5 --val my_val.h5 --init-from runs/wrn28-10-3d.h5 \\": Bash(
        needs=("pretrained",),
        subs=(("wrn3d-train --data", "wrn3d-convert --torch Standard.npz --out runs/wrn28-10-3d.h5 "
               "--volume-depth 2 --num-classes 5 --mean 0,0,0 --std 255,255,255\nwrn3d-train --data"),
              ("--batch-size 8 --epochs 10", "--batch-size 4 --iters 2")),
        check=_check_pretrained_cli),
    "wrn3d-train --data medmnist:organmnist3d --depth 16 --width 4 --epochs 30 --out runs/organmnist3d": Bash(
        needs=("medmnist",),
        subs=(("--depth 16 --width 4 --epochs 30", "--depth 10 --width 1 --epochs 1 --limit 16 --batch-size 8"),),
        check=_check_medmnist_cli),
    "python examples/explain_blobs.py": Bash(
        subs=(("python examples/explain_blobs.py", "python examples/explain_blobs.py --steps 5 --out blob.png"),),
        check=lambda workdir: (workdir / "blob.png").exists() or pytest.fail("no montage")),
    "wrn3d-explain --checkpoint c.h5 --npy data.npy --out cams --indices 0,3": Bash(
        needs=("predict_files", "few_volumes"), check=_check_explain_cli),
    "wrn3d-predict --checkpoint c.h5 --npy data.npy --out preds_bf16.csv --precision bf16": Bash(
        needs=("predict_files",), check=_check_bf16_cli),
    "wrn3d-train --data scans/train.csv --val scans/val.csv --test scans/test.csv --depth 16 --width 4 --epochs 30 --export runs/model --out runs/scans": Bash(
        needs=("nifti_scans",),
        subs=(("--depth 16 --width 4 --epochs 30", "--depth 10 --width 1 --iters 12 --batch-size 4"),),
        check=_check_scans_to_served_model),
    "wrn3d-prepare scans/train.csv --out train.h5 --orientation RAS --spacing 1 --target-shape 96,96,96": Bash(
        needs=("nifti_scans", "dicom_series"),
        subs=(("--target-shape 96,96,96", "--target-shape 9,8,8"),
              ("--depth 16 --width 4 --epochs 30", "--depth 10 --width 1 --iters 4 --batch-size 4")),
        check=_check_prepared_reading),
    "wrn3d-export --checkpoint runs/last.h5 --out exported/wrn-cli": Bash(
        needs=("checkpoints",), check=_check_export_cli),
}

# Mirrored by existing tests (running them here would take minutes or need several
# machines / GPUs / internet): first line -> "file::test" names.
BASH_MAPPED = {
    "make demo   # creates .venv, installs, runs examples/cifar_wide_resnet_tl.py --iters 10": [
        "tests/test_examples.py::test_main_job_falls_back_loudly_trains_evaluates_and_resumes_as_if_uninterrupted",
        "tests/test_docs.py::test_make_targets_run_the_documented_commands",
    ],
    "python examples/cifar_wide_resnet_tl.py --distribute mirrored --batch-size 128": [
        "tests/test_distribute.py::test_two_workers_match_mirrored_over_two_cpus",  # --distribute mirrored --cpu-replicas 2
    ],
    "# on host1": [
        "tests/test_distribute.py::test_two_workers_match_mirrored_over_two_cpus",
        "tests/test_distribute.py::test_killed_worker_fails_the_other_fast_and_resume_completes",
    ],
    'pip install -e ".[gpu]"   # CUDA libraries, into the venv make uses (.venv, or VENV=path)': [
        "tests/test_gpu_check.py::test_without_a_gpu_the_check_fails_with_one_line",  # make gpu-check, where no GPU is
    ],
    ".venv/bin/pip install torch==2.13.0           # optional: without it the PyTorch rows are skipped": [
        "tests/test_docs.py::test_benchmark_commands_parse",
    ],
}


def _commands(text):
    """Shell lines -> argv lists: continuation lines joined, comments and blank lines dropped."""
    text = text.replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in text.splitlines()) if argv]


def _run_in_process(argv, load_example):
    """Run one documented command through its script's main(argv); returns the exit status."""
    if argv[0] == "python" and len(argv) > 1 and re.fullmatch(r"examples/\w+\.py", argv[1]):
        main, args = load_example(Path(argv[1]).stem).main, argv[2:]
    elif argv[0] == "wrn3d-predict" or argv[:3] == ["python", "-m", "wrn3d_tl.commands.predict"]:
        from wrn3d_tl.commands import predict

        main, args = predict.main, argv[1:] if argv[0] == "wrn3d-predict" else argv[3:]
    elif argv[0] in ("wrn3d-train", "wrn3d-prepare"):
        from wrn3d_tl.commands import prepare, train

        main, args = (train.main if argv[0] == "wrn3d-train" else prepare.main), argv[1:]
    elif argv[0] == "saved_model_cli":   # TensorFlow's own tool, in its own process
        done = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", *argv[1:]],
                              capture_output=True, timeout=300)
        return done.returncode or int(b"inputs['volumes']" not in done.stdout)   # raw volumes in
    elif argv[0] == "wrn3d-export":
        from wrn3d_tl.commands import export

        main, args = export.main, argv[1:]
    elif argv[0] == "wrn3d-convert":
        from wrn3d_tl.commands import convert

        main, args = convert.main, argv[1:]
    elif argv[0] == "wrn3d-explain":
        from wrn3d_tl.commands import explain

        main, args = explain.main, argv[1:]
    else:
        raise AssertionError(f"tests/test_docs.py does not know how to run {argv!r}")
    try:
        result = main(args)
    except SystemExit as e:
        return e.code or 0
    return result if isinstance(result, int) else 0


@pytest.mark.parametrize("block", blocks_of("bash"), ids=lambda b: b.id)
def test_bash_block_is_run_or_mirrored(block):
    key = block.first_line
    if key in BASH_MAPPED:
        assert key not in BASH_RUN
        for name in BASH_MAPPED[key]:
            test_file, test_name = name.split("::")
            source = (ROOT / test_file).read_text(encoding="utf-8")
            assert re.search(rf"^def {re.escape(test_name)}\(", source, re.M), \
                f"{block.id} is mapped to {name}, which does not exist"
        return
    assert key in BASH_RUN, (f"{block.id}: a bash block that is neither run nor mapped to a test; add it to "
                             f"BASH_RUN or BASH_MAPPED in tests/test_docs.py under {key!r}")


@pytest.mark.parametrize("block", [b for b in blocks_of("bash") if b.first_line in BASH_RUN], ids=lambda b: b.id)
def test_bash_block_runs(block, store, tmp_path, monkeypatch, load_example):
    spec = BASH_RUN[block.first_line]
    text = substitute(block, spec.subs)
    monkeypatch.chdir(tmp_path)
    prepare(spec.needs, store, tmp_path, monkeypatch)
    for argv in _commands(text):
        assert _run_in_process(argv, load_example) == 0, f"{block.id}: {shlex.join(argv)} failed"
    if spec.check is not None:
        spec.check(tmp_path)


def test_every_block_has_a_language_and_every_entry_a_block():
    untagged = [b.id for b in ALL_BLOCKS if not b.lang]
    assert not untagged, f"blocks without a language tag (use ```text for output): {untagged}"
    unknown = [b.id for b in ALL_BLOCKS if b.lang not in CODE_LANGS + ("text",)]
    assert not unknown, f"blocks in a language tests/test_docs.py does not run: {unknown}"
    py_keys = [(b.path, b.first_line) for b in blocks_of("python")]
    assert len(py_keys) == len(set(py_keys)), "two python blocks of one file share a first line"
    assert set(PYTHON_BLOCKS) <= set(py_keys), f"entries without a block: {set(PYTHON_BLOCKS) - set(py_keys)}"
    bash_keys = {b.first_line for b in blocks_of("bash")}
    stale = (set(BASH_RUN) | set(BASH_MAPPED)) - bash_keys
    assert not stale, f"bash entries without a block: {stale}"


def test_make_targets_run_the_documented_commands():
    """README's two commands: `make demo` runs the main job for 10 iterations, `make test` the
    suite, both in .venv after installing the package (with the test extras)."""
    make = (ROOT / "Makefile").read_text()
    recipes = dict(re.findall(r"^([\w$().-]+):[^\n=]*\n((?:\t[^\n]*\n)+)", make, re.M))
    assert re.search(r"^VENV \?= \.venv$", make, re.M) and re.search(r"^ITERS \?= 10$", make, re.M)
    assert "examples/cifar_wide_resnet_tl.py --iters $(ITERS)" in recipes["demo"]
    pytest = re.search(r"^PYTEST := (.*)$", make, re.M).group(1)
    assert "-m pytest" in pytest and "--durations=30" in pytest
    assert recipes["test"].split() == ["$(PYTEST)", "-m", '"not', 'slow"', "tests"]     # the fast tier
    assert recipes["test-full"].split() == ["$(PYTEST)", "tests"]                      # everything
    assert recipes["mutation-check"].split() == ["$(PY)", "tests/mutation_check.py"]
    ci = [line.split("#")[0].split() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ["make", "test-full"] in ci                                                  # what CI runs
    assert re.search(r"^demo: \$\(STAMP\)", make, re.M) and re.search(r"^test: \$\(STAMP\)", make, re.M)
    assert 'pip install -q -e ".[test]"' in recipes["$(STAMP)"]


def test_benchmark_commands_parse(load_benchmark):
    """docs/performance.md's benchmark commands: the flags exist (running them takes minutes and
    PyTorch), and the PyTorch pin is the version the results were measured with."""
    (block,) = [b for b in blocks_of("bash") if b.path == "docs/performance.md"]
    scripts = ("bench_train", "bench_kernels", "bench_bf16_inference")
    modules = {name: load_benchmark(name) for name in scripts}
    commands = _commands(block.text)
    for argv in commands:
        if argv[0].endswith("/pip"):
            pinned = [a for a in argv if a.startswith("torch==")]
            assert pinned and pinned[0].split("==")[1] in (ROOT / "docs" / "performance.md").read_text()
        else:
            assert argv[0] == ".venv/bin/python" and argv[1].startswith("benchmarks/"), argv
            modules[Path(argv[1]).stem].parse_args(argv[2:])  # SystemExit on an unknown flag
    assert {Path(a[1]).stem for a in commands if not a[0].endswith("/pip")} == set(scripts)


# ================================================================ links

def _slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path):
    text = Path(path).read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target + " (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme]
    assert not missing, f"docs pages the README does not link: {missing}"


# ================================================================ numbers and names the docs state

def test_memory_table_matches_estimate_memory():
    """docs/memory.md's "estimated" column is estimate_memory(...)["step_growth"] in MB."""
    from wrn3d_tl.memory import estimate_memory
    from wrn3d_tl.model import WRNConfig

    text = (ROOT / "docs" / "memory.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (WRN-\d+-\d+) \|\s+(\d+) \|\s+(yes|no)\s+\|\s+\d+ MB \|\s+(\d+) MB \|$", text, re.M)
    assert len(rows) == 5
    for name, batch, recompute, documented in rows:
        cfg = WRNConfig.from_name(name, input_shape=(8, 32, 32, 3))
        estimate = estimate_memory(cfg, int(batch), recompute=recompute == "yes")["step_growth"] / 1e6
        assert abs(estimate - int(documented)) < 1, (name, batch, recompute, estimate)


def test_readme_architecture_numbers():
    """README: the 2D parameter counts are the ones tests/test_model.py pins; WRN-16-4 3D's
    parameters and GFLOPs."""
    from wrn3d_tl.model import WRNConfig, count_flops

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pinned = (ROOT / "tests" / "test_model.py").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (WRN-\d+-\d+)\s+\|\s+([\d,]+) \|", readme, re.M)
    assert len(rows) == 4
    for name, count in rows:
        assert re.search(rf'"{name}", {count.replace(",", "_")},', pinned), (name, count)
    assert "8,150,330 parameters" in readme and "8_150_330" in pinned
    cfg = WRNConfig(depth=16, widen_factor=4, input_shape=(8, 32, 32, 3))
    assert f"costs {count_flops(cfg) / 1e9:.1f} GFLOPs" in readme


def test_documented_trainer_signature_is_the_real_one():
    """docs/training.md's Trainer(...) line: the real parameters, in order, with their defaults
    (where the docs list alternatives, a|b|c, the first is the default)."""
    from wrn3d_tl.train import Trainer

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    documented = re.search(r"`Trainer\((.*?)\)`", text, re.S).group(1)
    params = [p.strip() for p in documented.replace("\n", " ").split(",")]
    real = {n: p.default for n, p in inspect.signature(Trainer.__init__).parameters.items() if n != "self"}
    names = [p.split("=")[0] for p in params if p != "*"]
    assert names == list(real)
    for p in params:
        if "=" in p:
            name, default = p.split("=", 1)
            assert ast.literal_eval(default.split("|")[0]) == real[name], p


def _help_entries(script, capsys, load_example):
    """``--help`` of an example script: {first option string: its help entry}."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        load_example(script).parse_args(["--help"])
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=-)", text[text.index("options:"):])[1:]
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}


@pytest.mark.parametrize("module", ["predict", "explain", "export", "convert", "prepare", "train"])
def test_command_help_says_each_default_once_and_none_for_required_flags(module, capsys):
    """``--help`` of the console scripts: one default per flag; a required flag (``--checkpoint``,
    ``--out``) shows none, and help that says its default in words gets no second one."""
    import importlib

    main = importlib.import_module(f"wrn3d_tl.commands.{module}").main
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    entries = re.split(r" (?=--[a-z])", text[text.index("options:"):])
    assert not [e for e in entries if e.count("(default") > 1], entries
    if module == "train":   # no required flag: every one says its default
        from wrn3d_tl.commands.train import build_parser

        text = build_parser().format_help()
        options = re.split(r"\n  (?=-)", text[text.index("options:"):])[1:]   # one entry per flag, as printed
        assert len(options) > 40
        assert not [o.split()[0] for o in options if "(default" not in " ".join(o.split())
                    and not o.startswith(("-h", "--version"))]
        return
    required = [e for e in entries if e.startswith(("--checkpoint CHECKPOINT", "--out OUT"))]
    assert required and not [e for e in required if "(default" in e]


_REQUIRED = {}   # script -> its required flags: no default to show


@pytest.mark.parametrize("script", ["cifar_wide_resnet_tl", "cifar_wide_resnet_keras"])
def test_example_help_shows_every_default(script, capsys, load_example):
    """README: "`--help` lists them all, with their defaults" (and the other examples' too),
    but for required flags, which have none."""
    entries = _help_entries(script, capsys, load_example)
    without = [flag for flag, entry in entries.items()
               if flag not in ("-h", "--version", *_REQUIRED.get(script, ())) and "(default" not in entry]
    assert not without, f"{script} --help shows no default for {without}"


def test_readme_flags_are_the_main_jobs(capsys, load_example):
    """Every flag the README lists for the main job is one of its flags."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("Useful flags:"):readme.index("### Stepping the trainer")]
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", paragraph)) - {"--help"}
    missing = sorted(flags - set(_help_entries("cifar_wide_resnet_tl", capsys, load_example)))
    assert not missing, f"README flags the main job does not have: {missing}"


PERF_CONFIGS = {"WRN-16-4 3D": "wrn16-4-3d", "WRN-40-4 2D": "wrn40-4-2d", "WRN-10-2 3D": "wrn10-2-3d"}


def _documented(documented, value):
    """Whether a number in the docs is ``value`` shown with as many decimals as it has."""
    documented = documented.strip().strip("*").rstrip("x%")
    decimals = len(documented.split(".")[1]) if "." in documented else 0
    return f"{value:.{decimals}f}" == documented


def _perf_machines():
    """docs/performance.md's summary, one part per machine kind: {heading: (text, records)}
    with the JSON records of the run each part quotes (the first named in it)."""
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    summary = text[text.index("## Summary"):text.index("## Machine")]
    parts = re.split(r"^### ", summary, flags=re.M)[1:]
    out = {}
    for part in parts:
        path = re.findall(r"`(benchmarks/results/[^`]+\.jsonl)`", part)[0]
        out[part.splitlines()[0]] = (part, [json.loads(line) for line in open(ROOT / path)])
    return out


def test_performance_summary_per_machine_is_the_recorded_run():
    """Every machine kind of docs/performance.md's summary quotes its run's JSON records:
    samples/s of every implementation, precision and phase, and wrn3d_tl / best rival."""
    machines = _perf_machines()
    assert len(machines) == 4 and sum("Xeon" in h for h in machines) == 1 and sum("EPYC" in h for h in machines) == 3
    tables = [(h, v) for h, v in machines.items() if "2026-11-25" not in h]   # the 11-25 run: the next test
    assert len(tables) == 3
    for heading, (part, records) in tables:
        env = next(r for r in records if r["kind"] == "environment")
        assert env["cpu"] in part and all(f"`{flag}`" in part for flag in env["cpu_flags"] if "bf16" in flag)
        assert ("amx_bf16" in env["cpu_flags"]) == ("Xeon" in heading)
        _check_machine_table(part, records)
    part, records = next(v for h, v in tables if "AVX512_BF16" in h)
    env = next(r for r in records if r["kind"] == "environment")
    assert env["onednn"] is True and "oneDNN on" in part and not env.get("isa_caps")
    steps = {(r["config"], r["impl"], r["precision"]): r for r in records if r["kind"] == "step"}
    (summary,) = [r for r in records if r["kind"] == "summary"]
    ratios = summary["ratios"]
    text = " ".join(part.split())
    assert f"({summary['elapsed_s']:.0f} s)" in text
    assert f"fp32 {summary['matmul_peak']['fp32']:.0f} GFLOP/s, bf16 {summary['matmul_peak']['bf16']:.0f} GFLOP/s" in text
    assert ("bf16 over fp32: " + ", ".join(f"{ratios[f'{c}/bf16_over_fp32']:.2f}x ({label})" for c, label in
            (("wrn16-4-3d", "WRN-16-4 3D"), ("wrn40-4-2d", "WRN-40-4 2D"), ("wrn10-2-3d", "WRN-10-2 3D")))
            .replace("x (WRN-40-4 2D), ", "x (WRN-40-4 2D) and ")) in text
    xla = [steps[(c, "wrn3d_tl+xla", "fp32")]["train"]["median_s"] / steps[(c, "wrn3d_tl", "fp32")]["train"]["median_s"]
           for c in ("wrn16-4-3d", "wrn40-4-2d", "wrn10-2-3d")]
    assert f"train step is {xla[0]:.1f}x, {xla[1]:.1f}x and {xla[2]:.1f}x slower" in text
    big = [ratios[f"{c}/{p}/{ph}/wrn3d_tl_vs_best"] for c in ("wrn16-4-3d", "wrn40-4-2d") for p in ("fp32", "bf16")
           for ph in ("train", "infer")]
    assert sum(r >= 0.98 for r in big) == 7 and "in 7 of the 8 cells" in text
    small = [ratios[f"wrn10-2-3d/{p}/{ph}/wrn3d_tl_vs_best"] for p in ("fp32", "bf16") for ph in ("train", "infer")]
    assert f"(the four span {min(small):.2f}-{max(small):.2f})" in text


def _check_machine_table(part, records):
    """The table of a machine part, a row per config and precision run (6, or 3 where only
    fp32 ran): samples/s of wrn3d_tl, Keras and PyTorch per phase, and wrn3d_tl / the faster
    rival, are the run's records."""
    steps = {(r["config"], r["impl"], r["precision"]): r for r in records if r["kind"] == "step"}
    (ratios,) = [r["ratios"] for r in records if r["kind"] == "summary"]
    rows = re.findall(r"^\| (WRN-\d+-\d+ [23]D), [^|]* \| (fp32|bf16) \|((?: [^|]+ \|){8})$", part, re.M)
    assert len(rows) == len({(c, p) for c, i, p in steps if i == "wrn3d_tl"}) in (3, 6)
    for label, precision, cells in rows:
        cells = [c for c in cells.split("|") if c.strip()]
        config = PERF_CONFIGS[label]
        for phase, block in (("train", cells[:4]), ("infer", cells[4:])):
            for impl, documented in zip(("wrn3d_tl", "keras", "torch"), block[:3]):
                assert _documented(documented, steps[(config, impl, precision)][phase]["samples_per_s"]), (
                    label, precision, phase, impl, documented)
            assert _documented(block[3], ratios[f"{config}/{precision}/{phase}/wrn3d_tl_vs_best"]), (
                label, precision, phase, block[3])


def test_capped_avx2_part_is_the_recorded_runs():
    """The AVX2-emulated part of docs/performance.md: the caps, the command, the time and
    matmul peak, and what its text says of the cells and of the kernels alone under the same
    caps, are those of the records files it names (its table: the test above)."""
    machines = _perf_machines()
    (part, records), = [v for h, v in machines.items() if "capped to AVX2" in h]
    (_, uncapped), = [v for h, v in machines.items() if "AVX512_BF16" in h and "2026-11-25" not in h]
    text = " ".join(part.split())
    env = next(r for r in records if r["kind"] == "environment")
    caps = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert env["isa_caps"] == caps and all(f"`{k}={v}`" in text for k, v in caps.items())
    assert " ".join(env["argv"][:5]) in text and "AVX2" in env["fp32_limit"]["basis"]
    assert all(r["onednn"] is True for r in records if r["kind"] == "step")
    (summary,) = [r for r in records if r["kind"] == "summary"]
    assert f"{summary['elapsed_s']:.0f} s, TensorFlow matmul peak fp32 {summary['matmul_peak']['fp32']:.0f} GFLOP/s" in text
    assert "bf16" not in summary["matmul_peak"]
    configs = ("wrn16-4-3d", "wrn40-4-2d", "wrn10-2-3d")
    cells = [summary["ratios"][f"{c}/fp32/{ph}/wrn3d_tl_vs_best"] for c in configs for ph in ("train", "infer")]
    assert sum(r < 0.995 for r in cells) == 5 and "Five of the six cells are below 1.00" in text
    assert f"({min(r for r in cells if r < 0.995):.2f}-{max(r for r in cells if r < 0.995):.2f})" in text
    (then,) = [r["ratios"] for r in uncapped if r["kind"] == "summary"]
    before = [then[f"{c}/fp32/{ph}/wrn3d_tl_vs_best"] for c in configs for ph in ("train", "infer")]
    assert f"uncapped, the same six cells were {min(before):.2f}-{max(before):.2f} in the 12-07 run" in text
    name = re.search(r"`benchmarks/results/(kernels_2026-12-07-epyc-capped[^`]+\.jsonl)`", part).group(1)
    kernels = [json.loads(line) for line in open(ROOT / "benchmarks" / "results" / name)]
    assert kernels[0]["isa_caps"] == caps
    total = {}
    for r in kernels[1:]:
        key = (r["config"], r["framework"], r["kind"])
        total[key] = total.get(key, 0.0) + r["ms"] * r["count"]

    def tf_over_torch(config, kinds):
        return (sum(v for (c, fw, k), v in total.items() if c == config and fw == "tf" and k in kinds)
                / sum(v for (c, fw, k), v in total.items() if c == config and fw == "torch" and k in kinds))

    every = {k for _, _, k in total}
    alone = {c: tf_over_torch(c, every) for c in configs}
    assert (f"take {alone['wrn16-4-3d']:.2f}x (WRN-16-4 3D), {alone['wrn40-4-2d']:.2f}x (WRN-40-4 2D) and "
            f"{alone['wrn10-2-3d']:.2f}x (WRN-10-2 3D) PyTorch's time") in text
    grads = [tf_over_torch(c, {"conv grad filter"}) for c in configs]
    assert f"(its filter gradients {min(grads):.2f}-{max(grads):.2f}x)" in text
    assert f"(forward {tf_over_torch('wrn40-4-2d', {'batch norm fwd'}):.1f}x PyTorch's on WRN-40-4 2D's shapes)" in text
    for i, c in enumerate(configs):      # "Each step's gap is smaller than its kernels' gap."
        assert min(cells[2 * i:2 * i + 2]) > 1 / alone[c], c
    steps = {(r["config"], r["impl"]): r for r in records if r["kind"] == "step"}
    ours, keras = (steps[("wrn16-4-3d", impl)]["infer"]["timed_s"] for impl in ("wrn3d_tl", "keras"))
    assert (f"its {len(keras)} timed rounds took {min(keras) * 1e3:.0f}-{max(keras) * 1e3:.0f} ms a batch, ours "
            f"{min(ours) * 1e3:.0f}-{max(ours) * 1e3:.0f} ms") in text
    vs_keras = []
    paths = set(re.findall(r"`(benchmarks/results/2026-12-0[67]-epyc-avx512bf16[^`]*\.jsonl)`",
                           " ".join(text for text, _ in machines.values())))
    for path in sorted(paths, key=lambda p: (p[:29], "again" in p or "big-configs" in p)):   # in the order run
        run = {(r["config"], r["impl"], r["precision"]): r for r in map(json.loads, open(ROOT / path))
               if r["kind"] == "step"}
        vs_keras.append(run[("wrn16-4-3d", "wrn3d_tl", "fp32")]["infer"]["samples_per_s"]
                        / run[("wrn16-4-3d", "keras", "fp32")]["infer"]["samples_per_s"])
    assert len(vs_keras) == 3
    assert "wrn3d_tl / Keras {:.2f}, {:.2f} and {:.2f} over the three runs".format(*vs_keras) in text


def test_performance_summary_is_the_recorded_run():
    """docs/performance.md's AMD EPYC summary tables and XLA ratios are those of the JSON
    records of the run they quote (benchmarks/results/2026-11-25-epyc-2core-bn4d.jsonl)."""
    ((summary, records),) = [v for h, v in _perf_machines().items() if "EPYC" in h and "2026-11-25" in h]
    steps = {(r["config"], r["impl"], r["precision"]): r for r in records if r["kind"] == "step"}
    (ratios,) = [r["ratios"] for r in records if r["kind"] == "summary"]
    configs = PERF_CONFIGS
    same = _documented
    rows = re.findall(r"^\| (WRN-\d+-\d+ [23]D), [^|]* \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", summary, re.M)
    assert len(rows) == 3
    for label, *cells in rows:
        for impl, cell in zip(("wrn3d_tl", "keras", "torch"), cells):
            for precision, documented in zip(("fp32", "bf16"), cell.split("/")):
                value = steps[(configs[label], impl, precision)]["train"]["samples_per_s"]
                assert same(documented, value), (label, impl, precision, documented, value)
    ratio_rows = {"wrn3d_tl fp32 / best of Keras, PyTorch": "fp32/train/wrn3d_tl_vs_best",
                  "fp32 achieved GFLOP/s / fp32 matmul peak": "fp32_of_matmul_peak",
                  "bf16 / fp32 throughput": "bf16_over_fp32",
                  "step time fed by the `tf.data` pipeline / on a pre-made batch": "pipeline_over_premade"}
    for name, key in ratio_rows.items():
        cells = re.search(rf"^\| {re.escape(name)} \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", summary, re.M).groups()
        for config, documented in zip(configs.values(), cells):
            value = ratios[f"{config}/{key}"] * (100 if documented.strip().strip("*").endswith("%") else 1)
            assert same(documented, value), (name, config, documented, value)
    xla = {c: steps[(c, "wrn3d_tl+xla", "fp32")]["train"]["median_s"] / steps[(c, "wrn3d_tl", "fp32")]["train"]["median_s"]
           for c in configs.values()}
    assert (f"{xla['wrn16-4-3d']:.1f}x (WRN-16-4 3D) to {xla['wrn10-2-3d']:.1f}x (WRN-10-2 3D) slower in this run "
            f"({xla['wrn40-4-2d']:.1f}x on WRN-40-4 2D)") in " ".join(summary.split())


def test_readme_bf16_inference_numbers_are_the_recorded_run():
    """The README's bf16 inference speed-ups and prediction changes are those of
    benchmarks/results/bf16_inference_intel-xeon-amx-2core.json."""
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    part = text[text.index("### Inference in bf16"):text.index("`examples/cifar_wide_resnet_keras.py`")]
    run = json.loads((ROOT / "benchmarks" / "results" / "bf16_inference_intel-xeon-amx-2core.json").read_text())
    speed = {s["config"].split()[0]: s for s in run["speed"]}
    pred = run["predictions"]
    big, tiny = speed["WRN-16-4"], speed["WRN-10-2"]
    assert f"**{big['speedup']:.1f}x** faster than fp32 on WRN-16-4 3D" in part
    assert f", {big['bf16_volumes_per_s']:.0f} against {big['fp32_volumes_per_s']:.0f} volumes/s)" in part
    assert f"**{tiny['speedup']:.1f}x** on WRN-10-2 3D" in part
    assert f"On {pred['test_volumes']} held-out synthetic volumes" in part
    assert f"({pred['top1_agreement']:.0%} agreement)" in part
    assert f"the largest logit difference is {pred['max_abs_logit_diff']:.3f} (logits up to " \
           f"{pred['max_abs_logit_fp32']:.1f}; mean difference {pred['mean_abs_logit_diff']:.3f})" in part
    assert f"probability difference {pred['max_abs_probability_diff']:.0e}".replace("e-05", "e-5") in part


def test_train_command_benchmark_numbers_are_the_recorded_run_s():
    """benchmarks/README.md's wrn3d-train against the Python path: the numbers of the run it names."""
    text = " ".join((ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8").split())
    name = re.search(r"`results/(2026-12-07-train-command[^`]+\.json)`", text).group(1)
    run = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    assert (f"{run['network']}, {run['epochs']:g} epochs ({run['steps']} steps): test accuracy "
            f"{run['command']['test_accuracy']:.3f} through `wrn3d-train` (the val-best checkpoint, step "
            f"{run['command']['selected_step']}) and {run['python']['test_accuracy']:.3f} through the Python path; "
            f"{run['command']['seconds']:.0f} s and {run['python']['seconds']:.0f} s") in text


def test_scan_reading_costs_are_the_recorded_run_s():
    """performance.md's reorientation, resampling and DICOM numbers: those of the JSON it names."""
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    name = re.search(r"`benchmarks/results/(scans_[^`]+\.json)`", text).group(1)
    run = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    thick, iso = run["per_scan"]["thick_0.9x0.9x3mm"]["seconds"], run["per_scan"]["iso_0.5mm"]["seconds"]
    read, decode = run["read_scan"]["seconds"], run["dicom_vs_nifti"]
    rows = [f"(`geometry.reorient`: two axes flipped, one copy) | {run['per_scan']['reorient_lps_to_ras_s']:.3f} |",
            f"`geometry.resample` (used) | {thick['geometry.resample']:.2f} |",
            f"`scipy.ndimage.zoom(order=1, grid_mode=True)` | {thick['scipy.ndimage.zoom']:.2f} |",
            f"`nibabel.processing.resample_to_output(order=1)` | {thick['nibabel.processing']:.2f} |",
            " | {:.3f} / {:.3f} / {:.3f} |".format(iso["geometry.resample"], iso["scipy.ndimage.zoom"],
                                                  iso["nibabel.processing"]),
            f"as stored / RAS and 1 mm | {read['as stored']:.2f} / {read['orientation RAS + spacing 1 mm']:.2f} |"]
    for kind, label in (("DICOM series (uncompressed)", "DICOM series, 64 uncompressed files"),
                        ("NIfTI .nii.gz", "NIfTI `.nii.gz`"), ("NIfTI .nii", "NIfTI `.nii`")):
        rows.append(f"| {label} | {decode['volumes_per_s'][kind]:.1f} | {decode['mb_per_s'][kind]:.0f} |")
    for row in rows:
        assert row in text, row
    ratio = decode["volumes_per_s"]["DICOM series (uncompressed)"]
    assert (f"decodes at {ratio / decode['volumes_per_s']['NIfTI .nii.gz']:.2f}x the rate of its `.nii.gz` and "
            f"{ratio / decode['volumes_per_s']['NIfTI .nii']:.2f}x that of a `.nii`") in " ".join(text.split())
    assert "AMD EPYC" in run["machine"]["cpu"] and "avx512_bf16" in run["cpu_flags"] and "avx512bf16" in name



def test_epyc_kernel_tables_are_the_recorded_runs():
    """performance.md's kernels-alone tables for the AVX512-BF16 EPYC: each op kind's time per
    step (shapes weighted by how often a step runs them), per column, in the records file
    named before each table."""
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    kinds = ("conv forward", "conv grad input", "conv grad filter", "batch norm fwd", "batch norm grad",
             "relu fwd + grad")
    names = re.findall(r"`benchmarks/results/(kernels_2026-12-07-epyc-avx512bf16[^`]*\.jsonl)`", text)
    assert len(names) == 2
    for name in names:
        records = [json.loads(line) for line in (ROOT / "benchmarks" / "results" / name).read_text().splitlines()]
        env = records[0]
        assert env["kind"] == "environment" and env["cpu"] == "AMD EPYC" and "avx512_bf16" in env["cpu_flags"]
        assert env["TF_ENABLE_ONEDNN_OPTS"] == "1"
        total = {}
        for r in records[1:]:
            key = (r["config"], r["precision"], r["framework"], r["kind"])
            total[key] = total.get(key, 0.0) + r["ms"] * r["count"]
        after = text[text.index(name):]
        header = re.search(r"^\| op, ms per step \|(.+)\|$", after, re.M).group(1)
        columns = [(PERF_CONFIGS[c.strip().rsplit(" ", 1)[0]], c.strip().rsplit(" ", 1)[1]) for c in header.split("|")]
        for kind in kinds + ("all",):
            cells = []
            for config, precision in columns:
                tf_ms, torch_ms = (sum(total[(config, precision, fw, k)] for k in (kinds if kind == "all" else (kind,)))
                                   for fw in ("tf", "torch"))
                cells.append(f"{tf_ms:.1f} / {torch_ms:.1f} ({tf_ms / torch_ms:.2f})")
            label = "**all**" if kind == "all" else kind
            row = f"| {label} | " + " | ".join(cells) + " |"
            assert row in after[:after.index("\n", after.index("| **all** |"))], (name, kind, cells)
    big = [json.loads(line) for line in open(ROOT / "benchmarks" / "results" / names[1])][1:]
    assert {(r["config"], r["precision"]) for r in big} >= {("wrn16-4-3d", "bf16"), ("wrn40-4-2d", "fp32")}
    # what the text after the second table says of it
    ratios = {}
    for r in big:
        key = (r["config"], r["precision"], r["kind"])
        ratios.setdefault(key, [0.0, 0.0])[r["framework"] == "torch"] += r["ms"] * r["count"]

    def tf_over_torch(config, precision, kinds=kinds):
        tf_ms, torch_ms = (sum(ratios[(config, precision, k)][i] for k in kinds) for i in (0, 1))
        return tf_ms / torch_ms

    said = " ".join(text[text.index(names[1]):].split())
    said = said[said.index("| **all** |"):]
    assert all(tf_over_torch("wrn40-4-2d", "fp32", (k,)) > 1 for k in kinds)
    assert (f"every TensorFlow kernel is slower than PyTorch's on the same shapes "
            f"({tf_over_torch('wrn40-4-2d', 'fp32'):.2f}x in all)") in said
    assert (f"the kernels alone take {tf_over_torch('wrn16-4-3d', 'bf16'):.2f}x PyTorch's time (the bf16 filter "
            f"gradient {tf_over_torch('wrn16-4-3d', 'bf16', ('conv grad filter',)):.2f}x)") in said


def test_epyc_three_runs_table_and_fp32_limit_are_the_records():
    """The EPYC part's table of the three runs' ratios, what its text says of them, and its
    fp32 limit, are those of the records files it names."""
    machines = _perf_machines()
    (part, latest), = [v for h, v in machines.items() if "AVX512_BF16" in h and "2026-11-25" not in h]
    earlier_path = re.search(r"`(benchmarks/results/2026-12-06[^`]+\.jsonl)`", part).group(1)
    again_path = re.search(r"`(benchmarks/results/2026-12-07[^`]+big-configs\.jsonl)`", part).group(1)
    earlier, again = ([json.loads(line) for line in open(ROOT / path)] for path in (earlier_path, again_path))
    runs = [next(r for r in recs if r["kind"] == "summary") for recs in (earlier, latest, again)]
    text = " ".join(part.split())

    def ratio(run, config, precision, phase):
        return run["ratios"].get(f"{config}/{precision}/{phase}/wrn3d_tl_vs_best")

    for label, config in PERF_CONFIGS.items():
        for precision in ("fp32", "bf16"):
            cells = [" / ".join(f"{ratio(run, config, precision, phase):.2f}" for phase in ("train", "infer"))
                     if ratio(run, config, precision, "train") else "—" for run in runs]
            assert (config == "wrn10-2-3d") == (cells[2] == "—")
            assert f"| {label} {precision} | {cells[0]} | {cells[1]} | {cells[2]} |" in text, (label, precision, cells)
    big = [ratio(runs[2], c, p, ph) for c in ("wrn16-4-3d", "wrn40-4-2d") for p in ("fp32", "bf16")
           for ph in ("train", "infer")]
    assert min(big) >= 0.995 and min(big) == ratio(runs[2], "wrn40-4-2d", "bf16", "train")
    assert (f"at 1.00 or above, to two decimals, in all 8 in the run after it ({min(big):.2f}-{max(big):.2f}; "
            f"the lowest, WRN-40-4 2D bf16 training, is {min(big):.4f})") in text
    tiny = [[ratio(run, "wrn10-2-3d", p, ph) for p in ("fp32", "bf16") for ph in ("train", "infer")] for run in runs[:2]]
    assert sum(r < 0.995 for r in tiny[1]) == 3 and all(r < 0.995 for r in tiny[0])
    assert "in three of its four cells in the 12-07 run" in text and "in all four in the 12-06 run" in text
    for cell, config, precision, phase in (("WRN-40-4 2D bf16 training", "wrn40-4-2d", "bf16", "train"),
                                           ("WRN-16-4 3D bf16 training", "wrn16-4-3d", "bf16", "train"),
                                           ("WRN-40-4 2D fp32 inference (", "wrn40-4-2d", "fp32", "infer")):
        assert cell + " " * (not cell.endswith("(")) + ", ".join(
            f"{ratio(run, config, precision, phase):.2f}" for run in runs) in text, cell
    steps = [f"{ratio(run, 'wrn16-4-3d', 'bf16', 'train'):.2f}" for run in runs]
    assert f"the step ratio was {steps[0]}, {steps[1]} and {steps[2]}." in text
    (profile,) = [r["profile"] for r in again if r.get("kind") == "step" and r.get("profile")
                  and (r["config"], r["impl"], r["precision"]) == ("wrn40-4-2d", "wrn3d_tl", "fp32")]
    conv = sum(ms for op, ms, _ in profile["ops"] if "Conv" in op) / profile["op_ms_total"]
    assert f"{conv:.0%} of the kernel time is in the convolutions" in text
    assert (f"({runs[0]['elapsed_s']:.0f} s, matmul peak fp32 {runs[0]['matmul_peak']['fp32']:.0f}, bf16 "
            f"{runs[0]['matmul_peak']['bf16']:.0f} GFLOP/s;") in text
    assert (f"`--configs wrn16-4-3d,wrn40-4-2d --no-xla --profile`: {runs[2]['elapsed_s']:.0f} s, matmul peak fp32 "
            f"{runs[2]['matmul_peak']['fp32']:.0f}, bf16 {runs[2]['matmul_peak']['bf16']:.0f} GFLOP/s;") in text
    env = next(r for r in again if r["kind"] == "environment")
    assert env["cpu"] == "AMD EPYC" and "avx512_bf16" in env["cpu_flags"] and env["argv"][:2] == [
        "--configs", "wrn16-4-3d,wrn40-4-2d"]
    limit = runs[1]["fp32_limit"]
    assert (f"{limit['cores']} cores x {limit['fma_units']} FMA units x {limit['lanes']} fp32 lanes x 2 flops x "
            f"{limit['ghz']:.2f} GHz = {limit['gflops']:.0f} GFLOP/s") in text
    need = runs[1]["matmul_peak"]["fp32"] / (limit["gflops"] / limit["ghz"])
    assert f"the cores ran at {need:.1f} GHz or more" in text
    steps = [r for r in latest if r["kind"] == "step"]
    assert steps and all(r["onednn"] is True for r in steps)     # "oneDNN on in every worker"


def test_probe_tolerance_in_performance_md_is_the_code_s():
    from wrn3d_tl.layers import BF16_PROBE_TOLERANCE

    text = " ".join((ROOT / "docs" / "performance.md").read_text(encoding="utf-8").split())
    assert f"is finite and within {BF16_PROBE_TOLERANCE:.0%} relative L2 error" in text


def test_batch_norm_inference_alternatives_are_the_recorded_run():
    """performance.md's table of inference with batch norm folded or as a multiply-add: the
    records file it names."""
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    name = re.search(r"`benchmarks/results/(bn_inference_[^`]+\.json)`", text).group(1)
    run = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    assert run["machine"]["cpu"] == "AMD EPYC" and "avx512_bf16" in run["machine"]["cpu_flags"]
    assert (run["rounds"], run["calls"]) == (7, 20) and "7 alternating rounds of 20 calls" in " ".join(text.split())
    labels = {("WRN-10-2", "fp32"): "WRN-10-2 3D fp32, batch 16", ("WRN-10-2", "bf16"): "WRN-10-2 3D bf16, batch 16",
              ("WRN-40-4", "fp32"): "WRN-40-4 2D fp32, batch 64"}
    for case in run["cases"]:
        ms = case["ms"]
        base = ms["as built"]
        row = (f"| {labels[(case['network'], case['precision'])]} | {base:.2f} | "
               + " | ".join(f"{ms[form]:.2f} ({ms[form] / base:.3f})" for form in ("bn2 folded", "multiply-add")) + " |")
        assert row in text, row
        assert case["max_abs_logit_diff"]["multiply-add"] < 0.05      # the same outputs, to round-off
    bf16 = next(c for c in run["cases"] if c["precision"] == "bf16")["ms"]
    assert f"its upper bound ({bf16['bn2 folded'] / bf16['as built']:.3f})" in " ".join(text.split())
