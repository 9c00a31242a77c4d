"""benchmarks/gpu_check.py (``make gpu-check``) where no GPU is visible, and what it writes:
its parsers and result files, fed results of the types its stages collect."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check(load_benchmark):
    return load_benchmark("gpu_check")


def test_without_a_gpu_the_check_fails_with_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error: no GPU visible to TensorFlow"), out.stderr
    assert f"```text\n{lines[0]}\n```" in (ROOT / "README.md").read_text(encoding="utf-8")  # as documented
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-check: \$\(STAMP\)\n\t@\$\(PY\) benchmarks/gpu_check.py$", make, re.M)


def test_parse_main_job_reads_the_documented_output(check):
    # the main job's output as README.md shows it (iterations 1, 2 and 10)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.search(r"```text\n(WRN-16-4 3D, input .*?)```", readme, re.S).group(1)
    got = check.parse_main_job(text)
    assert got == {"steps": 3, "first_step_vol_per_s": 7.8, "vol_per_s_after_first": (15.2 + 15.5) / 2,
                   "data": "synthetic", "batch": 32, "test_accuracy": 0.4}
    assert check.parse_main_job("Traceback ...\n")["vol_per_s_after_first"] is None


def test_choose_batch_fits_every_benchmark_worker(check):
    from wrn3d_tl.memory import estimate_memory
    from wrn3d_tl.model import WRNConfig

    cfg = WRNConfig.from_name("WRN-16-4", input_shape=(8, 32, 32, 3))
    need = {b: estimate_memory(cfg, b)["total"] * check.BENCH_WORKERS for b in (64, 128, 256)}
    memory = int(need[128] / 0.8) + 1  # room for 128 on every worker, not for 256
    assert check.choose_batch(cfg, memory) == 128
    assert check.choose_batch(cfg, need[256] / 0.8) == 256
    assert check.choose_batch(cfg, need[64] / 0.8 - 1) is None


def test_the_commands_it_runs_parse(check, load_example, load_benchmark):
    """The main job's and bench_train.py's flags the check passes exist (SystemExit if not)."""
    main_job = load_example("cifar_wide_resnet_tl")
    for name, flag in check.PRECISIONS.items():
        argv = check.main_job_argv(flag)
        args = main_job.parse_args(argv[1:])
        assert argv[0] == "examples/cifar_wide_resnet_tl.py" and args.iters == 10
        assert args.mixed_precision == flag
    bench = load_benchmark("bench_train")
    argv = check.bench_argv("wrn16-4-3d", 128, "out.jsonl")
    args = bench.parse_args(argv[1:])
    assert argv[0] == "benchmarks/bench_train.py" and (args.configs, args.batch) == ("wrn16-4-3d", 128)
    impls = [str(i) for i in bench.select_impls(args, have_torch=not args.no_torch)]  # as its main() does
    assert impls == ["wrn3d_tl/fp32", "wrn3d_tl/bf16", "wrn3d_tl+xla/fp32", "keras/fp32"]
    assert len(impls) == check.BENCH_WORKERS
    assert set(check.bench_argv("k", 64, "o")) >= {"--steps", "--warmup", "--burst"}


def _step(run, config, impl, precision, train_sps, gflop=10.0, batch=128):
    """A bench_train.py "step" record (the fields its report reads)."""
    return {"run": run, "kind": "step", "config": config, "label": f"{config} b{batch}", "impl": impl,
            "precision": precision, "batch": batch, "error": None, "forward_gflop_per_sample": gflop,
            "train": {"samples_per_s": train_sps, "median_s": batch / train_sps},
            "infer": {"samples_per_s": 3 * train_sps, "median_s": batch / train_sps / 3},
            "train_gflops": train_sps * 3 * gflop, "infer_gflops": 3 * train_sps * gflop}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_gpu" name="test_inference_logits_match_the_cpu" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_export_serves_on_the_device" time="1.0">
<failure message="AssertionError: served logits: max difference">trace</failure></testcase>
<testcase classname="tests.test_gpu" name="test_mirrored" time="0.0">
<skipped type="pytest.skip" message="no GPU visible to TensorFlow">skip</skipped></testcase>
</testsuite></testsuites>"""


def test_results_files_follow_the_collected_results(check, tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    tests = {**check.parse_junit(tmp_path / "junit.xml"), "exit_code": 1}
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert tests["tests"][1] == {"name": "test_export_serves_on_the_device", "outcome": "failed",
                                 "message": "AssertionError: served logits: max difference"}
    records = [{"run": "r1", "kind": "matmul_peak", "gflops": {"fp32": 19000.0, "bf16": 290000.0}},
               {"run": "r1", "kind": "matmul_peak", "gflops": {"fp32": 19500.0, "bf16": 280000.0}},
               _step("r1", "wrn16-4-3d", "wrn3d_tl", "fp32", 400.0),
               _step("r1", "wrn16-4-3d", "wrn3d_tl", "bf16", 900.0),
               _step("r1", "wrn16-4-3d", "wrn3d_tl+xla", "fp32", 500.0),
               {"run": "r2", "kind": "matmul_peak", "gflops": {"fp32": 18000.0, "bf16": 250000.0}},
               _step("r2", "wrn40-4-2d", "wrn3d_tl", "fp32", 1000.0, gflop=1.0),
               _step("r2", "wrn40-4-2d", "wrn3d_tl+xla", "fp32", 800.0, gflop=1.0)]
    summary = check.bench_summary(records)
    first = summary["rows"][0]
    assert first["train_tflops"] == pytest.approx(400 * 3 * 10 / 1e3)
    assert first["peak_tflops"] == pytest.approx(19.5)  # the higher of its own run's two peaks
    assert first["of_peak"] == pytest.approx(12.0 / 19.5)
    assert summary["rows"][1]["peak_tflops"] == pytest.approx(290.0)  # bf16 rows against the bf16 peak
    assert summary["rows"][3]["peak_tflops"] == pytest.approx(18.0)   # another run: its own peak
    assert summary["xla"] == {"wrn16-4-3d": pytest.approx(1.25), "wrn40-4-2d": pytest.approx(0.8)}
    assert "keep the default (off)" in check.xla_verdict(summary["xla"])
    assert "wins on every config" in check.xla_verdict({"wrn16-4-3d": 1.25})

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    log = re.search(r"```text\n(WRN-16-4 3D, input .*?)```", readme, re.S).group(1)
    main_job = {p: {**check.parse_main_job(log), "exit_code": 0} for p in check.PRECISIONS}
    main_job["fp16"]["exit_code"] = 1
    devices = {"gpus": [{"device": f"/device:GPU:{i}", "name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0",
                         "memory_bytes": 40 * 2 ** 30} for i in range(2)], "cuda": "12.5.1", "cudnn": "9"}
    results = {"date": "2026-11-26T12:00:00", "tensorflow": "2.21.0", "devices": devices, "tests": tests,
               "main_job": main_job, "bench": {"runs": {"wrn16-4-3d": {"batch": 128, "exit_code": 0, "records": []}},
                                               "summary": summary}, "elapsed_s": 400.0}
    results["failed"] = check.failures(results)
    results["ok"] = not results["failed"]
    assert results["failed"] == ["tests", "main job fp16"]

    json_path, md_path = check.write_results(results, tmp_path / "results")
    assert Path(json_path).name == "gpu-check_nvidia-a100-sxm4-40gb-x2.json"
    assert Path(md_path).name == "gpu-check_nvidia-a100-sxm4-40gb-x2.md"
    assert json.loads(Path(json_path).read_text()) == json.loads(json.dumps(results))
    md = Path(md_path).read_text()
    assert "FAILED: tests, main job fp16" in md and "1 passed, 1 failed, 1 skipped" in md
    assert "| /device:GPU:1 | NVIDIA A100-SXM4-40GB | 8.0 | 40.0 |" in md
    assert "| fp32 | 0 | synthetic | 32 | 7.8 | 15.3 | 0.4000 |" in md
    assert "| wrn16-4-3d b128 | wrn3d_tl | fp32 | 400.0 | 1200.0 | 12.00 | 19.5 | 62% |" in md
    assert "wrn16-4-3d 1.25x, wrn40-4-2d 0.80x" in md
