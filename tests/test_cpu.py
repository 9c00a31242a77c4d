"""oneDNN on where TensorFlow leaves it off (wrn3d_tl.cpu), and an explicit 0 respected."""

import os
import re
import subprocess
import sys

import pytest

from wrn3d_tl import cpu

SCRIPT = os.path.join(os.path.dirname(sys.executable), "wrn3d-predict")


@pytest.fixture(autouse=True)
def _no_isa_caps(monkeypatch):
    """The tests set the caps they mean; none inherited from the shell."""
    for name in cpu.ISA_CAP_VARS:
        monkeypatch.delenv(name, raising=False)


def _version(env_value):
    """`wrn3d-predict --version` in a fresh process with TF_ENABLE_ONEDNN_OPTS unset or set."""
    env = {k: v for k, v in os.environ.items() if k != cpu.ONEDNN_VAR}
    if env_value is not None:
        env[cpu.ONEDNN_VAR] = env_value
    assert os.path.exists(SCRIPT), f"{SCRIPT}: the console script is not installed (pip install -e .)"
    proc = subprocess.run([SCRIPT, "--version"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# what `--version` prints, and README's documented line
VERSION_LINE = (r"wrn3d_tl \d+\.\d+\.\d+, TensorFlow 2\.\d+\.\d+, oneDNN (on|off) \(TF_ENABLE_ONEDNN_OPTS=\w+\), "
                r"CPU .+ \(.+\)")


def test_console_script_runs_with_onednn_on_unless_told_otherwise():
    line = _version(None)  # the user set nothing: the package sets 1 before TensorFlow is imported
    assert line.startswith("wrn3d_tl 0.1.0, TensorFlow 2.") and re.fullmatch(VERSION_LINE, line), line
    assert "oneDNN on (TF_ENABLE_ONEDNN_OPTS=1)" in line, line
    assert cpu.cpu_model() in line


@pytest.mark.slow  # a second process; fast tier: test_enable_onednn_sets_only_an_unset_variable_before_tensorflow
def test_console_script_respects_an_explicit_zero():
    assert "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)" in _version("0"), "an explicit 0 must be respected"


def test_enable_onednn_sets_only_an_unset_variable_before_tensorflow(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    env = {}
    assert cpu.enable_onednn(env) and env == {cpu.ONEDNN_VAR: "1"}
    env = {cpu.ONEDNN_VAR: "0"}
    assert not cpu.enable_onednn(env) and env == {cpu.ONEDNN_VAR: "0"}


def test_enable_onednn_leaves_the_variable_once_tensorflow_is_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    env = {}
    assert not cpu.enable_onednn(env) and env == {}


@pytest.mark.parametrize("on,var,machine,warns", [(False, None, "x86_64", True), (False, "1", "x86_64", True),
                                                  (False, "0", "x86_64", False), (True, None, "x86_64", False),
                                                  (False, None, "aarch64", False)])
def test_warns_once_when_tensorflow_came_first_with_onednn_off(monkeypatch, on, var, machine, warns):
    import warnings

    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    monkeypatch.setattr(cpu, "onednn_enabled", lambda: on)
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    monkeypatch.setattr(cpu, "_warned", [])
    if var is None:
        monkeypatch.delenv(cpu.ONEDNN_VAR, raising=False)
    else:
        monkeypatch.setenv(cpu.ONEDNN_VAR, var)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu.warn_if_onednn_left_off()
        cpu.warn_if_onednn_left_off()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == (1 if warns else 0), messages
    if warns:
        assert "TF_ENABLE_ONEDNN_OPTS=1" in messages[0] and "1.6-6.2x slower" in messages[0]


def test_cpu_flags_read_from_proc_cpuinfo():
    flags = cpu.cpu_flags()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
        assert set(flags) == set(line.split(":", 1)[1].split())
        assert set(cpu.cpu_flags(relevant_only=True)) <= set(flags)
        assert cpu.has_bf16_instructions() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_readme_version_line_has_the_commands_format():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = readme.split("every command has it) says whether oneDNN is on:\n\n```text\n", 1)[1].split("\n")[0]
    assert re.fullmatch(VERSION_LINE, documented), documented  # the command's own line: the test above


_FIXED_RUN = """
import sys
import numpy as np
import wrn3d_tl
import tensorflow as tf
from wrn3d_tl import cpu
from wrn3d_tl.model import WRNConfig, build_wrn
from wrn3d_tl.train import Trainer
tf.random.set_seed(0)
model = build_wrn(WRNConfig(depth=10, widen_factor=1, num_classes=4, input_shape=(4, 8, 8, 3)))
rng = np.random.default_rng(0)
x = rng.normal(size=(20, 8, 4, 8, 8, 3)).astype(np.float32)
y = rng.integers(0, 4, size=(20, 8))
t = Trainer(model, lr=0.05, verbose=False)
losses = [t.train_step(x[i], y[i])["loss"] for i in range(20)]
np.savez(sys.argv[1], losses=np.array(losses), onednn=cpu.onednn_enabled(), **{v.name: v.numpy() for v in model.all_weights})
"""


@pytest.mark.slow
def test_onednn_on_and_off_agree_to_float32_round_off(tmp_path):
    """The same 20-step fp32 run (WRN-10-1 3D, fixed data and initial weights) with oneDNN's
    kernels and with Eigen's. Measured on a 2-core AMD EPYC (AVX512_BF16): losses within
    4.3e-7 relative, weights within 1.8e-6 after 20 steps."""
    import numpy as np

    runs = {}
    for value in ("0", "1"):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **{cpu.ONEDNN_VAR: value})
        out = tmp_path / f"run{value}.npz"
        proc = subprocess.run([sys.executable, "-c", _FIXED_RUN, str(out)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[value] = np.load(out)
    off, on = runs["0"], runs["1"]
    assert not off["onednn"] and on["onednn"]
    np.testing.assert_allclose(on["losses"], off["losses"], rtol=1e-5)
    for name in off.files:
        if name not in ("losses", "onednn"):
            np.testing.assert_allclose(on[name], off[name], atol=1e-4, err_msg=name)


def _cpuinfo(vendor, family, flags, mhz, processors=2, cores_per_socket=2, siblings=2):
    lines = []
    for i in range(processors):
        lines += [f"processor\t: {i}", f"vendor_id\t: {vendor}", f"cpu family\t: {family}", f"cpu MHz\t\t: {mhz}",
                  "physical id\t: 0", f"siblings\t: {siblings}", f"cpu cores\t: {cores_per_socket}",
                  f"flags\t\t: fpu sse2 {flags}", ""]
    return lines


@pytest.mark.parametrize("kind, lines, gflops, lanes, cores", [
    ("Zen 3, AVX2 only", _cpuinfo("AuthenticAMD", 25, "fma avx2", 2450.0), 2 * 2 * 8 * 2 * 2.45, 8, 2),
    ("Zen 4, AVX-512 on 256-bit units", _cpuinfo("AuthenticAMD", 25, "fma avx2 avx512f avx512_bf16", 2596.142),
     2 * 2 * 8 * 2 * 2.596142, 8, 2),
    ("Zen 5, 512-bit units", _cpuinfo("AuthenticAMD", 26, "fma avx2 avx512f", 3000.0), 2 * 2 * 16 * 2 * 3.0, 16, 2),
    ("Xeon with AMX, 2 threads of one core", _cpuinfo("GenuineIntel", 6, "fma avx2 avx512f amx_bf16", 2100.0,
                                                      cores_per_socket=1), 1 * 2 * 16 * 2 * 2.1, 16, 1),
])
def test_fp32_limit_is_cores_units_lanes_flops_and_clock(kind, lines, gflops, lanes, cores):
    limit = cpu.fp32_limit(lines)
    assert limit["gflops"] == pytest.approx(gflops, abs=0.05), kind
    assert (limit["lanes"], limit["cores"], limit["fma_units"]) == (lanes, cores, 2)
    assert limit["basis"].startswith(f"{cores} cores x 2 FMA units x {lanes} fp32 lanes x 2 flops x ")


def test_fp32_limit_without_a_clock_is_unknown():
    assert cpu.fp32_limit(["processor\t: 0", "flags\t\t: avx2 fma"]) is None
    assert cpu.fp32_limit([]) is None


def test_bench_train_reports_onednn_per_row_and_the_limit_beside_the_matmul_peak(load_benchmark, capsys):
    bench = load_benchmark("bench_train")
    row = {"run": "r", "kind": "step", "config": "wrn10-2-3d", "label": "WRN-10-2", "precision": "fp32", "batch": 16,
           "error": None, "forward_gflop_per_sample": 0.15, "train": {"samples_per_s": 100.0, "median_s": 0.16},
           "infer": {"samples_per_s": 300.0, "median_s": 0.05}, "train_gflops": 45.0, "infer_gflops": 45.0}
    records = [{**row, "impl": "wrn3d_tl", "onednn": True}, {**row, "impl": "keras", "onednn": False},
               {**row, "impl": "torch", "onednn": None}]
    limit = cpu.fp32_limit(_cpuinfo("AuthenticAMD", 25, "fma avx2", 2500.0))       # 160 GFLOP/s
    bench.report(records, {"fp32": 200.0, "bf16": 300.0}, limit)
    out = capsys.readouterr().out
    assert "| WRN-10-2 | wrn3d_tl | fp32 | on | 100.0 |" in out and "| WRN-10-2 | keras | fp32 | off |" in out
    assert "| WRN-10-2 | torch | fp32 | — |" in out
    assert ("Physical fp32 limit (estimate): 160.0 GFLOP/s = 2 cores x 2 FMA units x 8 fp32 lanes x 2 flops x "
            "2.50 GHz (AuthenticAMD, family 25, AVX2); the fp32 matmul reaches 125% of it, which needs at least "
            "3.12 GHz on those units") in out


@pytest.mark.parametrize("caps, capping, onednn", [
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, "ONEDNN_MAX_CPU_ISA=SSE41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}),
    ({"DNNL_MAX_CPU_ISA": "avx2_vnni_2"}, "DNNL_MAX_CPU_ISA=avx2_vnni_2", {"DNNL_MAX_CPU_ISA": "avx2_vnni_2"}),
    # oneDNN reads ONEDNN_MAX_CPU_ISA first: DEFAULT there lifts the DNNL_ cap
    ({"ONEDNN_MAX_CPU_ISA": "DEFAULT", "DNNL_MAX_CPU_ISA": "AVX2"}, "DNNL_MAX_CPU_ISA=AVX2",
     {"ONEDNN_MAX_CPU_ISA": "DEFAULT"}),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}),
    ({"ONEDNN_MAX_CPU_ISA": "AVX10_1_512"}, "", {"ONEDNN_MAX_CPU_ISA": "AVX10_1_512"}),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, "ATEN_CPU_CAPABILITY=avx2", {}),
    ({"ATEN_CPU_CAPABILITY": "default"}, "ATEN_CPU_CAPABILITY=default", {}),
    ({"ATEN_CPU_CAPABILITY": "AVX2"}, "", {}),                 # ATen compares case-sensitively
    ({"ATEN_CPU_CAPABILITY": "avx512"}, "", {}),
    ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, "MKL_ENABLE_INSTRUCTIONS=SSE4_2", {}),
    ({"MKL_ENABLE_INSTRUCTIONS": "AVX2_E1"}, "MKL_ENABLE_INSTRUCTIONS=AVX2_E1", {}),
    ({"MKL_ENABLE_INSTRUCTIONS": "AVX512_E1"}, "", {}),
])
def test_which_variables_cap_the_kernels_to_avx2(monkeypatch, caps, capping, onednn):
    for name, value in caps.items():
        monkeypatch.setenv(name, value)
    assert cpu.isa_caps() == caps and cpu.capping() == capping
    assert cpu.onednn_caps() == onednn


def test_isa_caps_are_the_variables_that_cap_the_kernels_set_in_the_environment():
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "",
           "PATH": "/bin"}
    assert cpu.isa_caps(env) == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    assert cpu.isa_caps({}) == {}


@pytest.mark.parametrize("caps, lanes, says", [
    ({}, 16, "(GenuineIntel, family 6, AVX-512)"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, 16, "(GenuineIntel, family 6, AVX-512)"),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, 16, "(GenuineIntel, family 6, AVX-512)"),    # PyTorch's cap, not TF's
    ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, 8,
     "(GenuineIntel, family 6, kernels capped to AVX2 by ONEDNN_MAX_CPU_ISA=AVX2)"),
])
def test_fp32_limit_counts_the_lanes_the_kernels_may_use(caps, lanes, says):
    limit = cpu.fp32_limit(_cpuinfo("GenuineIntel", 6, "fma avx2 avx512f", 2000.0), caps=caps)
    assert limit["lanes"] == lanes and limit["gflops"] == pytest.approx(2 * 2 * lanes * 2 * 2.0)
    assert limit["basis"].endswith(says), limit["basis"]


@pytest.mark.parametrize("bf16_cpu, onednn, cap, gpu, refused", [
    (True, True, "AVX2", False, True), (True, True, None, False, False), (True, True, "AVX512_CORE", False, False),
    (False, True, "AVX2", False, False),       # no bf16 instructions: TensorFlow emulates bf16 off oneDNN
    (True, False, "AVX2", False, False),       # oneDNN off: Eigen runs bf16
    (True, True, "AVX2", True, False),         # a GPU runs it
])
def test_bf16_is_unrunnable_only_through_a_capped_onednn_on_a_bf16_cpu(monkeypatch, bf16_cpu, onednn, cap, gpu,
                                                                       refused):
    import tensorflow as tf

    monkeypatch.setattr(cpu, "has_bf16_instructions", lambda: bf16_cpu)
    monkeypatch.setattr(cpu, "onednn_enabled", lambda: onednn)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if gpu and kind == "GPU" else [])
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    why = cpu.bf16_unrunnable()
    assert bool(why) is refused
    if refused:
        assert why.startswith("oneDNN is capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) on a CPU with bf16 instructions")
        with pytest.raises(ValueError, match="wrn3d_tl: bf16 training refused: oneDNN is capped"):
            cpu.check_bf16_runs("bf16 training")


def test_versions_line_names_an_isa_cap(monkeypatch):
    from wrn3d_tl.commands import versions_line

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    line = versions_line()
    assert re.fullmatch(VERSION_LINE, line) and line.endswith("; ONEDNN_MAX_CPU_ISA=AVX2)"), line
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert "ONEDNN_MAX_CPU_ISA" not in versions_line()


def test_bench_train_leaves_the_bf16_matmul_out_under_an_avx2_cap(load_benchmark, monkeypatch, capsys):
    bench = load_benchmark("bench_train")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(cpu, "has_bf16_instructions", lambda: True)
    import tensorflow as tf

    calls = []
    monkeypatch.setattr(tf, "matmul", lambda a, b: calls.append(a.dtype) or a)   # no 4096^3 matmul here
    peak = bench.setup_matmul(None, None, None, 0)["matmul"]()
    assert peak["bf16"] is None and peak["fp32"] > 0 and set(calls) == {tf.float32}
    assert bench._peaks({"fp32": 204.4, "bf16": None}, ".1f") == "fp32 204.4 GFLOP/s, bf16 not measured"
    bench.report([], {"fp32": 204.4}, None)
    assert "TensorFlow matmul peak (4096x4096, this run): fp32 204.4 GFLOP/s, bf16 not measured" in capsys.readouterr().out
