"""tf.distribute: MirroredStrategy on two logical CPUs, MultiWorkerMirroredStrategy with
two worker processes on 127.0.0.1, a killed worker, checkpoints across strategies."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

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
    cfg = WRNConfig(depth=10, widen_factor=1, input_shape=(4, 8, 8, 3), sync_bn=True)
    single, mirrored = pair(two_cpu_strategy, cfg)
    for x, y in batches(3, cfg):
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
