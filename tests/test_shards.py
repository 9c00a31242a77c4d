"""wrn3d_tl.data.shards: pipelines positioned at a later batch (resume) and split into one
input pipeline's share of every global batch (tf.distribute), for make_dataset,
hdf5_dataset and nifti_dataset. Samples carry their index as label, so every check is on
which samples came, in which order, with which augmentation."""


import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.data import Augment3D, hdf5_dataset, make_dataset, nifti_dataset, write_hdf5_volumes
from wrn3d_tl.data.shards import Share, input_share, share_problem, starting_at

from _counting import Counting

N, B = 22, 4
SHAPE = (2, 6, 6, 1)


def counting():
    return Counting(then=Augment3D(flip_axes="HW", scale=0.1))


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


def build(kind, files, *, repeat=True, drop_remainder=False, augment=None, shuffle=True, block_size=3):
    x, h5, table = files
    if kind == "memory":
        return make_dataset(x, np.arange(N), batch_size=B, volume_depth=None, training=shuffle,
                            augment=augment or False, seed=3, repeat=repeat, drop_remainder=drop_remainder)
    if kind == "hdf5":
        return hdf5_dataset(h5, batch_size=B, training=shuffle, augment=augment or False, seed=3, repeat=repeat,
                            drop_remainder=drop_remainder, normalization=None, block_size=block_size,
                            shuffle_buffer=6)
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
    aug = counting()
    # 5 batches per epoch: batch 52 is the third of epoch 10; the pass ends after 3 batches
    rest = take(starting_at(build("memory", files, augment=aug, repeat=False, drop_remainder=True), 52), 3)
    assert len(aug.seen) == 3 * B  # nothing of the 52 batches before, nothing after the pass
    assert sorted(aug.seen) == sorted(np.concatenate([y for _, y in rest]).tolist())


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


@pytest.mark.parametrize("shuffle", [False, True])
def test_hdf5_workers_read_disjoint_blocks(files, shuffle):
    count, steps = 2, 11  # 44 samples: every sample twice
    split, streams = shares_side_by_side("hdf5", files, count, 1, steps, shuffle=shuffle)
    assert all(len(y) == B for _, y in split)
    seen = [np.concatenate([y for _, y in s]).tolist() for s in streams]
    if not shuffle:  # the file's 8 blocks of 3 (the last of 1) in order: worker w reads blocks w, w + 2, ...
        for w in range(count):
            mine = [i for b in range(w, 8, 2) for i in range(3 * b, min(3 * b + 3, N))]
            assert seen[w] == (mine * 4)[:len(seen[w])]
    else:  # a worker's first 4 samples come from its first shuffle window (2 blocks): not the other's
        firsts = [{i // 3 for i in seen[w][:4]} for w in range(count)]
        assert all(len(f) <= 2 for f in firsts) and not firsts[0] & firsts[1]


def test_hdf5_over_more_workers_than_blocks_is_refused(files):
    ds = build("hdf5", files, block_size=N)  # one block
    assert "1 block(s) of the file cannot give each of 2 workers one" in share_problem(ds, Share(0, 2, 1))
    assert share_problem(ds, Share(0, 1, 2)) is None  # one worker, two replicas: fine


@pytest.mark.parametrize("kind", KINDS)
def test_a_positioned_share_continues_the_share(files, kind):
    count, start, more = 2, 5, 6
    for w in range(count):
        share = Share(w, count, 1)
        whole = take(input_share(build(kind, files), share), start + more)
        later = take(input_share(starting_at(build(kind, files), start), share), more)
        again = take(starting_at(input_share(build(kind, files), share), start), more)
        for (xa, ya), (xb, yb), (xc, yc) in zip(whole[start:], later, again):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(ya, yc)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(xa, xc)


@pytest.mark.parametrize("kind", ["memory", "nifti"])
def test_each_input_pipeline_decodes_exactly_its_share(files, kind):
    # one finite epoch read to its end, so that no read-ahead blurs the count
    whole = take(build(kind, files, repeat=False, drop_remainder=True), N // B)
    for w in range(2):
        aug = counting()
        share = take(input_share(build(kind, files, augment=aug, repeat=False, drop_remainder=True), Share(w, 2, 1)),
                     N // B)
        expected = np.concatenate([y[w * B // 2:(w + 1) * B // 2] for _, y in whole])
        np.testing.assert_array_equal(np.concatenate([y for _, y in share]), expected)
        assert sorted(aug.seen) == sorted(expected.tolist())  # its 10 samples, decoded once each


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
