"""What this CPU can do, and oneDNN switched on where TensorFlow leaves it off.

TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs with AVX-512
VNNI/BF16/AMX-class features; elsewhere (AVX2-only AMD Zen 2/3, most laptops) every
convolution runs on Eigen, measured 1.6-6.2x slower per training step on a 2-core AMD EPYC
(Zen 3, AVX2 only). oneDNN is read once, when TensorFlow is imported, from
``TF_ENABLE_ONEDNN_OPTS``: ``enable_onednn`` sets it to ``1`` before that import unless the
user set it (an explicit ``0`` is respected). ``import wrn3d_tl`` calls it.

Imports nothing heavy (no TensorFlow): it must run before TensorFlow is imported.
"""

import functools
import os
import platform
import sys
import warnings

__all__ = ["cpu_model", "cpu_flags", "has_bf16_instructions", "enable_onednn", "onednn_enabled", "onednn_status",
           "warn_if_bf16_emulated", "fp32_limit", "isa_caps", "onednn_caps", "capping", "bf16_unrunnable",
           "check_bf16_runs", "ONEDNN_VAR"]

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"
# The CPU flags that decide the bf16 kernels: AMX tiles, AVX-512 bf16 dot products, or neither.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
# Variables that cap the instruction set the kernels use below what the CPU has: oneDNN's (read by
# TensorFlow's and PyTorch's copies), ATen's own vectorised kernels, MKL's (PyTorch's BLAS).
ONEDNN_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
ISA_CAP_VARS = ONEDNN_CAP_VARS + ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


@functools.lru_cache(maxsize=None)
def _cpuinfo():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:  # not Linux: no flags to read
        return []


def _field(name):
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.split(":", 1)[0].strip() == name),
                None)


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), a str."""
    return _field("model name") or platform.processor() or platform.machine()


def cpu_flags(relevant_only=False):
    """The CPU's feature flags as a sorted list of str (empty where ``/proc/cpuinfo`` is
    absent); ``relevant_only`` keeps those that decide TensorFlow's kernels here."""
    flags = set((_field("flags") or "").split())
    return sorted(flags & set(RELEVANT_FLAGS) if relevant_only else flags)


def _physical_cores(lines):
    """Distinct (physical id, core id) pairs; else processors / threads per core."""
    cores, processors, physical, siblings, per_socket = set(), 0, None, None, None
    for line in lines:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processors += 1
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
        elif key == "siblings":
            siblings = int(value)
        elif key == "cpu cores":
            per_socket = int(value)
    if cores:
        return len(cores)
    if processors and siblings and per_socket:
        return max(1, processors * per_socket // siblings)
    return processors or os.cpu_count() or 1


def isa_caps(environ=None):
    """The instruction-set caps set in the environment (``ISA_CAP_VARS``), a dict of str;
    empty when the kernels may use all the CPU has. ``ONEDNN_MAX_CPU_ISA=AVX2``,
    ``ATEN_CPU_CAPABILITY=avx2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` make an AVX-512 machine
    run TensorFlow's and PyTorch's kernels as an AVX2-only one would (what that emulation
    leaves out: docs/performance.md)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in ISA_CAP_VARS if environ.get(name)}


def onednn_caps(caps=None):
    """The cap oneDNN obeys, of ``caps`` (default: ``isa_caps()``): ``ONEDNN_MAX_CPU_ISA``,
    else ``DNNL_MAX_CPU_ISA`` (oneDNN reads the first set), as a dict of at most one item."""
    caps = isa_caps() if caps is None else caps
    name = next((n for n in ONEDNN_CAP_VARS if n in caps), None)
    return {name: caps[name]} if name else {}


def _caps_avx2(name, value):
    """Whether one cap variable holds its library to AVX2 or below."""
    if name in ONEDNN_CAP_VARS:     # SSE41, AVX, AVX2, AVX2_VNNI(_2); DEFAULT, AVX512_*, AVX10_* cap nothing
        value = value.lower()
        return value.startswith(("sse", "avx")) and not value.startswith(("avx512", "avx10"))
    if name == "ATEN_CPU_CAPABILITY":     # read case-sensitively by ATen: "default" (no vectors), "avx2"
        return value in ("default", "avx2")
    return value.upper() in ("SSE4_2", "AVX", "AVX2") or value.upper().startswith("AVX2_")    # MKL


def capping(caps=None):
    """The variables of ``caps`` (default: ``isa_caps()``) that hold their kernels to AVX2
    or below, as ``"NAME=value, ..."``; "" when none does. To AVX2 or below: oneDNN at
    ``SSE41``, ``AVX`` or ``AVX2*``, ATen at ``default`` or ``avx2``, MKL at ``SSE4_2``,
    ``AVX`` or ``AVX2*``."""
    caps = isa_caps() if caps is None else caps
    return ", ".join(f"{name}={value}" for name, value in caps.items() if _caps_avx2(name, value))


def bf16_unrunnable():
    """Why bf16 cannot run in this process's TensorFlow, or "" when it can. On a CPU with bf16
    instructions and oneDNN on, TensorFlow sends bf16 to oneDNN by the CPU's flags; a oneDNN
    capped to AVX2 cannot run it (a bf16 convolution fails in the step, a bf16 matmul kills
    the process). Without bf16 instructions, with oneDNN off or on a GPU, bf16 runs (on a CPU,
    emulated: ``warn_if_bf16_emulated``). Imports TensorFlow when capped."""
    cap = capping(onednn_caps())
    if not cap or not has_bf16_instructions() or not onednn_enabled():
        return ""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return ""
    return (f"oneDNN is capped to AVX2 ({cap}) on a CPU with bf16 instructions: TensorFlow sends bf16 to oneDNN "
            "by the CPU's flags, and the capped oneDNN cannot run it")


def fp32_limit(lines=None, caps=None):
    """An estimate of the CPU's physical fp32 limit from ``/proc/cpuinfo`` (``lines``: its
    lines, for tests): physical cores x FMA units per core x fp32 lanes per unit x 2 (an FMA
    is two flops) x clock. Returns ``{"gflops", "cores", "fma_units", "lanes", "ghz",
    "basis"}``, or None without a clock to read.

    The units and lanes come from the vendor, family and flags: AVX-512 cores of Intel and of
    AMD Zen 5 (family 26) have two 512-bit FMA units (16 lanes); Zen 4 (family 25 with
    AVX-512) runs 512-bit operations on two 256-bit units (8 lanes), as do AVX2 cores; the
    clock is the ``cpu MHz`` the kernel reports, which in a VM is often the nominal one (a
    turbo clock above it can put a measured peak above this limit). Under a oneDNN cap to
    AVX2 (of ``caps``, default: ``isa_caps()``; TensorFlow's matmul, the limit's yardstick,
    obeys only that one) it counts 8 lanes."""
    lines = _cpuinfo() if lines is None else lines
    cap = capping(onednn_caps(caps))
    field = {}
    for line in lines:
        key, _, value = (part.strip() for part in line.partition(":"))
        field.setdefault(key, value)
    mhz = [float(line.partition(":")[2]) for line in lines if line.partition(":")[0].strip() == "cpu MHz"]
    if not mhz:
        return None
    flags = set(field.get("flags", "").split())
    vendor, family = field.get("vendor_id", ""), int(field.get("cpu family", "0") or 0)
    wide = "avx512f" in flags and (vendor == "GenuineIntel" or (vendor == "AuthenticAMD" and family >= 26))
    lanes = 16 if wide else 8 if "fma" in flags or "avx2" in flags else 4
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if lanes == 8 else "SSE"
    if "avx512f" in flags and not wide:
        isa += " on 256-bit units"
    if cap:
        lanes = min(lanes, 8)
        isa = "kernels capped to AVX2 by " + cap
    units = 2
    cores = _physical_cores(lines)
    ghz = sum(mhz) / len(mhz) / 1000
    basis = (f"{cores} cores x {units} FMA units x {lanes} fp32 lanes x 2 flops x {ghz:.2f} GHz "
             f"({vendor or 'unknown vendor'}, family {family}, {isa})")
    return {"gflops": round(cores * units * lanes * 2 * ghz, 1), "cores": cores, "fma_units": units, "lanes": lanes,
            "ghz": round(ghz, 3), "basis": basis}


def has_bf16_instructions():
    """True when the CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``); without
    them TensorFlow emulates bf16, measured 2-14x slower than fp32."""
    return bool(set(cpu_flags()) & set(BF16_FLAGS))


def enable_onednn(environ=None):
    """Set ``TF_ENABLE_ONEDNN_OPTS=1`` unless it is set already (a user's ``0`` stays) or
    TensorFlow was imported already (the variable is read once, at that import).
    Returns True when it set the variable."""
    environ = os.environ if environ is None else environ
    if ONEDNN_VAR in environ or "tensorflow" in sys.modules:
        return False
    environ[ONEDNN_VAR] = "1"
    return True


def onednn_enabled():
    """Whether TensorFlow's oneDNN kernels are on in this process (imports TensorFlow)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def onednn_status():
    """One line for diagnostics, e.g. ``oneDNN on (TF_ENABLE_ONEDNN_OPTS=1)``."""
    return f"oneDNN {'on' if onednn_enabled() else 'off'} ({ONEDNN_VAR}={os.environ.get(ONEDNN_VAR, 'unset')})"


_warned = []


def warn_if_onednn_left_off():
    """Warn once when TensorFlow was imported before wrn3d_tl with oneDNN off on an x86 CPU
    and the user did not ask for that (no explicit ``TF_ENABLE_ONEDNN_OPTS=0``)."""
    if _warned or "tensorflow" not in sys.modules or os.environ.get(ONEDNN_VAR) == "0":
        return
    if platform.machine().lower() not in ("x86_64", "amd64") or onednn_enabled():
        return
    _warned.append(True)
    warnings.warn(f"TensorFlow was imported before wrn3d_tl with its oneDNN kernels off on this CPU "
                  f"({cpu_model()}): convolutions run on Eigen, measured 1.6-6.2x slower per training step. "
                  f"Set {ONEDNN_VAR}=1 in the environment (or import wrn3d_tl before TensorFlow).",
                  RuntimeWarning, stacklevel=3)


_bf16_warned = []


def check_bf16_runs(what):
    """Refuse bf16 (``what``: "bf16 training", "bf16 inference") with a ValueError where it
    cannot run (``bf16_unrunnable``); else ``warn_if_bf16_emulated``."""
    why = bf16_unrunnable()
    if why:
        raise ValueError(f"wrn3d_tl: {what} refused: {why}. Unset the cap, or use fp32.")
    warn_if_bf16_emulated(what)


def warn_if_bf16_emulated(what):
    """Warn once per process when bf16 is asked for (``what``: "bf16 training", "bf16
    inference") on a CPU without bf16 instructions and no GPU is visible: TensorFlow then
    emulates bf16, measured 14x slower than fp32 for inference and ~1.9x for training on a
    2-core AMD EPYC with AVX2 only. Imports TensorFlow."""
    if _bf16_warned or has_bf16_instructions() or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    _bf16_warned.append(True)
    missing = ", ".join(BF16_FLAGS)
    warnings.warn(f"wrn3d_tl: {what} on a CPU without bf16 instructions ({cpu_model()} has none of {missing}): "
                  "TensorFlow emulates bf16 there, measured 14x slower than fp32 for inference and ~1.9x for "
                  "training on an AVX2-only AMD EPYC. Use fp32 on this machine.", RuntimeWarning, stacklevel=3)
