"""wrn3d_tl.data.shards: pipelines positioned at a later batch (resume) and split into one
input pipeline's share of every global batch (tf.distribute), for make_dataset,
hdf5_dataset and nifti_dataset. Samples carry their index as label, so every check is on
which samples came, in which order, with which augmentation."""

import os

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.data import Augment3D, hdf5_dataset, make_dataset, nifti_dataset, write_hdf5_volumes
from wrn3d_tl.data.shards import Share, input_share, share_problem, starting_at

N, B = 22, 4
SHAPE = (2, 6, 6, 1)


class Counting:
    """An augmentation that records which samples were augmented (their index is voxel
    (0, 0, 0)) and then applies an Augment3D: counts the decode/augment work."""

    def __init__(self):
        self.seen = []
        self.aug = Augment3D(flip_axes="HW", scale=0.1)

    def __call__(self, sample, seed):
        def record(v):
            self.seen.append(int(round(float(v[0, 0, 0, 0]))))
            return v
        sample = tf.numpy_function(record, [sample], sample.dtype, stateful=True)
        return self.aug(tf.ensure_shape(sample, SHAPE), seed)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    x = np.random.default_rng(0).normal(size=(N,) + SHAPE).astype(np.float32)
    x[:, 0, 0, 0, 0] = np.arange(N)
    h5 = str(root / "v.h5")
    write_hdf5_volumes(h5, x, np.arange(N), chunks=(3,) + SHAPE)
    rows = []
    for i in range(N):
        path = str(root / f"s{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(x[i, ..., 0], np.eye(4)), path)
        rows.append(f"{path},{i}")
    table = str(root / "t.csv")
    with open(table, "w") as fh:
        fh.write("path,label\n" + "\n".join(rows) + "\n")
    return x, h5, table


def build(kind, files, *, repeat=True, drop_remainder=False, augment=None, shuffle=True):
    x, h5, table = files
    if kind == "memory":
        return make_dataset(x, np.arange(N), batch_size=B, volume_depth=None, training=shuffle, augment=augment or False, seed=3,
                            repeat=repeat, drop_remainder=drop_remainder)
    if kind == "hdf5":
        return hdf5_dataset(h5, batch_size=B, training=shuffle, augment=augment or False, seed=3, repeat=repeat,
                            drop_remainder=drop_remainder, normalization=None, block_size=3, shuffle_buffer=6)
    return nifti_dataset(table, batch_size=B, training=shuffle, augment=augment, seed=3, repeat=repeat,
                         drop_remainder=drop_remainder, intensity=None)


def take(ds, k):
    """The first k batches, reading more passes (epochs) when one ends, as Trainer does."""
    out = []
    while len(out) < k:
        before = len(out)
        for xb, yb in ds:
            out.append((xb.numpy(), yb.numpy()))
            if len(out) == k:
                break
        assert len(out) > before, "a pass yielded no batch"
    return out


KINDS = ["memory", "hdf5", "nifti"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("repeat, drop_remainder", [(True, False), (False, True), (False, False)])
def test_starting_at_continues_as_an_uninterrupted_run(files, kind, repeat, drop_remainder):
    whole = take(build(kind, files, repeat=repeat, drop_remainder=drop_remainder), 16)
    for start in (3, 7, 11):  # inside the first, second and a later epoch
        later = take(starting_at(build(kind, files, repeat=repeat, drop_remainder=drop_remainder), start),
                     16 - start)
        assert len(later) == 16 - start
        for (xa, ya), (xb, yb) in zip(whole[start:], later):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)


def test_starting_at_decodes_no_skipped_sample(files):
    aug = Counting()
    ds = starting_at(build("memory", files, augment=aug), 40)  # 160 samples: 7 epochs and a bit
    take(ds, 1)
    assert len(aug.seen) <= B + 16, "skipped samples were produced"  # the batch (+ prefetch of a few)
    reference = take(build("memory", files, augment=Counting()), 41)[40]
    np.testing.assert_array_equal(take(starting_at(build("memory", files), 40), 1)[0][1], reference[1])


def test_starting_at_on_other_datasets_is_skip():
    ds = tf.data.Dataset.range(10).batch(2)
    assert [b.numpy().tolist() for b in starting_at(ds, 3)] == [[6, 7], [8, 9]]
    with pytest.raises(ValueError, match="batch must be an int >= 0"):
        starting_at(ds, -1)


def shares_side_by_side(kind, files, count, replicas, steps, **kw):
    """Global batches assembled from ``count`` input pipelines of ``replicas`` replicas each,
    in replica order, as tf.distribute deals them."""
    streams = [take(input_share(build(kind, files, **kw), Share(w, count, replicas)), steps * replicas)
               for w in range(count)]
    out = []
    for k in range(steps):
        parts = [streams[w][k * replicas + r] for w in range(count) for r in range(replicas)]
        out.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    return out, streams


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("count, replicas", [(1, 2), (2, 1), (2, 2)])
def test_shares_side_by_side_are_the_one_process_batches(files, kind, count, replicas):
    if kind == "hdf5" and count > 1:
        pytest.skip("hdf5 over several workers reads disjoint blocks instead: see the next test")
    steps = 12  # two epochs and more
    whole = take(build(kind, files, augment=Augment3D(flip_axes="HW") if kind != "hdf5" else None), steps)
    split, _ = shares_side_by_side(kind, files, count, replicas, steps,
                                   augment=Augment3D(flip_axes="HW") if kind != "hdf5" else None)
    for (xa, ya), (xb, yb) in zip(whole, split):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def test_hdf5_workers_read_disjoint_blocks_and_cover_every_sample(files):
    count, steps = 2, 8  # 16 samples per worker: more than its share of one epoch (at most 4 blocks of 3)
    split, streams = shares_side_by_side("hdf5", files, count, 1, steps)
    assert all(len(y) == B for _, y in split)
    epoch0 = []
    for stream in streams:
        seen = np.concatenate([y for _, y in stream]).tolist()
        first_repeat = next(i for i, s in enumerate(seen) if s in seen[:i])
        epoch0.append(seen[:first_repeat])  # each sample comes once per epoch
    # the workers' epoch-0 blocks (3 samples each, chunk-aligned) are disjoint and cover the file
    blocks = [{s // 3 for s in part} for part in epoch0]
    assert not blocks[0] & blocks[1]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(N))
    for part in epoch0:  # whole blocks
        assert sorted(part) == sorted(s for b in {s // 3 for s in part} for s in range(3 * b, min(3 * b + 3, N)))


@pytest.mark.parametrize("kind", ["memory", "nifti"])
def test_each_input_pipeline_decodes_exactly_its_share(files, kind):
    steps, count = 6, 2
    whole = take(build(kind, files), steps)
    for w in range(count):
        aug = Counting()
        share = take(input_share(build(kind, files, augment=aug), Share(w, count, 1)), steps)
        expected = np.concatenate([y[w * B // count:(w + 1) * B // count] for _, y in whole])
        np.testing.assert_array_equal(np.concatenate([y for _, y in share]), expected)
        # it augmented (decoded) its share, and at most what prefetching reads ahead of it more
        counts = {s: aug.seen.count(s) for s in set(aug.seen)}
        assert all(counts.get(s, 0) >= expected.tolist().count(s) for s in set(expected.tolist()))
        assert len(expected) <= len(aug.seen) < len(expected) + 3 * B


def test_what_cannot_be_split_says_why(files):
    x, h5, _ = files
    assert "not a wrn3d_tl.data pipeline" in share_problem(tf.data.Dataset.range(3), Share(0, 1, 2))
    assert "does not divide evenly over 3" in share_problem(build("memory", files), Share(0, 1, 3))
    assert "last batch of each epoch is partial" in share_problem(build("memory", files, repeat=False),
                                                                  Share(0, 1, 2))
    assert share_problem(build("memory", files, repeat=False, drop_remainder=True), Share(0, 2, 1)) is None
    assert "repeat=True" in share_problem(build("hdf5", files, repeat=False, drop_remainder=True), Share(0, 2, 1))
    assert share_problem(build("hdf5", files, repeat=False, drop_remainder=True), Share(0, 1, 2)) is None
    with pytest.raises(ValueError, match="input_share: cannot split this dataset over 3 replicas"):
        input_share(build("memory", files), Share(0, 1, 3))
