"""The benchmark scripts' own logic (their timings are not tested: they take minutes)."""

from collections import Counter

import numpy as np
import pytest


@pytest.fixture(scope="module")
def kernels(load_benchmark):
    return load_benchmark("bench_kernels")


def test_kernel_benchmark_times_the_ops_the_network_runs(kernels):
    """step_ops lists one forward and one filter gradient per convolution of the model (an
    input gradient for all but the stem's), one batch norm and ReLU per BN layer, with the
    convolutions' channels, kernel and stride."""
    from wrn3d_tl.layers import BatchNorm, Conv, leaf_layers
    from wrn3d_tl.model import build_wrn

    case = kernels.CASES["wrn10-2-3d"]
    ops = kernels.step_ops(case)
    layers = leaf_layers(build_wrn(case.config()))
    convs = Counter((c.W.shape[-2], c.n_filter, c._kernel[0], c._strides[0]) for c in layers if isinstance(c, Conv))
    counted = {kind: Counter() for kind, _ in ops}
    for (kind, key), n in ops.items():
        counted[kind][key[-4:] if kind.startswith("conv") else key[-1]] += n
    assert counted["conv forward"] == convs == counted["conv grad filter"]
    assert counted["conv grad input"] == convs - Counter({(3, 16, 3, 1): 1})  # not the stem's (3 -> 16)
    norms = Counter(b.gamma.shape[0] for b in layers if isinstance(b, BatchNorm))
    assert counted["batch norm fwd"] == counted["batch norm grad"] == counted["relu fwd + grad"] == norms
    assert {key[0] for _, key in ops} == {case.batch}


def test_kernel_benchmark_report_weights_shapes_by_their_count(kernels):
    rec = dict(config="wrn10-2-3d", precision="bf16", kind="conv forward")
    records = [dict(rec, framework="tf", shape=[1], count=3, ms=2.0), dict(rec, framework="torch", shape=[1], count=3,
                                                                          ms=1.0),
               dict(rec, framework="tf", shape=[2], count=1, ms=4.0), dict(rec, framework="torch", shape=[2], count=1,
                                                                          ms=4.0)]
    text = kernels.report(records, per_shape=True)
    assert "| conv forward | 10.0 | 7.0 | 1.43 |" in text and "| **sum** | **10.0** | **7.0** | **1.43** |" in text
    assert "| conv forward | 1 | 3 | 2.000 | 1.000 | 2.00 |" in text


def test_kernel_benchmark_refuses_unknown_configs_and_precisions(kernels):
    assert kernels.parse_args(["--configs", "wrn10-2-3d", "--precisions", "fp32"]).keys == ["wrn10-2-3d"]
    for argv in (["--configs", "wrn99"], ["--precisions", "fp16"]):
        with pytest.raises(SystemExit):
            kernels.parse_args(argv)


@pytest.mark.slow
def test_train_command_benchmark_runs_both_paths_on_its_scan_task(load_benchmark, tmp_path, monkeypatch):
    import json

    bench = load_benchmark("bench_train_command")
    monkeypatch.setattr("sys.argv", ["bench_train_command.py", "--out", str(tmp_path), "--epochs", "1", "--depth",
                                     "10", "--width", "1", "--per-class", "6", "2", "2"])
    bench.main()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["network"] == "WRN-10-1" and result["steps"] == 1 and result["per_class"]["test"] == 2
    for path in ("command", "python"):
        assert 0 <= result[path]["test_accuracy"] <= 1 and result[path]["seconds"] > 0
    assert len(open(tmp_path / "scans" / "train.csv").read().splitlines()) == 1 + 18   # 3 classes x 6
    assert result["command"]["selected_step"] == 1


def test_scans_benchmark_measures_each_step_on_a_small_scan(load_benchmark, tmp_path):
    import json

    bench = load_benchmark("bench_scans")
    out = tmp_path / "scans.json"
    record = bench.main(["--size", "32", "--slices", "8", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    thick = record["per_scan"]["thick_0.9x0.9x3mm"]
    assert thick["from_shape"] == [32] * 3 and thick["to_shape"] == [29, 29, 96]
    assert set(thick["seconds"]) == {"geometry.resample", "scipy.ndimage.zoom", "nibabel.processing"}
    assert record["per_scan"]["iso_0.5mm"]["to_shape"] == [16] * 3
    decode = record["dicom_vs_nifti"]
    assert decode["files"] == {"DICOM series (uncompressed)": 8, "NIfTI .nii.gz": 1, "NIfTI .nii": 1}
    assert all(v > 0 for v in decode["volumes_per_s"].values())


def test_bench_bn_inference_forms_are_what_it_says(load_benchmark):
    """Multiply-add batch norm gives the model's outputs to round-off; the folded upper bound
    (bn2 -> bias + ReLU) does not; the model is left as built after tracing them."""
    bench = load_benchmark("bench_bn_inference")
    import tensorflow as tf
    from wrn3d_tl.config import WRNConfig
    from wrn3d_tl.layers import BatchNorm
    from wrn3d_tl.model import build_wrn

    net = build_wrn(WRNConfig.from_name("WRN-10-1", input_shape=(4, 8, 8, 1), num_classes=3))
    bns = [layer for layer in net.all_layers if isinstance(layer, BatchNorm)] + [
        b.bn2 for b in net.all_layers if hasattr(b, "bn2")]
    for bn in bns:      # moving statistics away from (0, 1), so that folding them matters
        bn.moving_mean.assign(tf.random.stateless_uniform(bn.moving_mean.shape, [0, 1], 0.1, 0.5))
        bn.moving_var.assign(tf.random.stateless_uniform(bn.moving_var.shape, [0, 2], 0.5, 2.0))
    x = tf.random.stateless_normal((2, 4, 8, 8, 1), seed=[3, 4])
    out = {form: fn(x).numpy() for form, fn in bench._forms(net, tf.float32).items()}
    np.testing.assert_allclose(out["multiply-add"], out["as built"], atol=1e-4, rtol=1e-4)
    assert np.abs(out["bn2 folded"] - out["as built"]).max() > 1e-3
    assert all("forward" not in vars(bn) for bn in bns)
    np.testing.assert_array_equal(net(x, is_train=False).numpy(), out["as built"])
