"""BatchNorm against a NumPy reference; wide basic blocks' shapes and shortcuts."""

import numpy as np
import pytest
import tensorflow as tf
import tensorlayer as tl

from wrn3d_tl.layers import BatchNorm, Conv, WideBasicBlock, leaf_layers

DECAY, EPS = 0.9, 1e-5


def bn_model(shape, **kwargs):
    ni = tl.layers.Input((None,) + shape)
    bn = BatchNorm(decay=DECAY, epsilon=EPS, name="bn", **kwargs)
    return tl.models.Model(inputs=ni, outputs=bn(ni)), bn


def numpy_bn(x, gamma, beta, mean, var):
    return gamma * (x - mean) / np.sqrt(var + EPS) + beta


def randomise(bn, rng):
    c = bn.gamma.shape[0]
    bn.gamma.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
    bn.beta.assign(rng.normal(size=c).astype("float32"))


@pytest.mark.parametrize("shape", [(3, 5, 5, 4), (5, 5, 4)])
def test_batchnorm_train_and_eval_match_numpy(shape, rng):
    model, bn = bn_model(shape)
    randomise(bn, rng)
    # The wiring pass of a static model ran on a dummy batch: statistics untouched.
    np.testing.assert_array_equal(bn.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(bn.moving_var.numpy(), 1.0)
    x = (rng.normal(size=(4,) + shape) * 3 + 1).astype("float32")
    flat = x.reshape(-1, shape[-1])
    g, b = bn.gamma.numpy(), bn.beta.numpy()

    y = model(x, is_train=True).numpy()
    np.testing.assert_allclose(y, numpy_bn(x, g, b, flat.mean(0), flat.var(0)), atol=2e-5)
    mm = (1 - DECAY) * flat.mean(0)
    mv = DECAY + (1 - DECAY) * flat.var(0, ddof=1)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_var.numpy(), mv, rtol=1e-5)

    y_eval = model(x, is_train=False).numpy()
    np.testing.assert_allclose(y_eval, numpy_bn(x, g, b, mm, mv), atol=2e-5)
    # eval mode leaves the statistics alone
    np.testing.assert_allclose(bn.moving_mean.numpy(), mm, rtol=1e-5, atol=1e-6)


def test_batchnorm_moving_averages_move_by_decay_inside_tf_function(rng):
    model, bn = bn_model((2, 4, 4, 3))
    step = tf.function(lambda x: model(x, is_train=True))
    mm, mv = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.normal(2.0, 1.5, size=(3, 2, 4, 4, 3)).astype("float32")
        step(x)
        flat = x.reshape(-1, 3).astype("float64")
        mm = DECAY * mm + (1 - DECAY) * flat.mean(0)
        mv = DECAY * mv + (1 - DECAY) * flat.var(0, ddof=1)
    assert step.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(bn.moving_mean.numpy(), mm, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_var.numpy(), mv, rtol=1e-5)
    evaluate = tf.function(lambda x: model(x, is_train=False))
    np.testing.assert_allclose(evaluate(x).numpy(), numpy_bn(x, 1.0, 0.0, mm, mv), atol=2e-5)


@pytest.mark.parametrize("sync", [False, True])
def test_batchnorm_under_mirrored_strategy(two_cpu_strategy, sync, rng):
    strategy = two_cpu_strategy
    with strategy.scope():
        model, bn = bn_model((2, 3, 3, 2), sync=sync)
    halves = [rng.normal(i * 4.0, 1.0 + i, size=(2, 2, 3, 3, 2)).astype("float32") for i in range(2)]
    inputs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(halves[ctx.replica_id_in_sync_group]))
    out = strategy.run(tf.function(lambda x: model(x, is_train=True)), args=(inputs,))
    outs = [t.numpy() for t in strategy.experimental_local_results(out)]

    full = np.concatenate(halves).reshape(-1, 2)
    for h, y in zip(halves, outs):
        stats = full if sync else h.reshape(-1, 2)
        np.testing.assert_allclose(y, numpy_bn(h, 1.0, 0.0, stats.mean(0), stats.var(0)), atol=1e-4)
    if sync:
        want_mean = (1 - DECAY) * full.mean(0)
        want_var = DECAY + (1 - DECAY) * full.var(0, ddof=1)
    else:  # each replica keeps its own statistics; a cross-replica read averages them
        flats = [h.reshape(-1, 2) for h in halves]
        want_mean = (1 - DECAY) * np.mean([f.mean(0) for f in flats], 0)
        want_var = DECAY + (1 - DECAY) * np.mean([f.var(0, ddof=1) for f in flats], 0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), want_mean, rtol=1e-4)
    np.testing.assert_allclose(bn.moving_var.numpy(), want_var, rtol=1e-4)


def test_batchnorm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        BatchNorm(decay=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        BatchNorm(epsilon=0.0)
    ni = tl.layers.Input((None, 8))
    with pytest.raises(ValueError, match="NDHWC"):
        BatchNorm(name="flat_bn")(ni)


def block_model(in_shape, out_channels, strides, projection):
    ni = tl.layers.Input((None,) + in_shape)
    out = WideBasicBlock(out_channels, strides, projection=projection, name="blk")(ni)
    return tl.models.Model(inputs=ni, outputs=out)


@pytest.mark.parametrize("in_shape,out_c,strides,want", [
    ((4, 8, 8, 16), 32, 2, (2, 4, 4, 32)),
    ((4, 8, 8, 16), 32, (1, 2, 2), (4, 4, 4, 32)),
    ((5, 7, 7, 8), 8, 2, (3, 4, 4, 8)),
    ((8, 8, 16), 32, 2, (4, 4, 32)),
    ((8, 8, 16), 16, 1, (8, 8, 16)),
])
def test_block_output_shapes(in_shape, out_c, strides, want):
    has_projection = in_shape[-1] != out_c or strides != 1
    model = block_model(in_shape, out_c, strides, has_projection)
    y = model(np.ones((2,) + in_shape, "float32"), is_train=False)
    assert tuple(y.shape) == (2,) + want
    names = {layer.name for layer in leaf_layers(model)}
    assert ("blk/shortcut" in names) == has_projection


def test_identity_block_adds_input_unchanged(rng):
    model = block_model((4, 4, 4, 8), 8, 1, projection=False)
    for layer in leaf_layers(model):
        if isinstance(layer, Conv) and layer.name.endswith("conv2"):
            layer.W.assign(tf.zeros_like(layer.W))
    x = rng.normal(size=(2, 4, 4, 4, 8)).astype("float32")
    np.testing.assert_allclose(model(x, is_train=False).numpy(), x, atol=1e-6)


def test_projection_shortcut_reads_first_preactivation(rng):
    """With conv2 zeroed, the block is exactly shortcut(relu(bn1(x)))."""
    model = block_model((4, 4, 4, 8), 16, 2, projection=True)
    layers = {layer.name: layer for layer in leaf_layers(model)}
    layers["blk/conv2"].W.assign(tf.zeros_like(layer_w := layers["blk/conv2"].W))
    assert layer_w.shape == (3, 3, 3, 16, 16)
    x = rng.normal(size=(2, 4, 4, 4, 8)).astype("float32")
    bn1 = layers["blk/bn1"]
    pre = np.maximum(numpy_bn(x, 1.0, 0.0, bn1.moving_mean.numpy(), bn1.moving_var.numpy()), 0)
    w = layers["blk/shortcut"].W.numpy()[0, 0, 0]  # (8, 16)
    want = pre[:, ::2, ::2, ::2, :] @ w
    np.testing.assert_allclose(model(x, is_train=False).numpy(), want, atol=1e-4)


def test_conv_has_no_bias_and_he_normal_scale():
    ni = tl.layers.Input((None, 4, 8, 8, 64))
    conv = Conv(128, 3, name="he")
    tl.models.Model(inputs=ni, outputs=conv(ni))
    assert [w.name for w in conv.trainable_weights] == ["he/kernel:0"]
    std = float(np.std(conv.W.numpy()))
    assert abs(std - np.sqrt(2.0 / (27 * 64))) / np.sqrt(2.0 / (27 * 64)) < 0.05


def _conv3d_dtypes(device=None, inner=None, batch=1, padding="same"):
    """The compute dtype of the Conv3D ops a bf16 Conv on a 2-deep input traces to, under an
    outer ``tf.device`` scope (``device``) or one inside the function (``inner``)."""
    import contextlib

    conv = Conv(4, 3, padding=padding, name="c")
    conv.build((None, 2, 6, 6, 3))

    def f(x):
        with tf.device(inner) if inner else contextlib.nullcontext():
            return conv.forward(x)
    with tf.device(device) if device else contextlib.nullcontext():
        graph = tf.function(f).get_concrete_function(tf.TensorSpec((batch, 2, 6, 6, 3), tf.bfloat16)).graph
    return [op.get_attr("T").name for op in graph.get_operations() if op.type == "Conv3D"]


@pytest.fixture
def probe(monkeypatch):
    """Replaces the bf16 filter-gradient probe's measurement by ``probe.error`` and records
    the cases it was asked about; the cache starts empty."""
    from wrn3d_tl import layers

    class Probe:
        error, asked = 0.0, []

        def __call__(self, *case):
            self.asked.append(case)
            return self.error
    p = Probe()
    monkeypatch.setattr(layers, "_BF16_FILTER_GRAD_OK", {})
    monkeypatch.setattr(layers, "_bf16_filter_grad_error", p)
    return p


def test_bf16_depth2_float32_fallback_where_the_probe_finds_the_cpu_kernel_wrong(probe):
    # oneDNN (CPU) computes this filter gradient wrongly in bf16 on some CPUs: there the
    # conv runs in float32
    probe.error = float("inf")
    assert _conv3d_dtypes("/CPU:0") == ["float32"]
    assert _conv3d_dtypes(inner="/job:localhost/replica:0/task:0/device:CPU:1") == ["float32"]
    assert _conv3d_dtypes() == ["float32"]  # no GPU visible here: the default placement is the CPU
    assert probe.asked == [((1, 2, 6, 6, 3), (3, 3, 3, 3, 4), (1, 1, 1), "SAME")]  # once per case
    assert _conv3d_dtypes(batch=5) == ["float32"] and len(probe.asked) == 2  # another batch: probed
    # symmetric padding runs a 4-deep VALID convolution: that is the case probed
    assert _conv3d_dtypes(padding="symmetric") == ["float32"]
    assert probe.asked[-1] == ((1, 4, 8, 8, 3), (3, 3, 3, 3, 4), (1, 1, 1), "VALID")
    # a GPU (a tf.device scope around the traced function, or a replica's device inside it)
    # keeps bf16 without asking
    asked = len(probe.asked)
    assert _conv3d_dtypes("/GPU:0") == ["bfloat16"]
    assert _conv3d_dtypes(inner="/job:localhost/replica:0/task:0/device:GPU:1") == ["bfloat16"]
    assert len(probe.asked) == asked
    # other shapes are never probed nor changed
    conv = Conv(4, 3, name="c3")
    conv.build((None, 4, 6, 6, 3))
    graph = tf.function(conv.forward).get_concrete_function(tf.TensorSpec((1, 4, 6, 6, 3), tf.bfloat16)).graph
    assert [op.get_attr("T").name for op in graph.get_operations() if op.type == "Conv3D"] == ["bfloat16"]
    assert len(probe.asked) == asked


def test_bf16_depth2_inference_computes_no_filter_gradient_and_stays_bf16(probe):
    probe.error = float("inf")
    conv = Conv(4, 3, name="c")
    conv.build((None, 2, 6, 6, 3))
    conv.is_train = False  # what model(x, is_train=False) sets on every layer
    graph = tf.function(conv.forward).get_concrete_function(tf.TensorSpec((1, 2, 6, 6, 3), tf.bfloat16)).graph
    assert [op.get_attr("T").name for op in graph.get_operations() if op.type == "Conv3D"] == ["bfloat16"]
    assert probe.asked == []


def test_bf16_depth2_stays_bf16_where_the_probe_finds_the_cpu_kernel_right(probe):
    from wrn3d_tl.layers import BF16_PROBE_TOLERANCE
    probe.error = BF16_PROBE_TOLERANCE / 2
    assert _conv3d_dtypes("/CPU:0") == ["bfloat16"]
    # an unknown batch cannot be probed: float32, which is always right
    assert _conv3d_dtypes(batch=None) == ["float32"]
    assert len(probe.asked) == 1


def test_bf16_filter_grad_probe_agrees_with_the_gradient_of_a_bf16_conv():
    """The real probe, on this machine's CPU: its verdict equals that of the filter
    gradient a bf16 convolution gets through autodiff, measured here against float32."""
    from wrn3d_tl.layers import BF16_PROBE_TOLERANCE, bf16_filter_grad_ok
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((4, 2, 8, 8, 16)), tf.float32)
    w = tf.constant(rng.standard_normal((3, 3, 3, 16, 8)), tf.float32)

    @tf.function
    def grad(x, w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            y = tf.nn.convolution(x, tf.cast(w, x.dtype), padding="SAME")
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cos(tf.range(8, dtype=tf.float32)))
        return tape.gradient(loss, w)
    exact, bf16 = grad(x, w).numpy(), grad(tf.cast(x, tf.bfloat16), w).numpy()
    error = np.linalg.norm(bf16 - exact) / np.linalg.norm(exact)
    right = bool(np.isfinite(error) and error < BF16_PROBE_TOLERANCE)
    assert bf16_filter_grad_ok((4, 2, 8, 8, 16), (3, 3, 3, 16, 8), (1, 1, 1), "SAME") is right
    assert bf16_filter_grad_ok((None, 2, 8, 8, 16), (3, 3, 3, 16, 8), (1, 1, 1), "SAME") is False


def test_tensorlayer_records_the_same_layer_arguments_without_reading_source(monkeypatch):
    """TensorLayer reads each new layer's arguments from its caller's frame through
    ``inspect.stack()``; wrn3d_tl.layers gives it the frames without looking up every
    frame's source (inspect.getmodule), which made model builds slow under deep stacks.
    The recorded arguments are the same either way, and a build looks up no source."""
    import inspect

    import tensorlayer.decorators.method_decorator as decorators

    from wrn3d_tl.model import WRNConfig, build_wrn

    cfg = WRNConfig(depth=10, widen_factor=2, input_shape=(4, 8, 8, 1), dropout=0.3)
    lookups = []
    getmodule = inspect.getmodule
    monkeypatch.setattr(inspect, "getmodule", lambda *a, **k: lookups.append(a) or getmodule(*a, **k))
    fast = build_wrn(cfg)
    assert lookups == []
    for module in (tl.layers.core, decorators):  # TensorLayer as released: inspect.stack() itself
        monkeypatch.setattr(module, "inspect", inspect)
    slow = build_wrn(cfg)
    assert lookups, "the real inspect.stack() looks up sources: this test no longer sees the difference"

    def args(model):
        return {layer.name: layer.layer_args for layer in [*model.all_layers, *leaf_layers(model)]}

    assert len(args(fast)) > 20 and args(fast) == args(slow)
