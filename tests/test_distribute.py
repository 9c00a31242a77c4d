"""tf.distribute: MirroredStrategy on two logical CPUs, MultiWorkerMirroredStrategy with
two worker processes on 127.0.0.1, a killed worker, checkpoints across strategies."""

import csv
import json
from collections import Counter
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf

from wrn3d_tl.checkpoint import read_checkpoint
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.checkpoint import CheckpointManager
from wrn3d_tl.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cifar_wide_resnet_tl.py")
TINY = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--volume-depth", "2", "--batch-size", "8",
        "--eval-samples", "16"]


def pair(strategy, cfg, seed=0):
    tf.random.set_seed(seed)
    single = build_wrn(cfg)
    with strategy.scope():
        mirrored = build_wrn(cfg)
    for a, b in zip(single.all_weights, mirrored.all_weights):
        b.assign(a)
    return (Trainer(single, lr=0.1, verbose=False),
            Trainer(mirrored, lr=0.1, strategy=strategy, verbose=False))


def batches(n, cfg, size=8):
    rng = np.random.default_rng(5)
    return [(rng.normal(size=(size,) + cfg.input_shape).astype("float32"), rng.integers(0, 10, size))
            for _ in range(n)]


def test_mirrored_with_sync_bn_matches_single_device(two_cpu_strategy):
    """Every step of MirroredStrategy with sync BN equals the single-device step from the same
    state. Each step starts from the single trainer's weights and momentum: the two differ by
    float32 round-off (~1e-7, other reduction orders), and carried over several steps such a
    difference can flip a ReLU input that sits at ~1e-7 from zero, which then changes a kernel
    by ~1e-3 (seen on an AMD EPYC at the third step of these batches), a property of ReLU
    networks, not of the replication."""
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(4, 8, 8, 3), sync_bn=True)
    single, mirrored = pair(two_cpu_strategy, cfg)
    for x, y in batches(3, cfg):
        for src, dst in zip(single.model.all_weights + single.optimizer.slots,
                            mirrored.model.all_weights + mirrored.optimizer.slots):
            dst.assign(src)
        a, b = single.train_step(x, y), mirrored.train_step(x, y)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["accuracy"] == b["accuracy"]
        for v1, v2 in zip(single.model.all_weights, mirrored.model.all_weights):
            np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-5, err_msg=v1.name)


def test_without_sync_bn_each_replica_normalises_its_own_half(two_cpu_strategy):
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(4, 8, 8, 3))
    single, mirrored = pair(two_cpu_strategy, cfg)
    (x, y), = batches(1, cfg)
    x[4:] += 3.0  # the two halves differ, so per-replica statistics differ from the global ones
    # Two more single-device trainers from the same weights, one per replica's half.
    halves = []
    for _ in range(2):
        t = Trainer(build_wrn(cfg), lr=0.1, verbose=False)
        for a, b in zip(single.model.all_weights, t.model.all_weights):
            b.assign(a)
        halves.append(t)
    a, b = single.train_step(x, y), mirrored.train_step(x, y)
    assert abs(a["loss"] - b["loss"]) > 1e-4  # not the global-batch computation
    h = [t.train_step(x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]) for i, t in enumerate(halves)]
    # Replica i normalised with the statistics of x[4i:4i+4] alone: its loss and accuracy are
    # those of a single device given only that half, and the global batch averages them.
    assert b["loss"] == pytest.approx((h[0]["loss"] + h[1]["loss"]) / 2, rel=1e-5)
    assert b["accuracy"] == pytest.approx((h[0]["accuracy"] + h[1]["accuracy"]) / 2, abs=1e-7)
    # The gradients are averaged over the replicas, so (first SGD step from zero momentum,
    # affine in the gradient) the mirrored weights are the mean of the two single-device
    # updates; the BN moving statistics likewise average the two halves' statistics.
    for v, v0, v1 in zip(mirrored.model.all_weights, halves[0].model.all_weights, halves[1].model.all_weights):
        np.testing.assert_allclose(v.numpy(), (v0.numpy() + v1.numpy()) / 2, atol=1e-5, err_msg=v.name)
    moved = [v for v, w in zip(mirrored.model.all_weights, single.model.all_weights)
             if not np.allclose(v.numpy(), w.numpy(), atol=1e-5)]
    assert moved  # and they differ from the global-batch step


def test_global_batch_must_divide_over_replicas(two_cpu_strategy):
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(4, 8, 8, 3))
    _, mirrored = pair(two_cpu_strategy, cfg)
    (x, y), = batches(1, cfg, size=7)
    with pytest.raises(ValueError, match="global batch of 7 does not divide evenly over 2 replicas"):
        mirrored.train_step(x, y)
    assert mirrored.step == 0


def test_checkpoints_move_between_strategy_and_single_process(two_cpu_strategy, tmp_path):
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(4, 8, 8, 3))
    single, mirrored = pair(two_cpu_strategy, cfg)
    data = batches(3, cfg)
    for x, y in data[:2]:
        mirrored.train_step(x, y)
    path = mirrored.save(tmp_path / "mirrored.h5")
    alone = Trainer.restore(path, verbose=False)
    back = Trainer.restore(alone.save(tmp_path / "single.h5"), strategy=two_cpu_strategy, verbose=False)
    for t in (alone, back):
        assert t.step == 2
        for v1, v2 in zip(mirrored.model.all_weights, t.model.all_weights):
            np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=0, err_msg=v1.name)
    x, y = data[2]
    assert back.train_step(x, y)["loss"] == pytest.approx(mirrored.train_step(x, y)["loss"], rel=1e-6)


# ------------------------------------------------------------- two processes

def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def env_for(index, ports):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                   "task": {"type": "worker", "index": index}})
    return env


def start_workers(tmp_path, args, tag):
    ports = free_ports(2)
    procs = []
    for i in range(2):
        log = open(tmp_path / f"{tag}-w{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, EXAMPLE, *TINY, "--distribute", "multiworker", *args],
                                      env=env_for(i, ports), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
    return procs


def finish(procs, timeout):
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_two_workers_match_mirrored_over_two_cpus(tmp_path):
    mw = tmp_path / "mw"
    procs = start_workers(tmp_path, ["--iters", "3", "--checkpoint", str(mw / "last.h5"), "--logdir",
                                     str(mw / "logs")], "match")
    codes = finish(procs, timeout=240)
    logs = [open(tmp_path / f"match-w{i}.log").read() for i in range(2)]
    assert codes == [0, 0], logs
    single_env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, EXAMPLE, *TINY, "--iters", "3", "--distribute", "mirrored", "--cpu-replicas", "2",
                    "--checkpoint", str(tmp_path / "mirrored.h5")], env=single_env, check=True, timeout=240,
                   capture_output=True)
    a, b = read_checkpoint(mw / "last.h5"), read_checkpoint(tmp_path / "mirrored.h5")
    assert a["step"] == b["step"] == 3 and a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        np.testing.assert_allclose(a["weights"][k], b["weights"][k], atol=1e-5, err_msg=k)
    # only the chief wrote: one CSV row per step, not one per worker
    rows = list(csv.DictReader(open(mw / "logs" / "metrics.csv")))
    assert [(r["step"], r["split"]) for r in rows] == [("1", "train"), ("2", "train"), ("3", "train"), ("3", "eval")]
    assert "checkpoint:" in logs[0] and "checkpoint:" not in logs[1]


@pytest.mark.slow
def test_killed_worker_fails_the_other_fast_and_resume_completes(tmp_path):
    ckdir = tmp_path / "ck"
    args = ["--checkpoint", str(ckdir / "last.h5"), "--checkpoint-every", "1"]
    procs = start_workers(tmp_path, ["--iters", "100000", *args], "kill")
    try:
        deadline = time.monotonic() + 180
        while CheckpointManager(str(ckdir)).latest() is None:
            assert time.monotonic() < deadline, open(tmp_path / "kill-w0.log").read()
            assert procs[0].poll() is None, open(tmp_path / "kill-w0.log").read()
            time.sleep(0.5)
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    log = open(tmp_path / "kill-w0.log").read()
    assert code != 0 and waited < 60
    assert "lost contact with another worker" in log and "--resume" in log
    step = read_checkpoint(CheckpointManager(str(ckdir)).latest())["step"]
    procs = start_workers(tmp_path, ["--iters", str(step + 2), "--resume", *args], "resume")
    codes = finish(procs, timeout=240)
    logs = [open(tmp_path / f"resume-w{i}.log").read() for i in range(2)]
    assert codes == [0, 0], logs
    for text in logs:
        assert f"at step {step}" in text and f"iter {step + 2:>5}/{step + 2}" in text


# ------------------------------------------------- split input, distributed evaluate

from wrn3d_tl.data import hdf5_dataset, make_dataset, write_hdf5_volumes  # noqa: E402
from wrn3d_tl.data.shards import Share, input_share  # noqa: E402

from _counting import Counting  # noqa: E402

SPLIT_CFG = WRNConfig(depth=10, widen_factor=1, input_shape=(2, 6, 6, 1), num_classes=4, sync_bn=True)
SPLIT_N, SPLIT_B = 20, 8


def split_data(seed=0):
    """Volumes whose voxel (0, 0, 0) is the sample's index (what Counting reads)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(SPLIT_N,) + SPLIT_CFG.input_shape).astype("float32")
    x[:, 0, 0, 0, 0] = np.arange(SPLIT_N)
    return x, np.arange(SPLIT_N) % 4


def flip_w(sample, seed):
    return tf.where(tf.random.stateless_uniform([], seed) < 0.5, tf.reverse(sample, [2]), sample)


def memory_pipeline(augment=None):
    x, y = split_data()
    return make_dataset(x, y, batch_size=SPLIT_B, volume_depth=None, training=True, repeat=True, seed=7,
                        augment=augment or Counting(then=flip_w))


def hdf5_pipeline(path):
    return hdf5_dataset(path, batch_size=SPLIT_B, training=True, augment=False, repeat=True, seed=7,
                        normalization=None, block_size=3, shuffle_buffer=6)


def global_batches(streams, steps):
    """Global batch k = the k-th batches of the input pipelines, side by side (one replica each)."""
    return [(np.concatenate([s[k][0] for s in streams]), np.concatenate([s[k][1] for s in streams]))
            for k in range(steps)]


def first_batches(ds, k):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(k)]


def single_trained_on(batches_, seed=0):
    tf.random.set_seed(seed)
    t = Trainer(build_wrn(SPLIT_CFG), lr=0.1, verbose=False)
    for x, y in batches_:
        t.train_step(x, y)
    return t


@pytest.mark.parametrize("kind", ["memory", "hdf5"])
def test_split_train_data_under_mirrored_trains_as_one_process(two_cpu_strategy, tmp_path, kind):
    path = str(tmp_path / "v.h5")
    write_hdf5_volumes(path, *split_data(), chunks=(3,) + SPLIT_CFG.input_shape)
    make = memory_pipeline if kind == "memory" else (lambda: hdf5_pipeline(path))
    tf.random.set_seed(0)
    with two_cpu_strategy.scope():
        model = build_wrn(SPLIT_CFG)
    mirrored = Trainer(model, make(), lr=0.1, strategy=two_cpu_strategy, verbose=False)
    for _ in range(3):
        mirrored.train_step()
    assert mirrored.input_is_split  # the input was split, not read whole
    single = single_trained_on(first_batches(make(), 3))
    for v1, v2 in zip(single.model.all_weights, mirrored.model.all_weights):
        np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-5, err_msg=v1.name)


def test_distributed_evaluate_equals_single_device(two_cpu_strategy):
    x, y = split_data(1)
    single = single_trained_on(first_batches(memory_pipeline(), 2))
    with two_cpu_strategy.scope():
        model = build_wrn(SPLIT_CFG)
    for a, b in zip(single.model.all_weights, model.all_weights):
        b.assign(a)
    mirrored = Trainer(model, lr=0.1, strategy=two_cpu_strategy, verbose=False)
    # batches of 8, 8, 3 and (second call) 1: a partial batch over two replicas gives them 2 + 1, and 1 + 0
    for data, batch in (((x[:19], y[:19]), 8), ((x[:9], y[:9]), 8)):
        a, b = single.evaluate(data, batch_size=batch), mirrored.evaluate(data, batch_size=batch)
        assert a["samples"] == b["samples"] == len(data[0])
        for key in ("loss", "accuracy", "top5_accuracy", "auc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, nan_ok=True), key
        np.testing.assert_array_equal(a["confusion_matrix"], b["confusion_matrix"])
        np.testing.assert_allclose(a["auc_per_class"], b["auc_per_class"], rtol=1e-5)


def test_distributed_evaluate_uses_the_replicas_mean_statistics_without_sync_bn(two_cpu_strategy, tmp_path):
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=SPLIT_CFG.input_shape, num_classes=4)  # no sync BN
    tf.random.set_seed(0)
    with two_cpu_strategy.scope():
        model = build_wrn(cfg)
    x, y = split_data()
    x[np.arange(SPLIT_N) % 8 >= 4] += 2.0  # replica 1's halves differ: the replicas' moving statistics part
    ds = make_dataset(x, y, batch_size=SPLIT_B, volume_depth=None, training=False, repeat=True)
    mirrored = Trainer(model, ds, lr=0.1, strategy=two_cpu_strategy, verbose=False)
    for _ in range(2):
        mirrored.train_step()
    local = [two_cpu_strategy.experimental_local_results(v) for v in mirrored._stats]
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in local)
    single = Trainer.restore(mirrored.save(tmp_path / "m.h5"), verbose=False)  # the cross-replica mean
    xe, ye = split_data(1)
    a, b = single.evaluate((xe[:19], ye[:19]), batch_size=8), mirrored.evaluate((xe[:19], ye[:19]), batch_size=8)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]


def test_a_model_built_outside_the_scope_or_an_indivisible_batch_is_refused(two_cpu_strategy):
    with pytest.raises(ValueError, match=r"build the model inside strategy.scope\(\)"):
        Trainer(build_wrn(SPLIT_CFG), lr=0.1, strategy=two_cpu_strategy, verbose=False)
    x, y = split_data()
    with two_cpu_strategy.scope():
        model = build_wrn(SPLIT_CFG)
    ds = make_dataset(x, y, batch_size=7, volume_depth=None, training=False, repeat=True)
    t = Trainer(model, ds, lr=0.1, strategy=two_cpu_strategy, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not read whole with a warning
        with pytest.raises(ValueError, match="global batch of 7 does not divide evenly over 2 replicas"):
            t.train_step()
    assert t.step == 0


@pytest.mark.parametrize("fault, pattern", [("nan", r"train_step: x contains NaN or Inf"),
                                            ("label", r"train_step: labels must be in \[0, 4\), got values from 0 to 6")])
def test_bad_input_in_one_share_is_refused_and_changes_nothing(two_cpu_strategy, fault, pattern):
    x, y = split_data()
    position = np.arange(SPLIT_N) % 8  # where a sample lands in its global batch: 0-3 replica 0, 4-7 replica 1
    if fault == "nan":
        x[position == 6, 1, 2, 3, 0] = np.nan
    else:  # the smallest label only in replica 0's share, the bad one only in replica 1's: the message combines them
        y = np.where(position < 4, np.where(position == 1, 0, 2), np.where(position == 6, 6, 3))
    ds = make_dataset(x, y, batch_size=SPLIT_B, volume_depth=None, training=False, repeat=True)
    with two_cpu_strategy.scope():
        model = build_wrn(SPLIT_CFG)
    t = Trainer(model, ds, lr=0.1, strategy=two_cpu_strategy, verbose=False)
    before = [v.numpy().copy() for v in list(model.all_weights) + t.optimizer.slots]
    with pytest.raises(ValueError, match=pattern):
        t.train_step()
    assert t.step == 0 and t.input_is_split
    for v, old in zip(list(model.all_weights) + t.optimizer.slots, before):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.name)


def test_epochs_of_a_finite_split_pipeline_follow_each_other(two_cpu_strategy):
    x, y = split_data()
    make = lambda: make_dataset(x, y, batch_size=SPLIT_B, volume_depth=None, training=True, seed=3,  # noqa: E731
                                drop_remainder=True)  # 20 samples: 2 batches per epoch, 4 left out
    with two_cpu_strategy.scope():
        model = build_wrn(SPLIT_CFG)
    tf.random.set_seed(0)
    single = Trainer(build_wrn(SPLIT_CFG), make(), lr=0.1, verbose=False)
    for a, b in zip(single.model.all_weights, model.all_weights):
        b.assign(a)
    mirrored = Trainer(model, make(), lr=0.1, strategy=two_cpu_strategy, verbose=False)
    for _ in range(5):  # two epochs and a half: the iterator restarts twice
        single.train_step()
        mirrored.train_step()
    assert mirrored.input_is_split
    for v1, v2 in zip(single.model.all_weights, mirrored.model.all_weights):
        np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-5, err_msg=v1.name)


def test_data_that_cannot_be_split_is_read_whole_with_a_warning(two_cpu_strategy):
    x, y = split_data()
    plain = tf.data.Dataset.from_tensor_slices((x, y)).batch(SPLIT_B, drop_remainder=True).repeat()
    with two_cpu_strategy.scope():
        model = build_wrn(SPLIT_CFG)
    t = Trainer(model, plain, lr=0.1, strategy=two_cpu_strategy, verbose=False)
    with pytest.warns(UserWarning, match="read whole by every worker.*not a wrn3d_tl.data pipeline"):
        t.train_step()
    t.train_step()  # warned once per train_data
    assert t.step == 2 and not t.input_is_split


WORKER = r'''
import json, sys
import numpy as np
from wrn3d_tl.distribute import make_strategy
strategy = make_strategy("multiworker")
import tensorflow as tf
sys.path.insert(0, sys.argv[2])
import test_distribute as T
from wrn3d_tl.model import build_wrn
from wrn3d_tl.train import Trainer

out, index = {}, strategy.cluster_resolver.task_id
for kind in ("memory", "hdf5"):
    counter = T.Counting(then=T.flip_w)
    data = T.memory_pipeline(counter) if kind == "memory" else T.hdf5_pipeline(sys.argv[3])
    tf.random.set_seed(0)
    with strategy.scope():
        model = build_wrn(T.SPLIT_CFG)
    trainer = Trainer(model, data, lr=0.1, strategy=strategy, verbose=False)
    for _ in range(3):
        trainer.train_step()
    out[kind] = {"split": trainer.input_is_split, "seen": counter.seen,
                 "weights": {v.name: v.numpy().tolist() for v in model.all_weights}}
    if kind == "memory":
        x, y = T.split_data(1)
        result = trainer.evaluate((x[:19], y[:19]), batch_size=8)
        out["evaluate"] = {k: result[k] for k in ("loss", "accuracy", "samples")}
        out["evaluate"]["confusion_matrix"] = np.asarray(result["confusion_matrix"]).tolist()
with open(sys.argv[1] + f"/worker{index}.json", "w") as fh:
    json.dump(out, fh)
import os
os._exit(0)  # a process whose tf.data iterators still run a numpy_function can hang in its exit clean-up
'''


@pytest.mark.slow
def test_two_loopback_workers_read_their_shares_and_train_as_one_process(tmp_path):
    path = str(tmp_path / "v.h5")
    write_hdf5_volumes(path, *split_data(), chunks=(3,) + SPLIT_CFG.input_shape)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = free_ports(2)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), os.path.dirname(__file__), path],
                              env=env_for(i, ports), stdout=open(tmp_path / f"w{i}.log", "w"),
                              stderr=subprocess.STDOUT) for i in range(2)]
    codes = finish(procs, timeout=240)
    assert codes == [0, 0], [open(tmp_path / f"w{i}.log").read()[-3000:] for i in range(2)]
    w = [json.load(open(tmp_path / f"worker{i}.json")) for i in range(2)]

    # make_dataset: the one-process global batches; each worker decoded exactly its half of each
    whole = first_batches(memory_pipeline(), 3)
    order = first_batches(memory_pipeline(Counting()), 40)  # the same samples, voxel 0 = index
    for i in range(2):
        assert w[i]["memory"]["split"]
        counted = Counter(w[i]["memory"]["seen"])
        k = -(-sum(counted.values()) // 4) + 2  # the global batches it decoded for, prefetch included

        def share(batches):
            return Counter(np.concatenate([b[0][i * 4:(i + 1) * 4, 0, 0, 0, 0] for b in order[:batches]])
                           .round().astype(int).tolist())
        # all of its half of the 3 trained batches, and nothing but its half of any batch (read ahead)
        assert not share(3) - counted and not counted - share(k), (counted, share(k))
    single = single_trained_on(whole)
    # hdf5: workers read disjoint blocks; the global batches are their local batches side by side
    streams = [first_batches(input_share(hdf5_pipeline(path), Share(i, 2, 1)), 3) for i in range(2)]
    single_h5 = single_trained_on(global_batches(streams, 3))
    for kind, reference in (("memory", single), ("hdf5", single_h5)):
        for i in range(2):
            for v in reference.model.all_weights:
                np.testing.assert_allclose(np.asarray(w[i][kind]["weights"][v.name]), v.numpy(), atol=1e-5,
                                           err_msg=f"{kind}, worker {i}: {v.name}")
    # distributed evaluate (batches 8, 8, 3 over two workers) = single-device evaluate
    x, y = split_data(1)
    ref = single.evaluate((x[:19], y[:19]), batch_size=8)
    for i in range(2):
        got = w[i]["evaluate"]
        assert got["samples"] == 19 and got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-7)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["confusion_matrix"] == np.asarray(ref["confusion_matrix"]).tolist()
