"""Tests for the medical-imaging additions: Augment3D (alone and inside the tf.data
pipelines), MedMNIST-3D loading, the classification metrics and Trainer.evaluate's
AUC / confusion-matrix keys.

Everything is tiny and local; nothing is downloaded (urlopen is trapped in the MedMNIST
tests, and the one download test fetches a file:// URL).
"""

import itertools
import os
import pickle
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:
    import wrn3d_tl.data  # noqa: F401
except ImportError:  # running without an installed package / conftest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from wrn3d_tl.data import hdf5_dataset, make_dataset, write_hdf5_volumes  # noqa: E402
from wrn3d_tl.data import medmnist as medmnist_mod  # noqa: E402
from wrn3d_tl.data.augment import Augment3D  # noqa: E402
from wrn3d_tl.data.medmnist import MEDMNIST3D, load_medmnist3d  # noqa: E402
from wrn3d_tl.data.pipeline import _element_seed  # noqa: E402
from wrn3d_tl.metrics import auc_per_class, classification_metrics, confusion_matrix, roc_auc  # noqa: E402

REAL_URLOPEN = urllib.request.urlopen


# ==========================================================================
# Augment3D
# ==========================================================================
def np_augment(aug, volume, draws):
    """NumPy rebuild of ``aug.apply(volume, draws)`` from the documented recipe."""
    d = {k: np.asarray(v) for k, v in draws.items()}
    out = np.asarray(volume)
    for axis in range(3):
        if d["flips"][axis]:
            out = np.flip(out, axis)
    if aug.rotate_plane is not None:
        out = np.rot90(out, int(d["k"]), axes=aug.rotate_plane)
    pad = aug.crop_padding
    if any(pad):
        padded = np.pad(out, [(p, p) for p in pad] + [(0, 0)])
        o, (D, H, W) = d["offsets"], out.shape[:3]
        out = padded[o[0]:o[0] + D, o[1]:o[1] + H, o[2]:o[2] + W]
    if aug.scale or aug.shift:
        out = out.astype(np.float32) * np.float32(d["gain"]) + np.float32(d["bias"])
    return out


def seed_of(s):
    return tf.constant([s, 1000 + 7 * s], tf.int64)


ALL = Augment3D(flip_axes=("D", "H", "W"), rotate_plane=("H", "W"), crop_padding=(1, 2, 3), scale=0.2, shift=0.5)
AUGMENTS = {
    "flip_D": Augment3D(flip_axes=("D",)),
    "flip_HW": Augment3D(flip_axes=(1, 2)),
    "rotate_HW": Augment3D(rotate_plane=("H", "W")),
    "rotate_WH": Augment3D(rotate_plane=(2, 1)),        # the reverse direction
    "crop_int": Augment3D(crop_padding=2),
    "crop_per_axis": Augment3D(crop_padding=(0, 1, 3)),
    "jitter": Augment3D(scale=0.3, shift=0.4),
    "all": ALL,
}


@pytest.fixture(scope="module")
def volume():
    """A random DHWC volume, 2 channels, H == W so the H-W plane can rotate."""
    return np.random.default_rng(7).normal(size=(5, 6, 6, 2)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_augment_matches_numpy_reference(name, volume):
    aug = AUGMENTS[name]
    seen = set()
    for s in range(24):
        draws = aug.draws(seed_of(s))
        got = aug(volume, seed_of(s))
        assert got.shape == volume.shape and got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), np_augment(aug, volume, draws), rtol=1e-6, atol=1e-6)
        seen.add(got.numpy().tobytes())
    assert len(seen) > 1  # the transform is not the identity for every seed


def test_augment_cube_other_planes():
    v = np.random.default_rng(3).normal(size=(4, 4, 4, 2)).astype(np.float32)
    for plane in (("D", "H"), ("W", "D")):
        aug = Augment3D(flip_axes=("W",), rotate_plane=plane, crop_padding=1)
        ks = set()
        for s in range(16):
            draws = aug.draws(seed_of(s))
            ks.add(int(draws["k"]))
            np.testing.assert_array_equal(aug(v, seed_of(s)).numpy(), np_augment(aug, v, draws))
        assert ks == {0, 1, 2, 3}


def test_augment_same_transform_on_every_channel(volume):
    for s in range(6):
        both = ALL(volume, seed_of(s)).numpy()
        for c in range(2):
            alone = ALL(volume[..., c:c + 1], seed_of(s)).numpy()
            np.testing.assert_allclose(both[..., c:c + 1], alone, rtol=1e-6, atol=1e-6)
    # a channel that is a copy of the other stays a copy
    twin = np.concatenate([volume[..., :1]] * 2, -1)
    out = Augment3D(flip_axes=(0, 1, 2), rotate_plane=(1, 2), crop_padding=2)(twin, seed_of(3)).numpy()
    np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_augment_deterministic_and_seed_dependent(volume):
    again = Augment3D(flip_axes=("D", "H", "W"), rotate_plane=("H", "W"), crop_padding=(1, 2, 3),
                      scale=0.2, shift=0.5)
    outs = []
    for s in range(6):
        a = ALL(volume, seed_of(s)).numpy()
        np.testing.assert_array_equal(a, ALL(volume, seed_of(s)).numpy())
        np.testing.assert_array_equal(a, again(volume, seed_of(s)).numpy())
        outs.append(a.tobytes())
    assert len(set(outs)) == len(outs)
    # both words of the seed matter
    a, b = ALL(volume, [5, 1]).numpy(), ALL(volume, [5, 2]).numpy()
    assert not np.array_equal(a, b)


def test_augment_draws_cover_every_choice():
    flips, ks, offsets, gains, biases = set(), set(), [], [], []
    for s in range(64):
        d = {k: np.asarray(v) for k, v in ALL.draws(seed_of(s)).items()}
        assert d["flips"].dtype == np.int32 and d["flips"].shape == (3,)
        assert d["offsets"].dtype == np.int32 and d["offsets"].shape == (3,)
        flips.add(tuple(int(f) for f in d["flips"]))
        ks.add(int(d["k"]))
        offsets.append(d["offsets"])
        gains.append(float(d["gain"]))
        biases.append(float(d["bias"]))
    assert flips == set(itertools.product((0, 1), repeat=3))
    assert ks == {0, 1, 2, 3}
    offsets = np.array(offsets)
    for axis, p in enumerate((1, 2, 3)):
        assert set(offsets[:, axis].tolist()) == set(range(2 * p + 1))
    assert 0.8 <= min(gains) < 0.9 and 1.1 < max(gains) <= 1.2
    assert -0.5 <= min(biases) < -0.3 and 0.3 < max(biases) <= 0.5


def test_augment_draws_respect_disabled_options():
    aug = Augment3D(flip_axes=("H",), crop_padding=(0, 2, 0))
    for s in range(32):
        d = {k: np.asarray(v) for k, v in aug.draws(seed_of(s)).items()}
        assert d["flips"][0] == 0 and d["flips"][2] == 0
        assert int(d["k"]) == 0
        assert d["offsets"][0] == 0 and d["offsets"][2] == 0 and 0 <= d["offsets"][1] <= 4
        assert float(d["gain"]) == 1.0 and float(d["bias"]) == 0.0


def test_augment_dtype():
    v = np.random.default_rng(0).integers(1, 256, size=(4, 5, 5, 2)).astype(np.uint8)
    geometric = Augment3D(flip_axes=(0, 1, 2), rotate_plane=(1, 2), crop_padding=1)
    for s in range(8):
        out = geometric(v, seed_of(s))
        assert out.dtype == tf.uint8
        np.testing.assert_array_equal(out.numpy(), np_augment(geometric, v, geometric.draws(seed_of(s))))
    assert geometric(v.astype(np.float64), seed_of(0)).dtype == tf.float64
    jitter = Augment3D(flip_axes=(0,), scale=0.1)
    out = jitter(v, seed_of(1))
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), np_augment(jitter, v, jitter.draws(seed_of(1))), rtol=1e-6)
    assert Augment3D(shift=0.1)(v, seed_of(1)).dtype == tf.float32


def test_augment_axis_names():
    assert Augment3D(flip_axes=("D", "H", "W")).flip_axes == (0, 1, 2)
    assert Augment3D(flip_axes=("w", "d", "W")).flip_axes == (0, 2)
    assert Augment3D(rotate_plane=("W", "H")).rotate_plane == (2, 1)
    assert Augment3D(rotate_plane=("D", 2)).rotate_plane == (0, 2)
    assert Augment3D(crop_padding=3).crop_padding == (3, 3, 3)
    assert Augment3D(flip_axes=("D", "H")) == Augment3D(flip_axes=(1, 0))


@pytest.mark.parametrize("kwargs, match", [
    ({"flip_axes": (3,)}, "flip_axes"),
    ({"flip_axes": ("X",)}, "flip_axes"),
    ({"flip_axes": (-1,)}, "flip_axes"),
    ({"flip_axes": (True,)}, "flip_axes"),
    ({"rotate_plane": ("H", "H")}, "two different"),
    ({"rotate_plane": (1, "H")}, "two different"),
    ({"rotate_plane": (0, 1, 2)}, "two different"),
    ({"rotate_plane": (0, 5)}, "rotate_plane"),
    ({"crop_padding": -1}, "crop_padding"),
    ({"crop_padding": (1, 2)}, "crop_padding"),
    ({"crop_padding": (1, -2, 0)}, "crop_padding"),
    ({"crop_padding": 1.5}, "crop_padding"),
    ({"scale": 1.0}, "scale"),
    ({"scale": 1.5}, "scale"),
    ({"scale": -0.1}, "scale"),
    ({"shift": -0.1}, "shift"),
    ({"shift": float("inf")}, "shift"),
    ({"scale": True}, "scale"),
])
def test_augment_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Augment3D(**kwargs)


def test_augment_rejects_non_square_plane_bad_volume_and_bad_seed(volume):
    with pytest.raises(ValueError, match=r"sizes 5 and 6"):
        Augment3D(rotate_plane=("D", "H"))(volume, seed_of(0))
    with pytest.raises(ValueError, match=r"sizes 6 and 5"):
        Augment3D(rotate_plane=("W", "D"))(volume, seed_of(0))
    with pytest.raises(ValueError, match="rank 4"):
        Augment3D(flip_axes=(0,))(volume[..., 0], seed_of(0))
    with pytest.raises(ValueError, match="shape"):
        ALL.draws([1, 2, 3])
    with pytest.raises(ValueError, match="int"):
        ALL.draws([1.0, 2.0])


# --------------------------------------------------------------------------
# Augment3D inside tf.data
# --------------------------------------------------------------------------
PIPE_AUG = Augment3D(flip_axes=("D", "W"), rotate_plane=("H", "W"), crop_padding=1, scale=0.1, shift=0.2)


@pytest.fixture(scope="module")
def pipe_data():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, size=(10, 4, 6, 6, 2)).astype(np.uint8)
    y = np.arange(10, dtype=np.int64)          # label = index, so every sample can be traced
    return x, y


def expected_sample(x, seed, epoch, index):
    return PIPE_AUG(x[index], _element_seed(seed, epoch, index)).numpy()


def collect(ds):
    xs, ys = zip(*[(bx.numpy(), by.numpy()) for bx, by in ds])
    return xs, ys


def check_against_per_sample_seed(xs, ys, x, seed, epoch):
    for bx, by in zip(xs, ys):
        assert bx.dtype == np.float32 and bx.shape[1:] == x.shape[1:]
        for v, label in zip(bx, by):
            np.testing.assert_allclose(v, expected_sample(x, seed, epoch, int(label)), rtol=1e-6, atol=1e-5)


def test_element_seeds_differ():
    seeds = {tuple(_element_seed(s, e, i).numpy()) for s in (0, 1) for e in (0, 1) for i in range(4)}
    assert len(seeds) == 16


def test_make_dataset_applies_augment3d_per_sample(pipe_data):
    x, y = pipe_data
    ds = make_dataset(x, y, batch_size=4, volume_depth=None, augment=PIPE_AUG, shuffle=False, seed=3)
    xs, ys = collect(ds)
    assert [b.shape for b in xs] == [(4, 4, 6, 6, 2), (4, 4, 6, 6, 2), (2, 4, 6, 6, 2)]
    np.testing.assert_array_equal(np.concatenate(ys), y)
    check_against_per_sample_seed(xs, ys, x, 3, 0)
    # the second pass over the same dataset object is epoch 1: new draws
    xs1, ys1 = collect(ds)
    check_against_per_sample_seed(xs1, ys1, x, 3, 1)
    assert not np.array_equal(xs[0], xs1[0])


def test_make_dataset_augment3d_shuffled_deterministic(pipe_data):
    x, y = pipe_data
    runs = {}
    for seed in (3, 3, 4):
        ds = make_dataset(x, y, batch_size=4, volume_depth=None, augment=PIPE_AUG, seed=seed)  # shuffles
        xs, ys = collect(ds)
        assert sorted(np.concatenate(ys).tolist()) == y.tolist()
        check_against_per_sample_seed(xs, ys, x, seed, 0)  # labels still travel with their volume
        runs.setdefault(seed, []).append(np.concatenate(xs))
    np.testing.assert_array_equal(runs[3][0], runs[3][1])
    assert runs[3][0].shape == runs[4][0].shape and not np.array_equal(runs[3][0], runs[4][0])


def test_hdf5_dataset_applies_augment3d(pipe_data, tmp_path):
    x, y = pipe_data
    path = tmp_path / "vols.h5"
    write_hdf5_volumes(path, x, y)
    ds = hdf5_dataset(path, batch_size=4, augment=PIPE_AUG, normalization=None, seed=5)
    xs, ys = collect(ds)
    assert [b.shape for b in xs] == [(4, 4, 6, 6, 2), (4, 4, 6, 6, 2), (2, 4, 6, 6, 2)]
    np.testing.assert_array_equal(np.concatenate(ys), y)  # no shuffling by default
    check_against_per_sample_seed(xs, ys, x, 5, 0)

    shuffled = {}
    for seed in (5, 5, 6):
        ds = hdf5_dataset(path, batch_size=4, augment=PIPE_AUG, normalization=None, seed=seed, shuffle=True,
                          block_size=3)
        xs, ys = collect(ds)
        assert sorted(np.concatenate(ys).tolist()) == y.tolist()
        check_against_per_sample_seed(xs, ys, x, seed, 0)
        shuffled.setdefault(seed, []).append(np.concatenate(xs))
    np.testing.assert_array_equal(shuffled[5][0], shuffled[5][1])
    assert not np.array_equal(shuffled[5][0], shuffled[6][0])


def test_pipelines_reject_non_callable_augment(pipe_data, tmp_path):
    x, y = pipe_data
    for bad in ("yes", 1, 0.5):
        with pytest.raises(ValueError, match="augment"):
            make_dataset(x, y, batch_size=4, volume_depth=None, augment=bad)
    path = tmp_path / "vols.h5"
    write_hdf5_volumes(path, x, y)
    with pytest.raises(ValueError, match="augment"):
        hdf5_dataset(path, batch_size=4, augment="yes")


# ==========================================================================
# metrics
# ==========================================================================
def binary_scores(p1):
    p1 = np.asarray(p1, np.float64)
    return np.stack([1 - p1, p1], 1)


def test_roc_auc_binary_by_hand():
    y = np.array([0, 0, 1, 1])
    s = binary_scores([0.1, 0.4, 0.35, 0.8])
    # positive/negative pairs ranked correctly: (0.35>0.1), (0.8>0.1), (0.8>0.4) of 4 -> 0.75
    assert roc_auc(y, s) == pytest.approx(0.75, abs=1e-12)
    np.testing.assert_allclose(auc_per_class(y, s), [0.75, 0.75])
    # ties count one half: pairs (0.5 vs 0.5) = 1/2, the other three ranked right -> 3.5 / 4
    assert roc_auc([0, 1, 0, 1], binary_scores([0.5, 0.5, 0.2, 0.9])) == pytest.approx(0.875, abs=1e-12)
    # all scores equal: 0.5
    assert roc_auc([0, 1, 1, 0], binary_scores([0.3] * 4)) == pytest.approx(0.5, abs=1e-12)
    # perfectly inverted ranking: 0
    assert roc_auc([1, 1, 0], binary_scores([0.1, 0.2, 0.9])) == pytest.approx(0.0, abs=1e-12)


def test_roc_auc_three_classes_by_hand():
    y = np.array([0, 1, 2, 0, 1, 2])
    s = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4],
                  [0.3, 0.4, 0.3], [0.5, 0.2, 0.3], [0.1, 0.2, 0.7]])
    # class 0: positives 0.6, 0.3 vs negatives 0.2, 0.3, 0.5, 0.1 -> (4 + 2.5) / 8
    # class 1: positives 0.5, 0.2 vs negatives 0.3, 0.3, 0.4, 0.2 -> (4 + 0.5) / 8
    # class 2: positives 0.4, 0.7 vs negatives 0.1, 0.3, 0.3, 0.3 -> 8 / 8
    want = [6.5 / 8, 4.5 / 8, 1.0]
    np.testing.assert_allclose(auc_per_class(y, s), want, atol=1e-12)
    assert roc_auc(y, s) == pytest.approx(sum(want) / 3, abs=1e-12)
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s, multi_class="ovr", average="macro"), abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_roc_auc_matches_sklearn_on_random_data(k):
    rng = np.random.default_rng(100 + k)
    for trial in range(5):
        n = 40 + 7 * trial
        y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
        probs = rng.dirichlet(np.ones(k), size=n)
        if trial == 4:
            probs = np.round(probs, 1)
            probs /= probs.sum(1, keepdims=True)      # many ties
        got = roc_auc(y, probs)
        assert isinstance(got, float)
        if k == 2:
            want = skm.roc_auc_score(y, probs[:, 1])
        else:
            want = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
        assert got == pytest.approx(want, abs=1e-6)
        per_class = auc_per_class(y, probs)
        assert per_class.shape == (k,) and per_class.dtype == np.float64
        np.testing.assert_allclose(per_class, [skm.roc_auc_score(y == c, probs[:, c]) for c in range(k)],
                                   atol=1e-6)
    # (N, 1) labels are accepted
    assert roc_auc(y[:, None], probs) == pytest.approx(got, abs=1e-12)


@pytest.mark.filterwarnings("error")   # undefined AUCs are handled here, not left to sklearn's warning
def test_absent_class_is_nan_and_left_out():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 30)
    y[:3] = [0, 1, 2]
    probs = rng.dirichlet(np.ones(4), size=30)            # 4 classes, class 3 never occurs
    per_class = auc_per_class(y, probs)
    assert np.isnan(per_class[3]) and np.isfinite(per_class[:3]).all()
    want = [skm.roc_auc_score(y == c, probs[:, c]) for c in range(3)]
    np.testing.assert_allclose(per_class[:3], want, atol=1e-12)
    assert roc_auc(y, probs) == pytest.approx(np.mean(want), abs=1e-12)
    # a class that is every label has no AUC either; the others are absent -> NaN overall
    only = np.zeros(6, np.int64)
    assert np.isnan(auc_per_class(only, rng.dirichlet(np.ones(3), size=6))).all()
    assert np.isnan(roc_auc(only, rng.dirichlet(np.ones(3), size=6)))
    assert np.isnan(roc_auc(np.ones(5, np.int64), binary_scores(rng.random(5))))
    report = classification_metrics(y, probs)
    assert np.isnan(report["auc_per_class"][3]) and np.isnan(report["per_class_accuracy"][3])
    assert report["auc"] == pytest.approx(np.mean(want), abs=1e-12)


def test_confusion_matrix_rows_true_cols_pred():
    y_true = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 2, 0, 2]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2]))
    np.testing.assert_array_equal(confusion_matrix([1], [0], 4), [[0] * 4, [1, 0, 0, 0], [0] * 4, [0] * 4])


def test_classification_metrics_report():
    y = np.array([0, 0, 1, 2, 2, 2])
    s = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                  [0.1, 0.2, 0.7], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]])   # argmax: 0 1 1 2 0 2
    r = classification_metrics(y, s)
    assert set(r) == {"accuracy", "auc", "auc_per_class", "confusion_matrix", "per_class_accuracy"}
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert all(type(v) is int for row in r["confusion_matrix"] for v in row)
    assert r["accuracy"] == pytest.approx(4 / 6)
    np.testing.assert_allclose(r["per_class_accuracy"], [1 / 2, 1.0, 2 / 3])
    assert all(type(v) is float for v in r["per_class_accuracy"] + r["auc_per_class"])
    assert r["auc"] == pytest.approx(skm.roc_auc_score(y, s, multi_class="ovr"), abs=1e-12)
    np.testing.assert_allclose(r["auc_per_class"], auc_per_class(y, s))


@pytest.mark.parametrize("y, scores", [
    ([0, 1, 1], np.ones((2, 2)) / 2),            # length mismatch
    ([0, 1], np.array([0.2, 0.8])),              # 1-D scores
    ([0, 0], np.ones((2, 1))),                   # one column
    ([0, 1], np.ones((2, 2, 1))),                # 3-D scores
    ([0.0, 1.0], np.ones((2, 2)) / 2),           # float labels
    ([0, 2], np.ones((2, 2)) / 2),               # label >= K
    ([0, -1], np.ones((2, 2)) / 2),              # negative label
])
def test_metrics_reject_bad_inputs(y, scores):
    for fn in (roc_auc, auc_per_class, classification_metrics):
        with pytest.raises(ValueError):
            fn(y, scores)


@pytest.mark.parametrize("y_true, y_pred, k", [
    ([0, 1, 2], [1], 3),           # lengths differ (would broadcast)
    ([0, -1], [0, 0], 2),          # negative label (would wrap around)
    ([0, 1], [0, 2], 2),           # prediction >= K
    ([0.7, 1.2], [0, 1], 2),       # float labels (would truncate)
    ([[0, 1]], [[0, 1]], 2),       # not 1-D
    ([0, 1], [0, 1], 0),           # no classes
])
def test_confusion_matrix_rejects_bad_inputs(y_true, y_pred, k):
    with pytest.raises(ValueError):
        confusion_matrix(y_true, y_pred, k)


# ==========================================================================
# Trainer.evaluate's AUC / confusion matrix
# ==========================================================================
def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def tiny_trainer(num_classes):
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=num_classes, input_shape=(4, 6, 6, 1)))
    return Trainer(model, lr=0.01, verbose=False)


def eval_inputs(num_classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 4, 6, 6, 1)).astype(np.float32)
    y = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, 30 - num_classes)])
    return x, y.astype(np.int64)


def centre_logits(trainer, x):
    """Shift the output bias so argmax varies across samples (a fresh net favours one class)."""
    from wrn3d_tl.layers import variable_name

    bias = next(v for v in trainer.model.all_weights if variable_name(v) == "head/logits/biases")
    logits = trainer.model(x, is_train=False).numpy()
    bias.assign(bias.numpy() - logits.mean(0))


def test_evaluate_multiclass_auc_and_confusion_matrix():
    trainer = tiny_trainer(3)
    x, y = eval_inputs(3, 21)
    centre_logits(trainer, x)
    logits = trainer.model(x, is_train=False).numpy().astype(np.float64)
    probs = softmax(logits)
    pred = probs.argmax(1)
    assert len(set(pred.tolist())) > 1  # a non-degenerate confusion matrix

    r = trainer.evaluate((x, y), batch_size=8, log=False)            # 8 + 8 + 8 + 6
    assert r["samples"] == 30
    assert isinstance(r["auc"], float)
    assert r["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-6)
    np.testing.assert_allclose(r["auc_per_class"], [skm.roc_auc_score(y == c, probs[:, c]) for c in range(3)],
                               atol=1e-6)
    cm = np.array(r["confusion_matrix"])
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=[0, 1, 2]))
    assert cm.sum() == 30
    assert r["accuracy"] == pytest.approx(np.trace(cm) / 30, abs=1e-12)
    assert r["accuracy"] == pytest.approx(np.mean(pred == y), abs=1e-12)
    np.testing.assert_allclose(r["per_class_accuracy"], np.diag(cm) / cm.sum(1), atol=1e-12)

    # the same numbers from a tf.data pipeline of the same batches
    ds = make_dataset(x, y, batch_size=8, volume_depth=None, training=False)
    r2 = trainer.evaluate(ds, log=False)
    assert r2["confusion_matrix"] == r["confusion_matrix"]
    assert r2["auc"] == pytest.approx(r["auc"], abs=1e-6)


def test_evaluate_binary_auc_is_class_one_auc():
    trainer = tiny_trainer(2)
    x, y = eval_inputs(2, 22)
    centre_logits(trainer, x)
    probs = softmax(trainer.model(x, is_train=False).numpy().astype(np.float64))
    r = trainer.evaluate((x, y), batch_size=8, log=False)
    assert r["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]), abs=1e-6)
    assert r["auc"] == pytest.approx(r["auc_per_class"][1], abs=1e-12)
    np.testing.assert_array_equal(r["confusion_matrix"], skm.confusion_matrix(y, probs.argmax(1), labels=[0, 1]))
    assert r["accuracy"] == pytest.approx(np.trace(np.array(r["confusion_matrix"])) / 30, abs=1e-12)


# ==========================================================================
# MedMNIST-3D
# ==========================================================================
SPLITS = ("train", "val", "test")


class Trap:
    """Unpickling this creates the file ``marker``: proof that a loader ran pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def medmnist_arrays(flag, size=28, n=(3, 2, 2), seed=0):
    rng = np.random.default_rng(seed)
    k = MEDMNIST3D[flag]["num_classes"]
    arrays = {}
    for split, m in zip(SPLITS, n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (m, size, size, size)).astype(np.uint8)
        labels = rng.integers(0, k, (m, 1))
        labels[: min(m, k)] = np.arange(min(m, k))[:, None]
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    return arrays


def write_medmnist(folder, flag, size=28, arrays=None, **kw):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = medmnist_arrays(flag, size, **kw) if arrays is None else arrays
    path = folder / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    np.savez(path, **arrays)
    return path, arrays


@pytest.fixture
def med_env(tmp_path, monkeypatch):
    """An empty HOME, no $WRN3D_DATA_DIR and an urlopen that fails the test if called."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("WRN3D_DATA_DIR", raising=False)

    def no_network(*args, **kwargs):
        pytest.fail(f"urlopen called: {args}")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return home / ".medmnist"


def check_loaded(data, arrays, size):
    assert set(data) == set(SPLITS)
    for split in SPLITS:
        x, y = data[split]
        n = len(arrays[f"{split}_images"])
        assert x.shape == (n, size, size, size, 1) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        np.testing.assert_array_equal(x[..., 0], arrays[f"{split}_images"])
        np.testing.assert_array_equal(y, arrays[f"{split}_labels"].reshape(-1))


@pytest.mark.parametrize("flag, size", [("nodulemnist3d", 28), ("organmnist3d", 28), ("nodulemnist3d", 64),
                                        ("organmnist3d", 64)])
def test_medmnist_loads_official_layout(med_env, tmp_path, flag, size):
    path, arrays = write_medmnist(tmp_path / "data", flag, size)
    assert path.name == (f"{flag}.npz" if size == 28 else f"{flag}_64.npz")
    data = load_medmnist3d(flag, data_dir=tmp_path / "data", size=size, check_sizes=False)
    check_loaded(data, arrays, size)
    assert data["train"][1].max() < MEDMNIST3D[flag]["num_classes"]


def test_medmnist_accepts_channel_axis_and_flat_labels(med_env, tmp_path):
    arrays = medmnist_arrays("organmnist3d")
    alt = dict(arrays, train_images=arrays["train_images"][..., None], val_labels=arrays["val_labels"][:, 0])
    write_medmnist(tmp_path, "organmnist3d", arrays=alt)
    check_loaded(load_medmnist3d("organmnist3d", data_dir=str(tmp_path), check_sizes=False), arrays, 28)


def test_medmnist_official_split_sizes(med_env, tmp_path):
    spec = MEDMNIST3D["fracturemnist3d"]["n_samples"]
    assert spec == {"train": 1027, "val": 103, "test": 240}
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = np.zeros((spec[split], 28, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = np.zeros((spec[split], 1), np.uint8)
    write_medmnist(tmp_path, "fracturemnist3d", arrays=arrays)
    data = load_medmnist3d("fracturemnist3d", data_dir=tmp_path)  # check_sizes=True by default
    for split in SPLITS:
        assert data[split][0].shape == (spec[split], 28, 28, 28, 1) and data[split][0].dtype == np.uint8
        assert data[split][1].shape == (spec[split],) and data[split][1].dtype == np.int64


def test_medmnist_refuses_wrong_split_sizes(med_env, tmp_path):
    path, _ = write_medmnist(tmp_path, "organmnist3d")
    with pytest.raises(ValueError) as e:
        load_medmnist3d("organmnist3d", data_dir=tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "train" in msg and "972" in msg and "check_sizes=False" in msg


def _refusal_cases():
    def drop(key):
        def make(arrays):
            del arrays[key]
            return arrays
        return make

    def setting(key, fn):
        def make(arrays):
            arrays[key] = fn(arrays[key])
            return arrays
        return make

    return {
        "missing_key": (drop("val_labels"), ["val_labels"]),
        "float_images": (setting("train_images", lambda a: a.astype(np.float32)), ["train_images", "float32",
                                                                                   "uint8"]),
        "int16_images": (setting("test_images", lambda a: a.astype(np.int16)), ["test_images", "int16"]),
        "wrong_image_shape": (setting("val_images", lambda a: a[:, :, :, :27]), ["val_images", "(2, 28, 28, 27)"]),
        "three_d_images": (setting("val_images", lambda a: a[:, 0]), ["val_images", "(2, 28, 28)"]),
        "label_count": (setting("train_labels", lambda a: a[:2]), ["train_labels", "(2, 1)", "(3, 1)"]),
        "float_labels": (setting("train_labels", lambda a: a.astype(np.float64)), ["train_labels", "float64"]),
        "label_out_of_range": (setting("test_labels", lambda a: np.full_like(a, 11)), ["test_labels", "11",
                                                                                      "11 classes"]),
        "negative_label": (setting("test_labels", lambda a: np.full(a.shape, -1, np.int64)), ["test_labels", "-1"]),
    }


@pytest.mark.parametrize("case", sorted(_refusal_cases()))
def test_medmnist_refuses_bad_files(med_env, tmp_path, case):
    make, needles = _refusal_cases()[case]
    path, _ = write_medmnist(tmp_path, "organmnist3d", arrays=make(medmnist_arrays("organmnist3d")))
    with pytest.raises(ValueError) as e:
        load_medmnist3d("organmnist3d", data_dir=tmp_path, check_sizes=False)
    msg = str(e.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg


def test_medmnist_binary_label_range(med_env, tmp_path):
    arrays = medmnist_arrays("nodulemnist3d")
    arrays["val_labels"][0] = 2
    path, _ = write_medmnist(tmp_path, "nodulemnist3d", arrays=arrays)
    with pytest.raises(ValueError, match="2 classes") as e:
        load_medmnist3d("nodulemnist3d", data_dir=tmp_path, check_sizes=False)
    assert str(path) in str(e.value) and "val_labels" in str(e.value)


def test_medmnist_refuses_28_file_under_64_name(med_env, tmp_path):
    arrays = medmnist_arrays("nodulemnist3d", size=28)
    path = tmp_path / "nodulemnist3d_64.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as e:
        load_medmnist3d("nodulemnist3d", data_dir=tmp_path, size=64, check_sizes=False)
    msg = str(e.value)
    assert str(path) in msg and "(3, 28, 28, 28)" in msg and "(N, 64, 64, 64)" in msg


def test_medmnist_never_unpickles(med_env, tmp_path):
    # the trap works: unpickling it creates its marker
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Trap(control))).close()
    assert control.exists()

    marker = tmp_path / "unpickled"
    arrays = medmnist_arrays("organmnist3d")
    arrays["train_images"] = np.array([Trap(marker)] * 3, dtype=object)
    path, _ = write_medmnist(tmp_path / "obj", "organmnist3d", arrays=arrays)
    with pytest.raises(ValueError) as e:
        load_medmnist3d("organmnist3d", data_dir=tmp_path / "obj", check_sizes=False)
    assert str(path) in str(e.value) and "train" in str(e.value)
    assert not marker.exists()

    # a bare pickle under the .npz name
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "organmnist3d.npz").write_bytes(pickle.dumps({"train_images": Trap(marker)}))
    with pytest.raises(ValueError, match="organmnist3d.npz"):
        load_medmnist3d("organmnist3d", data_dir=folder, check_sizes=False)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["text", "truncated", "empty"])
def test_medmnist_refuses_non_zip(med_env, tmp_path, content):
    good, _ = write_medmnist(tmp_path / "good", "organmnist3d")
    data = {"text": b"this is not a zip archive\n", "truncated": good.read_bytes()[:2000], "empty": b""}[content]
    path = tmp_path / "organmnist3d.npz"
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
        load_medmnist3d("organmnist3d", data_dir=tmp_path, check_sizes=False)
    assert str(path) in str(e.value)


def test_medmnist_search_order(med_env, tmp_path, monkeypatch):
    flag = "nodulemnist3d"
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    _, a_explicit = write_medmnist(explicit, flag, seed=1)
    _, a_env = write_medmnist(env, flag, seed=2)
    _, a_home = write_medmnist(med_env, flag, seed=3)
    monkeypatch.setenv("WRN3D_DATA_DIR", str(env))
    check_loaded(load_medmnist3d(flag, data_dir=explicit, check_sizes=False), a_explicit, 28)
    check_loaded(load_medmnist3d(flag, check_sizes=False), a_env, 28)
    # a data_dir without the file falls through to the environment variable
    check_loaded(load_medmnist3d(flag, data_dir=tmp_path / "nowhere", check_sizes=False), a_env, 28)
    monkeypatch.delenv("WRN3D_DATA_DIR")
    check_loaded(load_medmnist3d(flag, check_sizes=False), a_home, 28)
    # the 64 file is another name: not found even though the 28 ones exist
    with pytest.raises(FileNotFoundError):
        load_medmnist3d(flag, size=64, data_dir=explicit, check_sizes=False)


def test_medmnist_not_found_lists_paths_and_url(med_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WRN3D_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as e:
        load_medmnist3d("organmnist3d", data_dir=tmp_path / "mine", size=64)
    msg = str(e.value)
    tried = [str(tmp_path / "mine" / "organmnist3d_64.npz"), str(tmp_path / "env" / "organmnist3d_64.npz"),
             str(med_env / "organmnist3d_64.npz")]
    positions = [msg.find(p) for p in tried]
    assert -1 not in positions and positions == sorted(positions)
    assert medmnist_mod.MEDMNIST_URL.format(name="organmnist3d_64.npz") in msg
    assert not (tmp_path / "mine").exists() and not med_env.exists()   # nothing created or fetched


def test_medmnist_download(med_env, tmp_path, monkeypatch):
    flag = "organmnist3d"
    mirror, arrays = write_medmnist(tmp_path / "mirror", flag)
    template = (tmp_path / "mirror").as_uri() + "/{name}"
    monkeypatch.setattr(medmnist_mod, "MEDMNIST_URL", template)
    calls = []

    def recording(url, *args, **kwargs):
        calls.append(url)
        return REAL_URLOPEN(url, *args, **kwargs)
    monkeypatch.setattr(urllib.request, "urlopen", recording)

    # into data_dir, the first candidate
    target = tmp_path / "dl"
    check_loaded(load_medmnist3d(flag, data_dir=target, download=True, check_sizes=False), arrays, 28)
    assert calls == [template.format(name=f"{flag}.npz")]
    assert (target / f"{flag}.npz").read_bytes() == mirror.read_bytes()
    assert sorted(p.name for p in target.iterdir()) == [f"{flag}.npz"]
    # present now: not fetched again
    load_medmnist3d(flag, data_dir=target, download=True, check_sizes=False)
    assert len(calls) == 1

    # without data_dir or $WRN3D_DATA_DIR: into ~/.medmnist
    check_loaded(load_medmnist3d(flag, download=True, check_sizes=False), arrays, 28)
    assert len(calls) == 2 and (med_env / f"{flag}.npz").read_bytes() == mirror.read_bytes()

    # a failed fetch leaves nothing behind
    monkeypatch.setattr(medmnist_mod, "MEDMNIST_URL", (tmp_path / "empty_mirror").as_uri() + "/{name}")
    with pytest.raises(OSError):
        load_medmnist3d("nodulemnist3d", data_dir=tmp_path / "dl2", download=True, check_sizes=False)
    assert list((tmp_path / "dl2").iterdir()) == []


def test_medmnist_rejects_unknown_flag_and_size(med_env, tmp_path):
    for flag in ("pathmnist", "OrganMNIST3D", ""):
        with pytest.raises(ValueError, match="flag"):
            load_medmnist3d(flag, data_dir=tmp_path)
    for size in (32, 128, "28", True):
        with pytest.raises(ValueError, match="size"):
            load_medmnist3d("organmnist3d", data_dir=tmp_path, size=size)


def test_medmnist3d_table():
    # from the MedMNIST package's INFO (medmnist/info.py of v3.0.2, the files the URL serves),
    # and the release before v2.2.4, which had one more organmnist3d train / vesselmnist3d val volume
    official = {
        "organmnist3d": (11, "multi-class", (971, 161, 610), (972, 161, 610)),
        "nodulemnist3d": (2, "binary-class", (1158, 165, 310), (1158, 165, 310)),
        "adrenalmnist3d": (2, "binary-class", (1188, 98, 298), (1188, 98, 298)),
        "fracturemnist3d": (3, "multi-class", (1027, 103, 240), (1027, 103, 240)),
        "vesselmnist3d": (2, "binary-class", (1335, 191, 382), (1335, 192, 382)),
        "synapsemnist3d": (2, "binary-class", (1230, 177, 352), (1230, 177, 352)),
    }
    assert set(MEDMNIST3D) == set(official)
    for flag, entry in MEDMNIST3D.items():
        k, task, sizes, older = official[flag]
        assert entry["num_classes"] == len(entry["labels"]) == k
        assert entry["task"] == task
        assert entry["task"] == ("binary-class" if k == 2 else "multi-class")
        assert tuple(entry["n_samples"][s] for s in SPLITS) == sizes
        current, before = entry["releases"].values()
        assert tuple(current[s] for s in SPLITS) == sizes and tuple(before[s] for s in SPLITS) == older


@pytest.mark.parametrize("flag", ["organmnist3d", "vesselmnist3d"])
def test_official_sizes_of_both_releases_load(med_env, tmp_path, flag):
    """A file with the current release's split sizes and one with the sizes before v2.2.4
    both load with check_sizes on (the default), and medmnist_release names which it is."""
    from wrn3d_tl.data.medmnist import MEDMNIST_RELEASES, medmnist_release

    for release, sizes in MEDMNIST3D[flag]["releases"].items():
        arrays = {}
        for split in SPLITS:
            arrays[f"{split}_images"] = np.zeros((sizes[split], 28, 28, 28), np.uint8)
            arrays[f"{split}_labels"] = np.ones((sizes[split], 1), np.uint8)
        folder = tmp_path / release.replace(" ", "_")
        write_medmnist(folder, flag, arrays=arrays)
        data = load_medmnist3d(flag, data_dir=folder)
        got = {split: len(data[split][0]) for split in SPLITS}
        assert got == sizes and medmnist_release(flag, got) == release
    assert medmnist_release(flag, MEDMNIST3D[flag]["releases"][MEDMNIST_RELEASES[1]]) == "before v2.2.4"
    assert MEDMNIST3D[flag]["releases"][MEDMNIST_RELEASES[0]] != MEDMNIST3D[flag]["releases"][MEDMNIST_RELEASES[1]]


def test_wrn3d_train_names_its_flag_in_the_medmnist_size_refusal(med_env, tmp_path, capsys):
    from wrn3d_tl.commands import train

    write_medmnist(tmp_path, "organmnist3d")   # a small file: no release's sizes
    assert train.main(["--data", "medmnist:organmnist3d", "--data-dir", str(tmp_path), "--iters", "1",
                       "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--no-check-sizes" in err and "check_sizes=False" not in err and err.count("\n") == 1
    assert MEDMNIST3D["organmnist3d"]["labels"][0] == "liver"
    assert MEDMNIST3D["nodulemnist3d"]["labels"] == ("benign", "malignant")


def test_medmnist_refuses_a_lone_npy_under_the_npz_name(med_env, tmp_path):
    path = tmp_path / "organmnist3d.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros((2, 28, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="single array, not an .npz archive") as e:
        load_medmnist3d("organmnist3d", data_dir=tmp_path, check_sizes=False)
    assert str(path) in str(e.value)


def test_depth_flip_with_augment3d_is_refused():
    x = np.zeros((4, 4, 6, 6, 1), np.float32)
    with pytest.raises(ValueError, match="depth_flip=True belongs to augment=True"):
        make_dataset(x, np.arange(4), batch_size=2, volume_depth=None, augment=Augment3D(flip_axes="W"),
                     depth_flip=True)
    # without augmentation depth_flip is simply unused, as before
    make_dataset(x, np.arange(4), batch_size=2, volume_depth=None, training=False, depth_flip=True)
