"""Tests for wrn3d_tl.data (CIFAR loading, tiling, normalisation,
augmentation, in-memory and HDF5 tf.data pipelines).

Everything is tiny and local: no downloads, a few seconds per test at most.
"""

import dataclasses
import gc
import json
import os
import pickle
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:
    import wrn3d_tl.data  # noqa: F401
except ImportError:  # running without an installed package / conftest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from wrn3d_tl.data import (  # noqa: E402
    HDF5Info, Normalization, augment_image, augment_volume,
    compute_normalization, hdf5_dataset, hdf5_info, load_cifar, make_dataset,
    synthetic_cifar, tile_to_volume, write_hdf5_volumes)
from wrn3d_tl.data import cifar as cifar_mod  # noqa: E402


# ==========================================================================
# helpers: tiny CIFAR files in the real python-pickle formats
# ==========================================================================
def pattern_images(n, start):
    """Distinctive uint8 NHWC images: value depends on sample, h, w and c."""
    i, h, w, c = np.meshgrid(np.arange(start, start + n), np.arange(32),
                             np.arange(32), np.arange(3), indexing="ij")
    return ((i * 37 + h * 7 + w * 3 + c * 101) % 256).astype(np.uint8)


def to_rows(images):
    """NHWC -> official N x 3072 channel-major rows (R plane, G, B)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar10_expected():
    train = [(pattern_images(4, 4 * b), np.array([(4 * b + k) % 10
                                                  for k in range(4)]))
             for b in range(5)]
    test = (pattern_images(3, 100), np.array([9, 0, 5]))
    return train, test


def write_cifar10_folder(root, mutate=None):
    """root/cifar-10-batches-py with data_batch_1..5 (4 images) + test_batch
    (3 images); returns the expected ((x, y), (x, y))."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = cifar10_expected()
    files = [(f"data_batch_{b + 1}", train[b]) for b in range(5)]
    files.append(("test_batch", test))
    for name, (x, y) in files:
        batch = {b"batch_label": name.encode(), b"data": to_rows(x),
                 b"labels": [int(v) for v in y],
                 b"filenames": [b"img%d.png" % k for k in range(len(y))]}
        if mutate is not None:
            batch = mutate(name, batch)
        dump(folder / name, batch)
    return ((np.concatenate([x for x, _ in train]),
             np.concatenate([y for _, y in train])), test)


def write_cifar100_folder(root, mutate=None):
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n, start in (("train", 20, 0), ("test", 3, 50)):
        x = pattern_images(n, start)
        fine = (np.arange(n) * 7 + start) % 100
        coarse = fine // 5
        batch = {b"data": to_rows(x), b"fine_labels": fine.tolist(),
                 b"coarse_labels": coarse.tolist()}
        if mutate is not None:
            batch = mutate(name, batch)
        dump(folder / name, batch)
        out[name] = (x, fine, coarse)
    return out


def make_targz(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=Path(folder).name)
    return archive


def assert_split(got, x, y):
    gx, gy = got
    assert gx.dtype == np.uint8 and gx.shape == x.shape
    assert gy.dtype == np.int64 and gy.shape == (len(x),)
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No $WRN3D_DATA_DIR, $KERAS_HOME; HOME is an empty temp dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("WRN3D_DATA_DIR", raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


# ==========================================================================
# load_cifar: every supported location and format
# ==========================================================================
def test_cifar10_folder_exact_values(tmp_path, clean_env):
    (x_tr, y_tr), (x_te, y_te) = write_cifar10_folder(tmp_path / "d")
    train, test = load_cifar("cifar10", data_dir=tmp_path / "d")
    assert_split(train, x_tr, y_tr)
    assert_split(test, x_te, y_te)
    assert train[0].shape == (20, 32, 32, 3) and test[0].shape == (3, 32, 32, 3)
    # channel-major row -> HWC: pixel (h, w, c) is row[c * 1024 + h * 32 + w]
    rows = to_rows(x_tr)
    for n, h, w, c in [(0, 0, 0, 0), (3, 5, 17, 1), (19, 31, 2, 2)]:
        assert train[0][n, h, w, c] == rows[n, c * 1024 + h * 32 + w]


def test_cifar10_targz(tmp_path, clean_env):
    expected = write_cifar10_folder(tmp_path / "src")
    (tmp_path / "d").mkdir()
    make_targz(tmp_path / "src" / "cifar-10-batches-py",
               tmp_path / "d" / "cifar-10-python.tar.gz")
    train, test = load_cifar("cifar10", data_dir=tmp_path / "d")
    assert_split(train, *expected[0])
    assert_split(test, *expected[1])
    assert not (tmp_path / "d" / "cifar-10-batches-py").exists()  # no extract


@pytest.mark.parametrize("archive", [False, True])
@pytest.mark.parametrize("label_mode", ["fine", "coarse"])
def test_cifar100_folder_and_targz(tmp_path, clean_env, archive, label_mode):
    expected = write_cifar100_folder(tmp_path / "src")
    data_dir = tmp_path / "src"
    if archive:
        data_dir = tmp_path / "d"
        data_dir.mkdir()
        make_targz(tmp_path / "src" / "cifar-100-python",
                   data_dir / "cifar-100-python.tar.gz")
    train, test = load_cifar("cifar100", data_dir=data_dir,
                             label_mode=label_mode)
    col = 1 if label_mode == "fine" else 2
    assert_split(train, expected["train"][0], expected["train"][col])
    assert_split(test, expected["test"][0], expected["test"][col])
    assert train[1].max() < (100 if label_mode == "fine" else 20)


def test_folder_given_directly(tmp_path, clean_env):
    expected = write_cifar10_folder(tmp_path)
    train, test = load_cifar("cifar10",
                             data_dir=str(tmp_path / "cifar-10-batches-py"))
    assert_split(train, *expected[0])
    assert_split(test, *expected[1])


def test_archive_given_directly(tmp_path, clean_env):
    expected = write_cifar100_folder(tmp_path / "src")
    archive = make_targz(tmp_path / "src" / "cifar-100-python",
                         tmp_path / "my.tar.gz")
    train, _ = load_cifar("cifar100", data_dir=archive)
    assert_split(train, expected["train"][0], expected["train"][1])


def test_found_via_env_var(tmp_path, clean_env, monkeypatch):
    expected = write_cifar10_folder(tmp_path / "envdir")
    monkeypatch.setenv("WRN3D_DATA_DIR", str(tmp_path / "envdir"))
    train, test = load_cifar("cifar10")
    assert_split(train, *expected[0])
    assert_split(test, *expected[1])


def test_found_via_keras_cache(tmp_path, clean_env):
    cache = clean_env / ".keras" / "datasets"
    cache.mkdir(parents=True)
    expected = write_cifar10_folder(tmp_path / "src")
    make_targz(tmp_path / "src" / "cifar-10-batches-py",
               cache / "cifar-10-python.tar.gz")
    train, test = load_cifar("cifar10")
    assert_split(train, *expected[0])
    assert_split(test, *expected[1])


def test_keras3_cache_layout(tmp_path, clean_env):
    # keras 3 extracts to ~/.keras/datasets/cifar-10-batches-py-target/...
    expected = write_cifar10_folder(
        clean_env / ".keras" / "datasets" / "cifar-10-batches-py-target")
    train, _ = load_cifar("cifar10")
    assert_split(train, *expected[0])


def test_search_order_data_dir_first(tmp_path, clean_env, monkeypatch):
    write_cifar10_folder(tmp_path / "envdir")
    second = write_cifar100_folder(tmp_path / "d")      # cifar100 only here
    write_cifar10_folder(tmp_path / "d", mutate=lambda name, b: {
        **b, b"labels": [0] * len(b[b"labels"])})
    monkeypatch.setenv("WRN3D_DATA_DIR", str(tmp_path / "envdir"))
    (_, y), _ = load_cifar("cifar10", data_dir=tmp_path / "d")
    assert np.all(y == 0)                 # the data_dir copy won
    (_, y100), _ = load_cifar("cifar100", data_dir=tmp_path / "d")
    np.testing.assert_array_equal(y100, second["train"][1])


def test_missing_lists_every_path(tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("WRN3D_DATA_DIR", str(tmp_path / "env"))
    called = []
    monkeypatch.setattr(cifar_mod, "_keras_download",
                        lambda *a: called.append(a))
    with pytest.raises(FileNotFoundError) as info:
        load_cifar("cifar10", data_dir=tmp_path / "mine")
    msg = str(info.value)
    for base in (tmp_path / "mine", tmp_path / "env",
                 clean_env / ".keras" / "datasets"):
        assert str(base / "cifar-10-batches-py") in msg
        assert str(base / "cifar-10-python.tar.gz") in msg
    assert "download=True" in msg and "WRN3D_DATA_DIR" in msg
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "mine") in msg
    assert called == []                        # never downloads by itself


def test_download_true_uses_keras_when_missing(tmp_path, clean_env,
                                               monkeypatch):
    x = pattern_images(5, 0)
    calls = []

    def fake(name, label_mode):
        calls.append((name, label_mode))
        xc = x.transpose(0, 3, 1, 2)         # channels_first Keras config
        return ((xc, np.arange(5, dtype=np.uint8).reshape(5, 1)),
                (xc[:2], np.array([[3], [4]], np.uint8)))

    monkeypatch.setattr(cifar_mod, "_keras_download", fake)
    (xt, yt), (xs, ys) = load_cifar("cifar100", data_dir=tmp_path,
                                    download=True, label_mode="coarse")
    assert calls == [("cifar100", "coarse")]
    np.testing.assert_array_equal(xt, x)
    assert yt.dtype == np.int64 and yt.tolist() == [0, 1, 2, 3, 4]
    assert ys.tolist() == [3, 4] and xs.shape == (2, 32, 32, 3)
    # found locally -> no download even with download=True
    write_cifar10_folder(tmp_path)
    calls.clear()
    load_cifar("cifar10", data_dir=tmp_path, download=True)
    assert calls == []


# ==========================================================================
# load_cifar: bad inputs
# ==========================================================================
def test_truncated_targz(tmp_path, clean_env):
    write_cifar10_folder(tmp_path / "src")
    archive = make_targz(tmp_path / "src" / "cifar-10-batches-py",
                         tmp_path / "cifar-10-python.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        load_cifar("cifar10", data_dir=tmp_path)


def test_garbage_targz(tmp_path, clean_env):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not a gzip file" * 9)
    with pytest.raises(ValueError, match="cifar-100-python.tar.gz"):
        load_cifar("cifar100", data_dir=tmp_path)


def test_archive_missing_member(tmp_path, clean_env):
    write_cifar10_folder(tmp_path / "src")
    os.remove(tmp_path / "src" / "cifar-10-batches-py" / "test_batch")
    make_targz(tmp_path / "src" / "cifar-10-batches-py",
               tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(ValueError, match="test_batch") as info:
        load_cifar("cifar10", data_dir=tmp_path)
    assert "cifar-10-python.tar.gz" in str(info.value)


@pytest.mark.parametrize("content", [b"\x80\x02garbage!!", b""])
def test_corrupt_pickle(tmp_path, clean_env, content):
    write_cifar10_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar("cifar10", data_dir=tmp_path)


def test_truncated_pickle(tmp_path, clean_env):
    write_cifar10_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar("cifar10", data_dir=tmp_path)


def test_incomplete_folder(tmp_path, clean_env):
    write_cifar10_folder(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_5")
    with pytest.raises(ValueError, match="data_batch_5"):
        load_cifar("cifar10", data_dir=tmp_path)


def test_wrong_data_size(tmp_path, clean_env):
    def mutate(name, batch):
        if name == "data_batch_2":
            batch[b"data"] = batch[b"data"][:, :3000]
        return batch
    write_cifar10_folder(tmp_path, mutate)
    with pytest.raises(ValueError, match="data_batch_2") as info:
        load_cifar("cifar10", data_dir=tmp_path)
    assert "3072" in str(info.value)


def test_wrong_label_count(tmp_path, clean_env):
    def mutate(name, batch):
        if name == "train":
            batch[b"fine_labels"] = batch[b"fine_labels"][:-1]
        return batch
    write_cifar100_folder(tmp_path, mutate)
    with pytest.raises(ValueError, match="train"):
        load_cifar("cifar100", data_dir=tmp_path)


@pytest.mark.parametrize("name,label_mode,key,bad", [
    ("cifar10", "fine", b"labels", 10),
    ("cifar10", "fine", b"labels", -1),
    ("cifar100", "fine", b"fine_labels", 100),
    ("cifar100", "coarse", b"coarse_labels", 20),
])
def test_label_out_of_range(tmp_path, clean_env, name, label_mode, key, bad):
    def mutate(file_name, batch):
        if file_name in ("test_batch", "test"):
            batch[key] = [bad] + list(batch[key][1:])
        return batch
    writer = write_cifar10_folder if name == "cifar10" else \
        write_cifar100_folder
    writer(tmp_path, mutate)
    file_name = "test_batch" if name == "cifar10" else "test"
    with pytest.raises(ValueError, match=file_name):
        load_cifar(name, data_dir=tmp_path, label_mode=label_mode)


def test_unknown_name_and_label_mode(tmp_path, clean_env):
    with pytest.raises(ValueError, match="name"):
        load_cifar("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="label_mode"):
        load_cifar("cifar10", data_dir=tmp_path, label_mode="coarse")
    with pytest.raises(ValueError, match="label_mode"):
        load_cifar("cifar100", data_dir=tmp_path, label_mode="medium")


# ==========================================================================
# synthetic_cifar
# ==========================================================================
def test_synthetic_shapes_dtypes_determinism():
    (xt, yt), (xs, ys) = synthetic_cifar(50, 20, num_classes=5, seed=3)
    assert xt.shape == (50, 32, 32, 3) and xt.dtype == np.uint8
    assert xs.shape == (20, 32, 32, 3) and xs.dtype == np.uint8
    assert yt.shape == (50,) and yt.dtype == np.int64 and ys.dtype == np.int64
    assert np.bincount(yt, minlength=5).tolist() == [10] * 5   # balanced
    assert set(ys.tolist()) <= set(range(5))
    (xt2, yt2), (xs2, ys2) = synthetic_cifar(50, 20, num_classes=5, seed=3)
    np.testing.assert_array_equal(xt, xt2)
    np.testing.assert_array_equal(ys, ys2)
    np.testing.assert_array_equal(xs, xs2)
    (xt3, _), _ = synthetic_cifar(50, 20, num_classes=5, seed=4)
    assert not np.array_equal(xt, xt3)
    assert xt.std() > 20                      # not blank
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_cifar(10, 10, num_classes=0)
    with pytest.raises(ValueError, match="n_train"):
        synthetic_cifar(-1, 10)


def test_synthetic_is_learnable():
    """Nearest class mean is perfect, and a tiny CNN fits it in 100 steps."""
    (xt, yt), (xs, ys) = synthetic_cifar(640, 200, seed=0)
    means = np.stack([xt[yt == k].reshape(-1, 3072).mean(0)
                      for k in range(10)])
    dist = ((xs.reshape(-1, 1, 3072) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == ys).mean() > 0.95

    keras = tf.keras
    tf.random.set_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    norm = compute_normalization(xt)
    train = make_dataset(xt, yt, batch_size=32, volume_depth=None,
                         normalization=norm, repeat=True, seed=1)
    model.fit(train, steps_per_epoch=100, epochs=1, verbose=0, shuffle=False)
    evaluation = make_dataset(xt, yt, batch_size=320, volume_depth=None,
                              normalization=norm, training=False)
    _, accuracy = model.evaluate(evaluation, verbose=0)
    assert accuracy > 0.9


# ==========================================================================
# tile_to_volume
# ==========================================================================
def shifted(image, s):
    """numpy reference: translate right by s, edge-replicate (HWC)."""
    w = image.shape[1]
    cols = np.clip(np.arange(w) - s, 0, w - 1)
    return image[:, cols]


def test_tile_repeat_batch_and_single():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), np.uint8)
    vol = tile_to_volume(images, 4).numpy()
    assert vol.shape == (2, 4, 5, 6, 3) and vol.dtype == np.uint8
    for d in range(4):
        np.testing.assert_array_equal(vol[:, d], images)
    single = tile_to_volume(images[1], 3, mode="repeat").numpy()
    assert single.shape == (3, 5, 6, 3)
    for d in range(3):
        np.testing.assert_array_equal(single[d], images[1])


@pytest.mark.parametrize("depth", [1, 4, 5])
def test_tile_shift_exact(depth):
    images = np.random.default_rng(1).random((2, 5, 7, 2)).astype(np.float32)
    vol = tile_to_volume(images, depth, mode="shift").numpy()
    assert vol.shape == (2, depth, 5, 7, 2) and vol.dtype == np.float32
    single = tile_to_volume(images[0], depth, mode="shift").numpy()
    for d in range(depth):
        s = d - depth // 2
        for n in range(2):
            np.testing.assert_array_equal(vol[n, d], shifted(images[n], s))
        np.testing.assert_array_equal(single[d], shifted(images[0], s))
    np.testing.assert_array_equal(vol[:, depth // 2], images)   # centre slice
    if depth == 5:   # explicit: slice 4 moved right by 2, left edge repeated
        np.testing.assert_array_equal(vol[0, 4, :, 2:], images[0, :, :5])
        np.testing.assert_array_equal(vol[0, 4, :, 0], images[0, :, 0])
        np.testing.assert_array_equal(vol[0, 0, :, :5], images[0, :, 2:])


def test_tile_inside_dataset_map():
    images = np.random.default_rng(2).integers(0, 256, (4, 6, 6, 1), np.uint8)
    ds = tf.data.Dataset.from_tensor_slices(images).map(
        lambda im: tile_to_volume(im, 3, "shift")).batch(4)
    got = next(iter(ds)).numpy()
    np.testing.assert_array_equal(
        got, tile_to_volume(images, 3, "shift").numpy())


@pytest.mark.parametrize("depth", [0, -2, 2.5, True, "8", None])
def test_tile_bad_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        tile_to_volume(np.zeros((4, 4, 3)), depth)


def test_tile_bad_mode_and_rank():
    with pytest.raises(ValueError, match="mode"):
        tile_to_volume(np.zeros((4, 4, 3)), 2, mode="zoom")
    with pytest.raises(ValueError, match="images"):
        tile_to_volume(np.zeros((4, 4)), 2)


# ==========================================================================
# normalisation
# ==========================================================================
@pytest.mark.parametrize("shape", [(53, 6, 5, 3), (11, 3, 4, 4, 2)])
def test_compute_normalization_matches_numpy(shape):
    x = np.random.default_rng(3).integers(0, 256, shape).astype(np.uint8)
    norm = compute_normalization(x, batch=7)           # several chunks
    flat = x.reshape(-1, shape[-1]).astype(np.float64)
    assert norm.mean.dtype == np.float32 and norm.mean.shape == (shape[-1],)
    assert norm.std.dtype == np.float32 and norm.std.shape == (shape[-1],)
    np.testing.assert_allclose(norm.mean, flat.mean(0), atol=1e-4, rtol=0)
    np.testing.assert_allclose(norm.std, flat.std(0), atol=1e-4, rtol=0)
    normed = norm.apply(x).numpy()
    assert normed.dtype == np.float32 and normed.shape == shape
    np.testing.assert_allclose(normed.reshape(-1, shape[-1]).mean(0), 0,
                               atol=1e-4)
    np.testing.assert_allclose(normed.reshape(-1, shape[-1]).std(0), 1,
                               atol=1e-4)


def test_normalization_constant_channel_and_storage():
    x = np.zeros((10, 4, 4, 2), np.uint8)
    x[..., 1] = np.arange(16).reshape(4, 4)
    norm = compute_normalization(x)
    assert norm.std[0] == 1.0 and norm.mean[0] == 0.0     # guarded
    assert norm.std[1] > 1
    d = json.loads(json.dumps(norm.to_dict()))
    again = Normalization.from_dict(d)
    assert again == norm
    np.testing.assert_array_equal(again.mean, norm.mean)
    with pytest.raises(dataclasses.FrozenInstanceError):
        norm.mean = np.zeros(2)
    with pytest.raises(ValueError):
        norm.mean[0] = 3.0                       # read-only arrays
    with pytest.raises(ValueError, match="std"):
        Normalization(mean=[0.0, 1.0], std=[1.0, 0.0])
    with pytest.raises(ValueError, match="same length"):
        Normalization(mean=[0.0, 1.0], std=[1.0])
    with pytest.raises(ValueError, match="channels"):
        norm.apply(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="mean"):
        Normalization.from_dict({"std": [1.0]})
    ref = Normalization(mean=[10.0, 20.0], std=[2.0, 4.0])
    out = ref.apply(np.array([[14, 28]], np.uint8)).numpy()
    np.testing.assert_array_equal(out, [[2.0, 2.0]])


# ==========================================================================
# augmentation
# ==========================================================================
def crop_params(out, src, pad=4):
    """All (oy, ox, flip) such that out == crop of reflect-padded src."""
    h, w = src.shape[:2]
    padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    found = set()
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[oy:oy + h, ox:ox + w]
            for flip in (False, True):
                if np.array_equal(crop[:, ::-1] if flip else crop, out):
                    found.add((oy, ox, flip))
    return found


def assert_one_crop_for_all_slices(out, source):
    """Every slice of ``out`` (DHWC) is the same crop/flip of ``source``.

    (A crop can have two equivalent descriptions at the reflect border,
    e.g. for W=8 offset 0 flipped == offset 1; those sets are compared.)
    """
    per_slice = [crop_params(out[d], source[d]) for d in range(len(out))]
    assert per_slice[0], "slice 0 is not a crop of the source"
    assert all(p == per_slice[0] for p in per_slice), per_slice


def rand_u8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def test_augment_image_is_crop_and_flip_and_deterministic():
    image = rand_u8((12, 10, 3), 4)
    seen = set()
    for s in range(30):
        seed = tf.constant([s, 7], tf.int64)
        out = augment_image(image, seed).numpy()
        assert out.shape == image.shape and out.dtype == np.uint8
        params = crop_params(out, image)
        assert len(params) == 1
        seen |= params
        np.testing.assert_array_equal(out, augment_image(image, seed).numpy())
    assert len(seen) > 15                               # varied offsets
    assert {p[2] for p in seen} == {False, True}        # both flips happen


def test_augment_volume_same_crop_for_every_slice():
    volume = rand_u8((5, 12, 10, 2), 5)                 # distinct slices
    flips_seen = set()
    for s in range(12):
        out = augment_volume(volume, tf.constant([s, 1]),
                             depth_flip=True).numpy()
        assert out.shape == volume.shape
        depth_flipped = crop_params(out[0], volume[-1]) != set()
        flips_seen.add(depth_flipped)
        source = volume[::-1] if depth_flipped else volume
        assert_one_crop_for_all_slices(out, source)
    assert flips_seen == {False, True}
    # without depth_flip the slice order never changes
    for s in range(6):
        out = augment_volume(volume, tf.constant([s, 1])).numpy()
        assert crop_params(out[0], volume[0])


def test_augment_volume_matches_image_for_repeat_tiles():
    image = rand_u8((9, 9, 3), 6)
    for s in range(5):
        seed = tf.constant([s, s + 1])
        a = augment_volume(tile_to_volume(image, 4), seed).numpy()
        b = tile_to_volume(augment_image(image, seed), 4).numpy()
        np.testing.assert_array_equal(a, b)


def test_augment_bad_args():
    with pytest.raises(ValueError, match="seed"):
        augment_image(np.zeros((8, 8, 1)), tf.constant([1, 2, 3]))
    with pytest.raises(ValueError, match="image"):
        augment_image(np.zeros((2, 8, 8, 1)), tf.constant([1, 2]))
    with pytest.raises(ValueError, match="volume"):
        augment_volume(np.zeros((8, 8, 1)), tf.constant([1, 2]))
    with pytest.raises(ValueError, match="pad"):
        augment_image(np.zeros((4, 8, 1)), tf.constant([1, 2]))


# ==========================================================================
# make_dataset
# ==========================================================================
def collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def small_images():
    x = rand_u8((40, 32, 32, 3), 7)
    y = np.arange(40) % 10
    return x, y


def test_make_dataset_shapes_and_dtypes(small_images):
    x, y = small_images
    ds = make_dataset(x, y, batch_size=16, volume_depth=4, seed=1)
    spec_x, spec_y = ds.element_spec
    assert spec_x.shape.as_list() == [None, 4, 32, 32, 3]
    assert spec_x.dtype == tf.float32 and spec_y.dtype == tf.int64
    assert int(ds.cardinality()) == 3
    batches = [(bx.numpy(), by.numpy()) for bx, by in ds]
    assert [b[0].shape for b in batches] == [(16, 4, 32, 32, 3)] * 2 + [
        (8, 4, 32, 32, 3)]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.int64
               for b in batches)
    # labels preserved as a multiset, order shuffled
    labels = np.concatenate([b[1] for b in batches])
    assert sorted(labels.tolist()) == sorted(y.tolist())
    # repeat mode + augmentation: every slice of a sample is identical
    for bx, _ in batches:
        for d in range(1, 4):
            np.testing.assert_array_equal(bx[:, d], bx[:, 0])


def test_make_dataset_eval_is_plain_and_ordered(small_images):
    x, y = small_images
    for depth in (None, 3):
        ds = make_dataset(x, y, batch_size=16, volume_depth=depth,
                          training=False)
        gx, gy = collect(ds)
        np.testing.assert_array_equal(gy, y)
        expected = x.astype(np.float32)
        if depth is None:
            assert gx.shape == (40, 32, 32, 3)
            np.testing.assert_array_equal(gx, expected)
        else:
            assert gx.shape == (40, 3, 32, 32, 3)
            for d in range(3):
                np.testing.assert_array_equal(gx[:, d], expected)
        gx2, _ = collect(ds)                     # deterministic
        np.testing.assert_array_equal(gx, gx2)


def test_make_dataset_2d_training_shapes(small_images):
    x, y = small_images
    ds = make_dataset(x, y, batch_size=8, volume_depth=None, seed=2)
    assert ds.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    gx, gy = collect(ds)
    assert gx.shape == (40, 32, 32, 3) and sorted(gy) == sorted(y)
    # each output is a crop/flip of its (unique) source image
    index = {img.tobytes(): i for i, img in enumerate(x)}
    assert len(index) == 40
    for out in gx[:5]:
        matches = [i for i in range(40)
                   if crop_params(out.astype(np.uint8), x[i])]
        assert len(matches) == 1


def test_make_dataset_shift_mode_and_normalization(small_images):
    x, y = small_images
    norm = Normalization(mean=[100.0, 120.0, 140.0], std=[50.0, 60.0, 70.0])
    ds = make_dataset(x, y, batch_size=40, volume_depth=3, tile_mode="shift",
                      training=False, normalization=norm)
    gx, _ = collect(ds)
    as_dict = make_dataset(x, y, batch_size=40, volume_depth=3,
                           tile_mode="shift", training=False,
                           normalization=norm.to_dict())
    np.testing.assert_array_equal(collect(as_dict)[0], gx)
    normed = (x.astype(np.float32) - norm.mean) / norm.std
    for d in range(3):
        for n in (0, 17, 39):
            np.testing.assert_allclose(gx[n, d], shifted(normed[n], d - 1),
                                       rtol=1e-6, atol=1e-6)


def test_make_dataset_seeds(small_images):
    x, y = small_images

    def run(seed):
        return collect(make_dataset(x, y, batch_size=16, volume_depth=2,
                                    seed=seed))

    tf.random.set_seed(123)
    a = run(5)
    tf.random.set_seed(456)          # the global seed plays no role
    b, c = run(5), run(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_make_dataset_reshuffles_each_epoch_deterministically(small_images):
    x, y = small_images
    idx = np.arange(40)
    ds1 = make_dataset(x, idx, batch_size=40, volume_depth=None, seed=3,
                       augment=False)
    ds2 = make_dataset(x, idx, batch_size=40, volume_depth=None, seed=3,
                       augment=False)
    e1 = [collect(ds1)[1] for _ in range(3)]
    e2 = [collect(ds2)[1] for _ in range(3)]
    for a, b in zip(e1, e2):
        np.testing.assert_array_equal(a, b)
        assert sorted(a) == list(range(40))
    assert not np.array_equal(e1[0], e1[1])
    assert not np.array_equal(e1[0], idx)
    # the image really travels with its label
    gx, gy = collect(ds1)
    np.testing.assert_array_equal(gx, x[gy].astype(np.float32))


def test_make_dataset_drop_remainder_and_repeat(small_images):
    x, y = small_images
    ds = make_dataset(x, y, batch_size=16, volume_depth=2, seed=0,
                      drop_remainder=True)
    shapes = [bx.shape for bx, _ in ds]
    assert shapes == [(16, 2, 32, 32, 3)] * 2
    assert ds.element_spec[0].shape.as_list() == [16, 2, 32, 32, 3]
    rep = make_dataset(x, np.arange(40), batch_size=16, volume_depth=None,
                       seed=0, repeat=True)
    assert rep.cardinality() == tf.data.INFINITE_CARDINALITY
    labels = [by.numpy() for _, by in rep.take(10)]       # 4 epochs
    assert all(len(b) == 16 for b in labels)
    flat = np.concatenate(labels)
    for e in range(4):
        assert sorted(flat[40 * e:40 * (e + 1)]) == list(range(40))
    assert not np.array_equal(flat[:40], flat[40:80])
    ev = make_dataset(x, y, batch_size=16, volume_depth=None, training=False,
                      repeat=True)
    labels = np.concatenate([by.numpy() for _, by in ev.take(5)])
    np.testing.assert_array_equal(labels, np.tile(y, 2))


def test_make_dataset_real_volumes():
    vols = rand_u8((12, 4, 10, 10, 2), 8)
    ds = make_dataset(vols, np.arange(12), batch_size=12, volume_depth=None,
                      seed=1, depth_flip=False)
    gx, gy = collect(ds)
    assert gx.shape == (12, 4, 10, 10, 2) and sorted(gy) == list(range(12))
    for out, label in zip(gx.astype(np.uint8), gy):
        assert_one_crop_for_all_slices(out, vols[label])
    same = make_dataset(vols, np.arange(12), batch_size=5, volume_depth=4,
                        training=False)
    np.testing.assert_array_equal(collect(same)[0], vols.astype(np.float32))
    with pytest.raises(ValueError, match="volume_depth"):
        make_dataset(vols, np.arange(12), batch_size=4, volume_depth=8)
    # depth_flip: some volumes come out with their slices reversed
    flipped = make_dataset(vols, np.arange(12), batch_size=12,
                           volume_depth=None, seed=3, depth_flip=True)
    gx, gy = collect(flipped)
    reversed_count = 0
    for out, label in zip(gx.astype(np.uint8), gy):
        is_reversed = not crop_params(out[0], vols[label, 0])
        reversed_count += is_reversed
        source = vols[label, ::-1] if is_reversed else vols[label]
        assert_one_crop_for_all_slices(out, source)
    assert 0 < reversed_count < 12


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=np.zeros((4, 32, 32)), y=np.zeros(4, int)), "rank"),
    (dict(x=np.zeros((4, 8, 8, 3)), y=np.zeros(5, int)), "len"),
    (dict(x=np.zeros((4, 8, 8, 3)), y=np.zeros(4)), "integer"),
    (dict(x=np.zeros((4, 8, 8, 3)), y=np.array([0, 1, -1, 2])), "negative"),
    (dict(x=np.zeros((4, 8, 8, 3)), y=np.zeros((4, 2), int)), "1-D"),
    (dict(x=np.array([["a"] * 3] * 4).reshape(4, 1, 1, 3),
          y=np.zeros(4, int)), "real numbers"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-3), "batch_size"),
    (dict(batch_size=2.0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(volume_depth=0), "volume_depth"),
    (dict(tile_mode="spin"), "mode"),
    (dict(normalization=Normalization([0.0], [1.0])), "channels"),
    (dict(normalization=[0.0, 1.0]), "normalization"),
    (dict(normalization={"mean": [0.0]}), "'mean' and 'std'"),
    (dict(seed=1.5), "seed"),
    (dict(batch_size=10, drop_remainder=True), "drop_remainder"),
])
def test_make_dataset_validation(kwargs, match):
    args = dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(4),
                batch_size=2)
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(ValueError, match=match):
        make_dataset(x, y, **args)


def test_make_dataset_inside_strategy_scope(small_images, two_cpu_strategy):
    x, y = small_images
    strategy = two_cpu_strategy  # a real 2-replica MirroredStrategy
    assert strategy.num_replicas_in_sync == 2
    created = []

    def spy(next_creator, **kwargs):  # sees every variable the scope's creators make
        v = next_creator(**kwargs)
        created.append(v)
        return v

    with strategy.scope(), tf.variable_creator_scope(spy):
        ds = make_dataset(x, y, batch_size=16, volume_depth=2,
                          training=False)
        aug = make_dataset(x, y, batch_size=16, volume_depth=2,
                           training=True, seed=3)
    # The input data is not mirrored: no variable with a copy per replica.
    mirrored = [v for v in created
                if len(strategy.experimental_local_results(v)) > 1]
    assert not mirrored, [v.name for v in mirrored]
    gx, gy = collect(ds)
    np.testing.assert_array_equal(gy, y)
    np.testing.assert_array_equal(gx[:, 1], x.astype(np.float32))
    # the shuffling/augmenting pipeline equals the one built outside any scope
    ax, ay = collect(aug)
    bx, by = collect(make_dataset(x, y, batch_size=16, volume_depth=2,
                                  training=True, seed=3))
    np.testing.assert_array_equal(ay, by)
    np.testing.assert_array_equal(ax, bx)
    assert sorted(ay) == sorted(y)


def test_make_dataset_memory_does_not_materialise_volumes():
    psutil = pytest.importorskip("psutil")
    x = np.random.default_rng(0).integers(0, 256, (50000, 32, 32, 3),
                                          dtype=np.uint8)      # 147 MiB
    y = np.arange(50000) % 10
    warm = make_dataset(x[:64], y[:64], batch_size=32, volume_depth=8)
    list(warm)                                  # initialise the TF runtime
    del warm
    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    ds = make_dataset(x, y, batch_size=32, volume_depth=8, seed=0)
    n = 0
    for bx, by in ds.take(10):
        assert bx.shape == (32, 8, 32, 32, 3) and bx.dtype == tf.float32
        n += 1
    grown = (proc.memory_info().rss - base) / 2**20
    assert n == 10
    # tiling all of x would need 50000*8*3072*4 B = 4.6 GiB of float32
    assert grown < 300, f"RSS grew by {grown:.0f} MiB"


# ==========================================================================
# HDF5
# ==========================================================================
def small_volumes(dtype, n=200, seed=9):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(5.0, 3.0, (n, 4, 8, 8, 2)).astype(dtype)
    return rng.integers(0, 256, (n, 4, 8, 8, 2)).astype(dtype)


def test_autotuning_changes_no_element(tmp_path, set_autotune):
    """The test processes run tf.data with autotuning off (tests/conftest.py): the shuffled,
    augmented in-memory and HDF5 training pipelines give the same batches either way."""
    vols = small_volumes(np.uint8, n=40)
    write_hdf5_volumes(tmp_path / "t.h5", vols, np.arange(40), chunks=(8, 4, 8, 8, 2))
    pipelines = {
        "memory": lambda: make_dataset(vols, np.arange(40), batch_size=8, volume_depth=None, training=True,
                                       seed=3, depth_flip=True),
        "hdf5": lambda: hdf5_dataset(tmp_path / "t.h5", batch_size=8, training=True, seed=3, normalization=None,
                                     block_size=8, shuffle_buffer=16, depth_flip=True)}
    for name, make in pipelines.items():
        got = {}
        for on in (True, False):
            set_autotune(on)
            ds = make()
            enabled = tf.data.Dataset._apply_debug_options(ds).options().autotune.enabled  # None: the default, on
            assert (enabled is not False) == on, name
            got[on] = collect(ds)
        assert sorted(got[True][1]) == list(range(40)), name
        np.testing.assert_array_equal(got[True][0], got[False][0], err_msg=name)
        np.testing.assert_array_equal(got[True][1], got[False][1], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("block_size", [None, 16])
def test_hdf5_round_trip_in_order(tmp_path, dtype, block_size):
    vols = small_volumes(dtype)
    labels = np.arange(200) % 7
    path = tmp_path / "v.h5"
    info = write_hdf5_volumes(path, vols, labels, chunks=(10, 4, 8, 8, 2))
    assert isinstance(info, HDF5Info) and info.n == 200
    with h5py.File(path, "r") as f:
        assert f["volumes"].dtype == dtype and f["volumes"].chunks[0] == 10
        assert f["labels"].dtype == np.int64
        np.testing.assert_array_equal(f["volumes"][()], vols)
    ds = hdf5_dataset(path, batch_size=32, normalization=None,
                      block_size=block_size)
    assert int(ds.cardinality()) == 7
    sizes, xs, ys = [], [], []
    for bx, by in ds:
        assert bx.dtype == tf.float32 and by.dtype == tf.int64
        sizes.append(len(by))
        xs.append(bx.numpy())
        ys.append(by.numpy())
    assert sizes == [32] * 6 + [8]
    np.testing.assert_array_equal(np.concatenate(xs), vols.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate(ys), labels)


def test_hdf5_training_epoch_covers_every_label_once(tmp_path):
    vols = small_volumes(np.uint8, n=100)
    path = tmp_path / "t.h5"
    write_hdf5_volumes(path, vols, np.arange(100), chunks=(8, 4, 8, 8, 2))
    ds = hdf5_dataset(path, batch_size=16, training=True, seed=1,
                      normalization=None, block_size=8, shuffle_buffer=24,
                      depth_flip=False)
    gx, gy = collect(ds)
    assert sorted(gy) == list(range(100))
    assert not np.array_equal(gy, np.arange(100))        # shuffled
    # augmented: one crop/flip shared by all slices of each volume
    for out, label in zip(gx[:20].astype(np.uint8), gy[:20]):
        assert_one_crop_for_all_slices(out, vols[label])
    # same seed -> same batches (fresh pipeline); next epoch differs
    again = hdf5_dataset(path, batch_size=16, training=True, seed=1,
                         normalization=None, block_size=8, shuffle_buffer=24)
    hx, hy = collect(again)
    np.testing.assert_array_equal(hx, gx)
    np.testing.assert_array_equal(hy, gy)
    _, gy2 = collect(ds)
    assert sorted(gy2) == list(range(100)) and not np.array_equal(gy2, gy)
    other = collect(hdf5_dataset(path, batch_size=16, training=True, seed=2,
                                 normalization=None, block_size=8))[1]
    assert not np.array_equal(other, gy)
    # repeat: endless, full batches, every epoch complete
    rep = hdf5_dataset(path, batch_size=25, training=True, repeat=True,
                       block_size=8, normalization=None)
    flat = np.concatenate([by.numpy() for _, by in rep.take(8)])
    assert sorted(flat[:100]) == sorted(flat[100:]) == list(range(100))


def test_hdf5_stored_normalization(tmp_path):
    vols = small_volumes(np.float32, n=30)
    path = tmp_path / "n.h5"
    info = write_hdf5_volumes(path, vols, np.arange(30) % 3,
                              normalization="compute", num_classes=5)
    ref = compute_normalization(vols)
    assert info.normalization == ref
    assert info.num_classes == 5
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["volumes"].attrs["norm_mean"], ref.mean)
        np.testing.assert_array_equal(f["volumes"].attrs["norm_std"], ref.std)
        assert f["labels"].attrs["num_classes"] == 5
    gx, _ = collect(hdf5_dataset(path, batch_size=8))          # "file"
    np.testing.assert_allclose(gx, (vols - ref.mean) / ref.std, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(gx.reshape(-1, 2).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(gx.reshape(-1, 2).std(0), 1, atol=1e-4)
    raw, _ = collect(hdf5_dataset(path, batch_size=8, normalization=None))
    np.testing.assert_array_equal(raw, vols)
    custom = Normalization(mean=[1.0, 2.0], std=[2.0, 4.0])
    gx, _ = collect(hdf5_dataset(path, batch_size=8, normalization=custom))
    np.testing.assert_allclose(gx, (vols - custom.mean) / custom.std,
                               rtol=1e-6)


def test_hdf5_info_fields(tmp_path):
    vols = small_volumes(np.uint8, n=20)
    path = tmp_path / "i.h5"
    write_hdf5_volumes(path, vols, np.arange(20) % 4, x_key="train/x",
                       y_key="train/y", compression="gzip")
    write_hdf5_volumes(path, vols[:5], np.arange(5), x_key="test/x",
                       y_key="test/y", mode="a")
    info = hdf5_info(path, "train/x", "train/y")
    assert (info.n, info.volume_shape, info.dtype) == (20, (4, 8, 8, 2),
                                                       np.uint8)
    assert info.num_classes == 4 and info.normalization is None
    assert info.chunk_len == 20
    assert hdf5_info(path, "test/x", "test/y").n == 5
    gx, gy = collect(hdf5_dataset(path, x_key="test/x", y_key="test/y",
                                  batch_size=2))
    np.testing.assert_array_equal(gx, vols[:5].astype(np.float32))
    with pytest.raises(ValueError, match="already exists"):
        write_hdf5_volumes(path, vols, np.arange(20) % 4, x_key="train/x",
                           y_key="other", mode="a")


def write_raw(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


GOOD_X = np.zeros((6, 2, 8, 8, 1), np.float32)
GOOD_Y = np.arange(6)


@pytest.mark.parametrize("datasets,key,match", [
    (dict(labels=GOOD_Y), "volumes", "datasets present: \\['labels'\\]"),
    (dict(volumes=GOOD_X), "labels", "datasets present: \\['volumes'\\]"),
    (dict(volumes=np.zeros((6, 8, 8, 1)), labels=GOOD_Y), "volumes", "5-D"),
    (dict(volumes=GOOD_X, labels=GOOD_Y.astype(np.float32)), "labels",
     "integers"),
    (dict(volumes=GOOD_X, labels=np.array([0, 1, 2, -4, 1, 0])), "labels",
     ">= 0"),
    (dict(volumes=GOOD_X, labels=np.arange(5)), "labels", "shape"),
    (dict(volumes=np.zeros((0, 2, 8, 8, 1)), labels=np.arange(0)), "volumes",
     "empty"),
    (dict(volumes=np.array([b"ab"] * 6).reshape(6, 1, 1, 1, 1),
          labels=GOOD_Y), "volumes", "numeric"),
])
def test_hdf5_bad_files(tmp_path, datasets, key, match):
    path = write_raw(tmp_path / "bad_file.h5", **datasets)
    for call in (lambda: hdf5_info(path),
                 lambda: hdf5_dataset(path, batch_size=2)):
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "bad_file.h5" in str(info.value)
        assert repr(key) in str(info.value)


def test_hdf5_missing_and_not_hdf5(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.h5"):
        hdf5_dataset(tmp_path / "nowhere.h5", batch_size=2)
    text = tmp_path / "notes.h5"
    text.write_text("just text")
    with pytest.raises(ValueError, match="not an HDF5 file") as info:
        hdf5_info(text)
    assert "notes.h5" in str(info.value) and "'volumes'" in str(info.value)


def test_hdf5_labels_vs_num_classes(tmp_path):
    path = write_raw(tmp_path / "nc.h5", volumes=GOOD_X, labels=GOOD_Y)
    assert hdf5_info(path).num_classes == 6                   # guessed
    with pytest.raises(ValueError, match="num_classes") as info:
        hdf5_dataset(path, batch_size=2, num_classes=5)
    assert "nc.h5" in str(info.value) and "'labels'" in str(info.value)
    with h5py.File(path, "a") as f:
        f["labels"].attrs["num_classes"] = 4
    with pytest.raises(ValueError, match="num_classes") as info:
        hdf5_info(path)
    assert "nc.h5" in str(info.value) and "'labels'" in str(info.value)


def test_write_hdf5_validation(tmp_path):
    path = tmp_path / "w.h5"
    with pytest.raises(ValueError, match="5-D"):
        write_hdf5_volumes(path, np.zeros((3, 4, 4, 1)), np.arange(3))
    with pytest.raises(ValueError, match="len"):
        write_hdf5_volumes(path, GOOD_X, np.arange(5))
    with pytest.raises(ValueError, match="integer"):
        write_hdf5_volumes(path, GOOD_X, GOOD_Y.astype(float))
    with pytest.raises(ValueError, match="num_classes"):
        write_hdf5_volumes(path, GOOD_X, GOOD_Y, num_classes=3)
    with pytest.raises(ValueError, match="chunks"):
        write_hdf5_volumes(path, GOOD_X, GOOD_Y, chunks=(2, 2))
    with pytest.raises(ValueError, match="differ"):
        write_hdf5_volumes(path, GOOD_X, GOOD_Y, x_key="a", y_key="a")
    assert not path.exists()


def test_hdf5_dataset_argument_validation(tmp_path):
    path = tmp_path / "ok.h5"
    write_hdf5_volumes(path, GOOD_X, GOOD_Y)
    with pytest.raises(ValueError, match="batch_size"):
        hdf5_dataset(path, batch_size=0)
    with pytest.raises(ValueError, match="normalization"):
        hdf5_dataset(path, batch_size=2, normalization="stats")
    with pytest.raises(ValueError, match="channels"):
        hdf5_dataset(path, batch_size=2,
                     normalization=Normalization([0.0, 0.0], [1.0, 1.0]))
    with pytest.raises(ValueError, match="crop_padding"):
        hdf5_dataset(path, batch_size=2, training=True, crop_padding=8)
