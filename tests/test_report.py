"""wrn3d_tl.report: evaluation pictures and metrics.json, Trainer.evaluate(report_dir=),
Grad-CAM galleries, the self-contained HTML run report, the main job's --report and wrn3d-train's, and the
page in a real headless browser."""

import base64
import contextlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CIFAR = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--volume-depth", "2", "--iters", "3",
              "--batch-size", "8", "--eval-samples", "16"]


def _strict_json(path):
    """json.load that refuses NaN/Infinity (not valid JSON)."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not valid JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def _png(path, min_height=150, min_width=150):
    from matplotlib.image import imread

    assert os.path.isfile(path), path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_height and image.shape[1] >= min_width, (path, image.shape)
    assert image[..., :3].std() > 0.02, f"{path} looks blank"
    return image


def _predictions(rng, n, k):
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y] * (rng.random(n) < 0.6)[:, None]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def tiny():
    """A WRN-10-1 3D trainer on 4x8x8x1 volumes with 3 classes, and 12 test volumes."""
    import tensorflow as tf

    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    tf.random.set_seed(0)
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(4, 8, 8, 1))
    trainer = Trainer(build_wrn(cfg), lr=0.05, batch_size=6, verbose=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 12)
    trainer.train_step(x[:6], y[:6])  # moving statistics away from their initial values
    return trainer, x, y


def test_importing_report_does_not_import_tensorflow():
    code = "import sys, wrn3d_tl.report; assert 'tensorflow' not in sys.modules, 'tensorflow imported'; " \
           "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_confusion_matrix_in_metrics_json_is_a_numpy_count(tmp_path, rng):
    from wrn3d_tl.evaluation import evaluation_report

    y, p = _predictions(rng, 60, 4)
    y[y == 3] = 2                                        # class 3 absent: its AUC and recall are NaN -> null
    names = ["liver", "kidney", "spleen", "lung"]
    paths = evaluation_report(y, p, tmp_path / "new" / "eval", class_names=names, title="test split")
    assert set(paths) == {"confusion", "roc", "metrics"}
    assert all(os.path.dirname(v) == str(tmp_path / "new" / "eval") for v in paths.values())
    m = _strict_json(paths["metrics"])
    counts = np.zeros((4, 4), np.int64)
    np.add.at(counts, (y, p.argmax(1)), 1)
    assert m["confusion_matrix"] == counts.tolist()
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert m["samples"] == 60 and m["class_names"] == names
    assert m["auc_per_class"][3] is None and m["per_class_accuracy"][3] is None
    recall = np.diag(counts)[:3] / counts.sum(1)[:3]
    assert m["per_class_accuracy"][:3] == pytest.approx(recall.tolist())
    confusion = _png(paths["confusion"], 300, 600)
    assert confusion.shape[1] > 1.5 * confusion.shape[0]  # two panels side by side
    _png(paths["roc"], 300, 300)


def _roc_lines(y, p, names=None):
    from wrn3d_tl import metrics
    from wrn3d_tl.evaluation import class_name_list, roc_figure

    k = p.shape[1]
    fig = roc_figure(y, p.astype(float), class_name_list(names, k), metrics.auc_per_class(y, p).tolist(), None)
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_label() != "chance"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    return curves, legend


def test_binary_roc_is_the_class1_curve_with_its_auc(tmp_path, rng):
    from sklearn.metrics import roc_auc_score, roc_curve

    from wrn3d_tl.evaluation import evaluation_report

    y, p = _predictions(rng, 40, 2)
    curves, legend = _roc_lines(y, p)
    fpr, tpr, _ = roc_curve(y == 1, p[:, 1])
    assert len(curves) == 1
    np.testing.assert_allclose(curves[0].get_xdata(), fpr)
    np.testing.assert_allclose(curves[0].get_ydata(), tpr)
    assert f"AUC {roc_auc_score(y, p[:, 1]):.3f}" in legend[1]
    m = _strict_json(evaluation_report(y, p, tmp_path)["metrics"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1])) and m["class_names"] is None
    _png(tmp_path / "roc.png")


def test_multiclass_roc_has_one_curve_per_present_class(rng):
    from sklearn.metrics import roc_auc_score

    y, p = _predictions(rng, 50, 5)
    y[y == 4] = 0                                          # class 4 absent: no curve
    curves, legend = _roc_lines(y, p, names=list("ABCDE"))
    assert len(curves) == 4
    for c in range(4):
        assert legend[1 + c] == f"{'ABCD'[c]} (AUC {roc_auc_score(y == c, p[:, c]):.3f})"


@pytest.mark.parametrize("kwargs, message", [
    (dict(y_true=np.zeros((4, 2), int)), "y_true"),
    (dict(probabilities=np.full((3, 3), 1 / 3)), "probabilities"),
    (dict(probabilities=np.full((4, 1), 1.0)), "probabilities"),
    (dict(y_true=np.array([0, 1, 2, 3])), "y_true"),
    (dict(y_true=np.array([0.5, 1, 2, 0])), "y_true"),
    (dict(probabilities=np.array([[np.nan, 0.5, 0.5]] * 4)), "probabilities"),
    (dict(class_names=["a", "b"]), "class_names"),
    (dict(out_dir="FILE"), "out_dir"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    from wrn3d_tl.evaluation import evaluation_report

    (tmp_path / "file").write_text("x")
    args = dict(y_true=np.array([0, 1, 2, 0]), probabilities=np.full((4, 3), 1 / 3), out_dir=tmp_path / "out")
    args.update(kwargs)
    if args["out_dir"] == "FILE":
        args["out_dir"] = tmp_path / "file"
    with pytest.raises(ValueError, match=message):
        evaluation_report(args.pop("y_true"), args.pop("probabilities"), args.pop("out_dir"), **args)


def test_evaluate_with_report_dir_writes_evaluates_numbers(tiny, tmp_path):
    trainer, x, y = tiny
    plain = trainer.evaluate((x, y), batch_size=5)
    result = trainer.evaluate((x, y), batch_size=5, report_dir=tmp_path / "eval")
    assert "report" not in plain and {k: v for k, v in result.items() if k != "report"} == plain
    assert set(result["report"]) == {"confusion", "roc", "metrics"}
    m = _strict_json(result["report"]["metrics"])
    assert m["confusion_matrix"] == result["confusion_matrix"] and m["samples"] == result["samples"] == 12
    assert m["accuracy"] == pytest.approx(result["accuracy"])
    assert m["auc"] == pytest.approx(result["auc"], nan_ok=True)
    probs = trainer.model(x, is_train=False).numpy()
    counts = np.zeros((3, 3), np.int64)
    np.add.at(counts, (y, probs.argmax(1)), 1)
    assert m["confusion_matrix"] == counts.tolist()
    for name in ("confusion", "roc"):
        _png(result["report"][name])


def test_cam_gallery_takes_the_first_correct_and_wrong_volumes(tiny, tmp_path):
    from wrn3d_tl.predict import predict
    from wrn3d_tl.report import cam_gallery

    trainer, x, _ = tiny
    pred = predict(trainer, x)["class"]
    y = np.where(np.arange(12) % 3 == 0, (pred + 1) % 3, pred)   # wrong at 0, 3, 6, 9
    weights = [w.numpy().copy() for w in trainer.model.all_weights]
    gallery = cam_gallery(trainer.model, x, y, tmp_path / "cams", correct=3, wrong=2, class_names=["a", "b", "c"])
    assert [os.path.basename(p)[:5] for p, _ in gallery] == ["00001", "00002", "00004", "00000", "00003"]
    assert [c.rsplit(", ", 1)[1] for _, c in gallery] == ["correct"] * 3 + ["wrong"] * 2
    assert gallery[3][1].startswith(f"volume 0: true {'abc'[y[0]]}, predicted {'abc'[pred[0]]} (p = ")
    for path, _ in gallery:
        _png(path, 100, 100)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(weights, trainer.model.all_weights))
    assert cam_gallery(trainer, x[:2], pred[:2], tmp_path / "none", correct=0, wrong=5) == []
    with pytest.raises(ValueError, match="y must be 12"):
        cam_gallery(trainer, x, y[:5], tmp_path / "bad")


def test_run_report_is_one_self_contained_page(tmp_path, rng):
    from wrn3d_tl.explain import save_montage
    from wrn3d_tl.logs import FIELDS
    from wrn3d_tl.model import WRNConfig, summary
    from wrn3d_tl.evaluation import evaluation_report
    from wrn3d_tl.report import write_run_report

    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(4, 8, 8, 1))
    csv_path = tmp_path / "logs" / "metrics.csv"
    csv_path.parent.mkdir()
    rows = [",".join(FIELDS)] + [f"{s},train,{2 / s:.3f},{0.2 * s:.3f},,0.1,50,0" for s in (1, 2, 3)] + \
        ["3,eval,0.9,0.5,1.0,,,0"]
    csv_path.write_text("\n".join(rows) + "\n")
    y, p = _predictions(rng, 30, 3)
    evaluation = evaluation_report(y, p, tmp_path / "eval")
    montages = []
    for i in range(2):
        path = str(tmp_path / f"m{i}.png")
        save_montage(rng.normal(size=(4, 8, 8, 1)), path, cam=rng.random((4, 8, 8)), title=f"m{i}")
        montages.append((path, f"volume {i}: <b>caption</b> {'correct' if i == 0 else 'wrong'}"))
    page_path = write_run_report(tmp_path / "report", config=cfg, metrics_csv=csv_path, evaluation=evaluation,
                                 montages=montages, extra={"data": "synthetic"})
    assert page_path == str(tmp_path / "report" / "index.html")
    page = Path(page_path).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "file:" not in page and "<link" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 1 + 2 + 2                   # curves, confusion + ROC, two montages
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert cfg.name in page and html.escape(summary(cfg)) in page and "synthetic" in page
    assert "&lt;b&gt;caption&lt;/b&gt;" in page          # captions are escaped
    # moved alone, the page still has everything
    moved = tmp_path / "elsewhere.html"
    shutil.move(page_path, moved)
    assert re.findall(r'src="([^"]*)"', moved.read_text()) == sources
    # without curves or evaluation the page says so
    bare = Path(write_run_report(tmp_path / "bare", config=cfg.to_dict())).read_text()
    assert "No curves" in bare and "No evaluation" in bare
    with pytest.raises(ValueError, match="montages"):
        write_run_report(tmp_path / "x", config=cfg, montages=[(tmp_path / "missing.png", "x")])


@pytest.fixture(scope="module")
def cifar_report(cifar_script, tmp_path_factory):
    """The main job, tiny, with --report DIR and no --logdir: (DIR, result, stdout)."""
    out = tmp_path_factory.mktemp("cifar") / "report"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = cifar_script.main([*TINY_CIFAR, "--report", str(out)])
    return out, result, buffer.getvalue()


def test_cifar_example_writes_a_report(cifar_report):
    out, result, text = cifar_report
    page = out / "index.html"
    assert f"report: {page}" in text.splitlines()
    assert text.rstrip().splitlines()[-1].startswith("summary: 3")
    assert (out / "logs" / "metrics.csv").exists() and (out / "curves.png").exists()  # DIR/logs without --logdir
    assert result["report"]["metrics"] == str(out / "eval" / "metrics.json")
    assert _strict_json(out / "eval" / "metrics.json")["confusion_matrix"] == result["confusion_matrix"]
    cams = sorted(os.listdir(out / "cams"))
    assert 1 <= len(cams) <= 6 and all(re.fullmatch(r"\d{5}_(correct|wrong)_true-\d_pred-\d\.png", c) for c in cams)
    body = page.read_text()
    assert "WRN-10-1" in body and body.count('src="data:image/png;base64,') == 3 + len(cams)


@pytest.mark.slow   # a real browser; fast tier: test_run_report_is_one_self_contained_page (the HTML structure)
def test_report_renders_in_a_headless_browser(request, tmp_path):
    from matplotlib.image import imread

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("SKIPPED: no chromium or chromium-browser on PATH (.ci/run installs it with apt-get)")
        pytest.skip("no headless browser installed (chromium or chromium-browser)")
    out, _, _ = request.getfixturevalue("cifar_report")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,900",
           "--hide-scrollbars", (out / "index.html").as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert shot.exists(), f"no screenshot (exit {run.returncode}): {run.stderr[-2000:]}"
    image = imread(shot)[..., :3]
    assert image.shape[:2] == (900, 1200)
    colours = np.unique((image * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"{len(colours)} distinct colours: blank page?"
    assert image.std() > 0.05


def test_wrn3d_train_writes_a_report(tmp_path, capsys):
    from wrn3d_tl.commands import train
    from wrn3d_tl.data import write_hdf5_volumes

    rng = np.random.default_rng(3)
    for name, n in (("train", 16), ("val", 8)):
        labels = np.arange(n) % 2
        volumes = rng.normal(size=(n, 4, 8, 8, 1)) + 2.0 * labels[:, None, None, None, None]
        write_hdf5_volumes(tmp_path / f"{name}.h5", volumes.astype("float32"), labels, num_classes=2)
    out = tmp_path / "report"
    assert train.main(["--data", str(tmp_path / "train.h5"), "--val", str(tmp_path / "val.h5"), "--depth", "10",
                       "--width", "1", "--batch-size", "8", "--iters", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in text.splitlines()
    assert (out / "val" / "roc.png").exists() and (out / "logs" / "metrics.csv").exists() and os.listdir(out / "cams")
    body = (out / "index.html").read_text()
    assert "train.h5" in body and body.count('src="data:image/png;base64,') == 3 + len(os.listdir(out / "cams"))
