"""The main job (examples/cifar_wide_resnet_tl.py): iteration lines, evaluation, the
synthetic fallback line, checkpoints and --resume, the outside-controller pattern."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "10", "--width", "1", "--volume-depth", "2", "--batch-size", "8", "--eval-samples", "20"]


def iteration_lines(text):
    return [line for line in text.splitlines() if line.startswith("iter ")]


def test_main_job_falls_back_loudly_trains_evaluates_and_resumes_as_if_uninterrupted(cifar_script, tmp_path, capsys,
                                                                                    monkeypatch):
    import numpy as np

    from wrn3d_tl.train import Trainer

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.keras/datasets here
    monkeypatch.delenv("WRN3D_DATA_DIR", raising=False)
    evaluations = []  # (trainer, data, result) of every Trainer.evaluate call
    real_evaluate = Trainer.evaluate

    def recording_evaluate(self, data=None, *args, **kwargs):
        result = real_evaluate(self, data, *args, **kwargs)
        evaluations.append((self, self.eval_data if data is None else data, result))
        return result

    monkeypatch.setattr(Trainer, "evaluate", recording_evaluate)
    ckpt = tmp_path / "run" / "last.h5"
    result = cifar_script.main([*TINY, "--iters", "3", "--schedule", "constant", "--checkpoint", str(ckpt),
                           "--logdir", str(tmp_path / "logs"), "--plot", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    loud = [line for line in out.splitlines() if "SYNTHETIC" in line]
    assert len(loud) == 1 and loud[0].startswith("!!!")
    lines = iteration_lines(out)
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(" loss " in line and " acc " in line and " lr " in line and "vol/s" in line for line in lines)
    assert "test  loss" in out and "(20 samples)" in out and out.rstrip().splitlines()[-1].startswith("summary: 3")
    # The reported evaluation is the trained model's, in inference mode, on the 20 held-out
    # samples: recompute it from the logits.
    trainer, data, final = evaluations[-1]
    assert final is result and result["samples"] == 20 and trainer.step == 3
    xs, ys = zip(*[(bx.numpy(), by.numpy()) for bx, by in data])
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert len(y) == 20
    logits = trainer.model(x, is_train=False).numpy().astype("float64")
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y), abs=1e-9)
    assert result["loss"] == pytest.approx(-log_p[np.arange(20), y].mean(), rel=1e-4)
    top5 = np.argsort(-logits, 1)[:, :5]
    assert result["top5_accuracy"] == pytest.approx(np.mean([t in row for t, row in zip(y, top5)]), abs=1e-9)
    assert f"test  loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}" in out
    assert ckpt.exists() and (tmp_path / "curves.png").exists()

    cifar_script.main([*TINY, "--iters", "5", "--schedule", "constant", "--checkpoint", str(ckpt), "--resume"])
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at step 3" in out
    assert [line.split()[1] for line in iteration_lines(out)] == ["4/5", "5/5"]
    from wrn3d_tl.checkpoint import read_checkpoint

    resumed = read_checkpoint(ckpt)
    assert resumed["trainer"]["total_steps"] == 5   # the constant schedule was extended
    # the resumed run saw the same batches as an uninterrupted one: the same weights after 5 steps
    straight = tmp_path / "straight.h5"
    cifar_script.main([*TINY, "--iters", "5", "--schedule", "constant", "--checkpoint", str(straight)])
    capsys.readouterr()
    straight = read_checkpoint(straight)
    assert straight["step"] == resumed["step"] == 5
    for k in straight["weights"]:
        assert abs(straight["weights"][k] - resumed["weights"][k]).max() < 1e-5, k


def test_outside_code_steps_the_trainer(cifar_script):
    trainer = cifar_script.make_trainer(dataset="synthetic", depth=10, width=1, volume_depth=2, batch_size=8,
                                   synthetic_train=64, synthetic_test=16)
    steps = [trainer.train_step() for _ in range(3)]
    trainer.learning_rate = 0.01
    assert trainer.train_step()["lr"] == 0.01
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert trainer.evaluate(trainer.eval_data)["samples"] == 16
    with pytest.raises(TypeError, match="unknown options"):
        cifar_script.make_trainer(colour="red")


def test_batch_size_auto_fits_the_budget(cifar_script, capsys):
    from wrn3d_tl.memory import estimate_memory

    trainer = cifar_script.make_trainer(dataset="synthetic", depth=10, width=1, volume_depth=2, batch_size="auto",
                                   memory_budget=0.5, synthetic_train=64, synthetic_test=16)
    b = trainer.batch_size
    assert "--batch-size auto: " in capsys.readouterr().out
    budget = 0.5 * 2 ** 30
    assert estimate_memory(trainer.config, b)["total"] <= budget < estimate_memory(trainer.config, b + 1)["total"]
    assert trainer.train_step()["step"] == 1


def test_wrn3d_train_on_hdf5_volumes(tmp_path, capsys):
    import numpy as np

    from wrn3d_tl.checkpoint import read_checkpoint
    from wrn3d_tl.commands import train
    from wrn3d_tl.data import write_hdf5_volumes
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 24)
    volumes = (rng.normal(size=(24, 4, 12, 12, 2)) * 10 + 50 + labels[:, None, None, None, None] * 20)
    write_hdf5_volumes(tmp_path / "train.h5", volumes.astype("float32"), labels, normalization="compute",
                       num_classes=3)
    write_hdf5_volumes(tmp_path / "val.h5", volumes[:8].astype("float32"), labels[:8], num_classes=3)
    run = tmp_path / "run"
    assert train.main(["--data", str(tmp_path / "train.h5"), "--val", str(tmp_path / "val.h5"), "--depth", "10",
                       "--width", "1", "--batch-size", "8", "--iters", "4", "--eval-every", "0", "--keep-depth",
                       "--no-report", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "24 volumes of (4, 12, 12, 2) float32" in out and "3 classes, normalisation from the file" in out
    assert "val   step 4" in out
    assert json.loads((run / "metrics.json").read_text())["val"]["samples"] == 8
    ck = read_checkpoint(run / "last.h5")
    assert ck["step"] == 4 and ck["config"]["input_shape"] == [4, 12, 12, 2]
    assert ck["config"]["group_strides"] == [[1, 1, 1], [1, 2, 2], [1, 2, 2]]
    np.testing.assert_allclose(ck["normalization"]["mean"], volumes.reshape(-1, 2).mean(0), rtol=1e-4)


def _damage(path):
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_wrn3d_train_resumes_from_the_newest_verified_checkpoint(tmp_path, capsys):
    import numpy as np

    from wrn3d_tl.checkpoint import read_checkpoint
    from wrn3d_tl.commands import train
    from wrn3d_tl.data import write_hdf5_volumes
    rng = np.random.default_rng(1)
    write_hdf5_volumes(tmp_path / "train.h5", rng.normal(size=(16, 4, 8, 8, 1)).astype("float32"),
                       rng.integers(0, 2, 16), num_classes=2)
    run = tmp_path / "run"
    common = ["--data", str(tmp_path / "train.h5"), "--depth", "10", "--width", "1", "--batch-size", "4",
              "--schedule", "constant", "--no-report", "--out", str(run)]
    assert train.main([*common, "--iters", "3", "--checkpoint-every", "1"]) == 0
    assert sorted(f for f in os.listdir(run) if f.startswith("ckpt-")) == [
        "ckpt-00000001.h5", "ckpt-00000002.h5", "ckpt-00000003.h5"]
    _damage(run / "last.h5")
    _damage(run / "ckpt-00000003.h5")
    capsys.readouterr()
    assert train.main([*common, "--iters", "4", "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"resumed from {run / 'ckpt-00000002.h5'} at step 2" in captured.out
    assert captured.err.count("skipping damaged checkpoint") == 2
    assert read_checkpoint(run / "last.h5")["step"] == 4
    # the same run uninterrupted reaches the same weights (the stream skips the used batches)
    assert train.main([*common[:-1], str(tmp_path / "straight"), "--iters", "4"]) == 0
    a, b = read_checkpoint(run / "last.h5"), read_checkpoint(tmp_path / "straight" / "last.h5")
    for k in a["weights"]:
        np.testing.assert_allclose(a["weights"][k], b["weights"][k], atol=1e-5, err_msg=k)
    # a checkpoint of another network: one clear line, no training
    capsys.readouterr()
    assert train.main([*common[:3], "16", *common[4:], "--iters", "5", "--resume"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.startswith("wrn3d-train: error: --resume: ")
    assert str(run / "last.h5") in message and "--depth: depth=16 (stored 10)" in message
    assert read_checkpoint(run / "last.h5")["step"] == 4
