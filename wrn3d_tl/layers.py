"""TensorLayer layers for wide residual networks, one code path for 2D and 3D.

Tensors are channels-last: NHWC (batch, height, width, channels) for 2D and
NDHWC (batch, depth, height, width, channels) for 3D. The spatial rank of a
layer is read from its input at build time, so the same layer classes and the
same block builder serve both.
"""

import inspect
import math
import sys
import types

import tensorflow as tf
import tensorlayer as tl
import tensorlayer.decorators.method_decorator

from wrn3d_tl.validate import check_batch_shape, ensure_tuple_rep, layout, same_output_shape
from wrn3d_tl.config import PADDINGS

__all__ = ["HeNormal", "InputCheck", "BatchNorm", "Conv", "GlobalAvgPool", "WideBasicBlock", "leaf_layers",
           "variable_name", "checked_shape", "runs_on_cpu", "bf16_filter_grad_ok", "BF16_PROBE_TOLERANCE"]


def _frames(context=1):
    """``inspect.stack()`` as TensorLayer reads it: the caller's frame first, then outwards,
    as (frame, filename, lineno, function, None, None) entries without source lines."""
    frame, frames = sys._getframe(1), []
    while frame is not None:
        frames.append((frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None))
        frame = frame.f_back
    return frames


def _tensorlayer_without_source_lookups():
    """TensorLayer calls ``inspect.stack()`` twice per layer it makes, only to read a caller's
    frame and arguments, but ``inspect.stack()`` also finds the source line of every frame on
    the stack (``inspect.getmodule`` scans ``sys.modules`` for each): under pytest, a notebook
    or any deep call stack a WRN-10-1 took 0.3-1 s to build, against 30 ms. TensorLayer's two
    modules get an ``inspect`` whose ``stack`` returns the same frames without the lookups."""
    frames_only = types.ModuleType("inspect")
    frames_only.__dict__.update(inspect.__dict__)
    frames_only.stack = _frames
    tl.layers.core.inspect = frames_only
    tensorlayer.decorators.method_decorator.inspect = frames_only


_tensorlayer_without_source_lookups()


class HeNormal(tl.initializers.Initializer):
    """He (Kaiming) normal initialiser: N(0, sqrt(2 / fan_in)).

    ``fan_in`` is the product of every dimension but the last, which is the
    fan-in of a convolution kernel (k..., C_in, C_out) or a dense matrix
    (C_in, C_out); this matches the paper's PyTorch reference code
    (``kaiming_normal_`` on conv and linear weights).
    """

    def __init__(self, seed=None, dtype=tf.float32):
        self.seed = seed
        self.dtype = tf.as_dtype(dtype)

    def __call__(self, shape, dtype=None):
        fan_in = max(1, math.prod(shape[:-1]))
        weights = tf.random.normal(shape, stddev=math.sqrt(2.0 / fan_in), seed=self.seed)
        return tf.cast(weights, dtype or self.dtype)

    def get_config(self):
        return {"seed": self.seed, "dtype": self.dtype.name}


class InputCheck(tl.layers.Layer):
    """Passes a batch of shape (N,) + ``input_shape`` through unchanged; any other shape
    raises ValueError (as ``Trainer.train_step`` does). Without it a convolution stack
    accepts, e.g., one NDHWC volume without its batch axis and returns garbage.

    The check reads the static shape, so it costs nothing inside a compiled function;
    a shape unknown until run time is checked in the graph.
    """

    def __init__(self, input_shape, name=None):
        super().__init__(name)
        self.expected = tuple(int(d) for d in input_shape)

    def build(self, inputs_shape):
        pass

    def forward(self, inputs):
        if inputs.shape.rank is not None:
            check_batch_shape(inputs.shape.as_list(), self.expected, "model")
            return inputs
        return checked_shape(inputs, len(self.expected) - 1, self.expected[-1], self.expected[:-1],
                             f"model: x must have shape (batch,) + {self.expected}, got")


def checked_shape(x, rank, channels, spatial, message):
    """``x`` unchanged, behind an in-graph assert that it is ``(N,) + spatial + (channels,)``
    (``spatial`` None: any sizes on ``rank`` spatial axes): for shapes known only when the
    graph runs, as a SavedModel signature's are. Fails with ``message`` and the shape found."""
    got = tf.shape(x)
    want = list(spatial or []) + [channels]
    n = rank + 1                                   # spatial axes and channels
    tail = tf.pad(got[1:], [[0, n]])[:n]
    ok = tf.logical_and(tf.equal(tf.size(got), n + 1),
                        tf.reduce_all(tf.equal(tail[n - len(want):], tf.constant(want, tf.int32))))
    with tf.control_dependencies([tf.debugging.Assert(ok, [message, got], summarize=16)]):
        return tf.identity(x)


def _spatial_rank(inputs_shape, layer_name):
    rank = len(inputs_shape) - 2
    if rank not in (2, 3):
        raise ValueError(
            f"layer {layer_name!r}: expected a 4D NHWC or 5D NDHWC input, got shape {list(inputs_shape)}"
        )
    return rank


class BatchNorm(tl.layers.Layer):
    """Batch normalisation on TensorFlow's fused kernel, safe inside ``tf.function``.

    Input and output: float32, bfloat16 or float16 tensors of shape NHWC or NDHWC;
    statistics, ``gamma``/``beta`` and moving averages are float32 of shape (C,).

    Train mode (``is_train=True``) normalises with the batch statistics and updates
    ``moving_mean``/``moving_var`` by ``m <- decay * m + (1 - decay) * batch_stat``
    (the batch variance is the unbiased one, as in Torch and the paper's code).
    Eval mode normalises with the moving statistics. With ``sync=True`` the batch
    statistics are all-reduced over the replicas of a ``tf.distribute`` strategy.

    Moving statistics are ON_READ/MEAN variables, so each replica updates its own
    copy inside ``strategy.run`` and a cross-replica read gives their mean; eval mode on a
    replica normalises with that mean too.
    """

    def __init__(self, decay=0.9, epsilon=1e-5, act=None, sync=False, name=None):
        super().__init__(name, act=act)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"BatchNorm decay must be in [0, 1), got {decay!r}")
        if not epsilon > 0:
            raise ValueError(f"BatchNorm epsilon must be > 0, got {epsilon!r}")
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.sync = bool(sync)
        self.update_stats = True  # a recomputing block turns this off for its second pass

    def __repr__(self):
        return (f"BatchNorm(decay={self.decay}, epsilon={self.epsilon}, sync={self.sync}, "
                f"name='{self.name}')")

    def build(self, inputs_shape):
        self.rank = _spatial_rank(inputs_shape, self.name)
        channels = int(inputs_shape[-1])
        self.gamma = self._get_weights("gamma", shape=(channels,), init=tl.initializers.ones())
        self.beta = self._get_weights("beta", shape=(channels,), init=tl.initializers.zeros())
        self.moving_mean = self._moving_variable("moving_mean", tf.zeros([channels]))
        self.moving_var = self._moving_variable("moving_var", tf.ones([channels]))

    def _moving_variable(self, var_name, initial_value):
        var = tf.Variable(
            initial_value, name=f"{self.name}/{var_name}", trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.MEAN,
        )
        self._nontrainable_weights.append(var)
        return var

    def forward(self, inputs):
        if self.is_train:
            if self.sync:
                outputs, mean, var = self._sync_batch_norm(inputs)
            else:
                outputs, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
                    x=self._as_4d(inputs), scale=self.gamma, offset=self.beta,
                    mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
                    epsilon=self.epsilon, exponential_avg_factor=1.0,
                    data_format="NHWC", is_training=True)
                outputs = tf.reshape(outputs, tf.shape(inputs))
            # A static TensorLayer model runs every layer once while it is being wired
            # (on a dummy batch of ones); that pass must not move the statistics.
            if self._nodes_fixed and self.update_stats:
                self._update_moving(mean, var)
        else:
            mean, variance = self.moving_mean.read_value(), self.moving_var.read_value()
            ctx = tf.distribute.get_replica_context()
            if ctx is not None and ctx.num_replicas_in_sync > 1:
                # Each replica holds its own copy; a cross-replica read (checkpoints, one
                # device) gives their mean, and so must inference on a replica.
                mean, variance = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [mean, variance])
            outputs, *_ = tf.raw_ops.FusedBatchNormV3(
                x=self._as_4d(inputs), scale=self.gamma, offset=self.beta,
                mean=mean, variance=variance,
                epsilon=self.epsilon, exponential_avg_factor=1.0,
                data_format="NHWC", is_training=False)
            outputs = tf.reshape(outputs, tf.shape(inputs))
        # After the reshape back, not on the 4D view: there TensorFlow fuses batch norm and
        # ReLU (_FusedBatchNormEx), whose kernel turns overflowing activations finite, and a
        # volume whose logits overflow would no longer be refused (it saved ~0.5 ms of a 6 ms
        # WRN-10-2 bf16 inference batch).
        if self.act:
            outputs = self.act(outputs)
        return outputs

    def _as_4d(self, x):
        """NDHWC -> (N, D*H, W, C): the same per-channel statistics. FusedBatchNormV3
        accepts 5D input, but on CPU only oneDNN's 4D kernel is fast (its 5D gradient ran
        ~6x slower per element in our benchmark)."""
        if self.rank == 2:
            return x
        s = tf.shape(x)
        return tf.reshape(x, tf.stack([s[0], s[1] * s[2], s[3], s[4]]))

    def _update_moving(self, mean, var):
        mean = tf.stop_gradient(mean)
        var = tf.stop_gradient(var)
        self.moving_mean.assign(self.moving_mean * self.decay + mean * (1.0 - self.decay))
        self.moving_var.assign(self.moving_var * self.decay + var * (1.0 - self.decay))

    def _sync_batch_norm(self, inputs):
        """Batch statistics summed over every replica; returns (y, mean, unbiased var)."""
        x = tf.cast(inputs, tf.float32)
        axes = list(range(self.rank + 1))
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        local = tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], 0)
        ctx = tf.distribute.get_replica_context()
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local) if ctx is not None else local
        channels = self.gamma.shape[0]
        n = total[-1]
        mean = total[:channels] / n
        var = tf.maximum(total[channels:2 * channels] / n - tf.square(mean), 0.0)
        y = tf.nn.batch_normalization(x, mean, var, self.beta, self.gamma, self.epsilon)
        return tf.cast(y, inputs.dtype), mean, var * n / tf.maximum(n - 1.0, 1.0)


class Conv(tl.layers.Layer):
    """Bias-free convolution with He-normal weights, 2D (NHWC) or 3D (NDHWC).

    Input (N, [D,] H, W, C_in) -> output (N, [ceil(D/s_d),] ceil(H/s_h), ceil(W/s_w), n_filter),
    padding "same" (TensorFlow's "SAME") or "symmetric" (k // 2 on both sides, Torch's; the
    same output shape). The kernel is cast to the input's dtype, so the layer computes in
    bfloat16/float16 when fed low-precision activations.

    Args:
        n_filter: output channels.
        kernel_size: int (same on every axis) or a tuple, one per spatial axis.
        strides: int or tuple, one per spatial axis.
        kernel_dtype: the kernel variable's dtype: float32 (training), or bfloat16 for an
            inference copy fed bfloat16 input (no cast per call).

    In training mode on a CPU, a bfloat16 3D convolution over a 2-deep input with a 3-deep
    kernel at depth stride 1 computes in float32 where ``bf16_filter_grad_ok`` finds the
    CPU's bf16 filter gradient wrong for that exact shape (a oneDNN bug seen on an AMD EPYC
    with AVX512_BF16), or where the batch size is unknown. Inference computes no filter
    gradient and stays in bfloat16.
    """

    def __init__(self, n_filter, kernel_size=3, strides=1, padding="same", name=None, kernel_dtype=tf.float32):
        super().__init__(name)
        if padding not in PADDINGS:
            raise ValueError(f"Conv {name!r}: padding must be one of {PADDINGS}, got {padding!r}")
        if tf.as_dtype(kernel_dtype) not in (tf.float32, tf.bfloat16):
            raise ValueError(f"Conv {name!r}: kernel_dtype must be float32 or bfloat16, got {kernel_dtype!r}")
        self.n_filter = int(n_filter)
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.kernel_dtype = tf.as_dtype(kernel_dtype)

    def __repr__(self):
        return (f"Conv(n_filter={self.n_filter}, kernel_size={self.kernel_size}, "
                f"strides={self.strides}, kernel_dtype={self.kernel_dtype.name}, name='{self.name}')")

    def build(self, inputs_shape):
        rank = _spatial_rank(inputs_shape, self.name)
        self._kernel = ensure_tuple_rep(self.kernel_size, rank, f"{self.name}: kernel_size")
        self._strides = ensure_tuple_rep(self.strides, rank, f"{self.name}: strides")
        shape = self._kernel + (int(inputs_shape[-1]), self.n_filter)
        self.W = self._get_weights("kernel", shape=shape, init=HeNormal(dtype=self.kernel_dtype))
        # Explicit: with data_format=None the eager Conv3D gradient fails on TF 2.21.
        self.data_format = layout(rank)

    def forward(self, inputs):
        dtype = inputs.dtype
        padding = "SAME"
        if self.padding == "symmetric" and any(k > 1 for k in self._kernel):
            # Torch's padding: k // 2 on both sides of every spatial axis, then "VALID".
            inputs = tf.pad(inputs, [[0, 0]] + [[k // 2, k // 2] for k in self._kernel] + [[0, 0]])
            padding = "VALID"
        if dtype == tf.bfloat16 and self.is_train and self._suspect_bf16_filter_grad(inputs.shape) \
                and runs_on_cpu(inputs) \
                and not bf16_filter_grad_ok(inputs.shape, self.W.shape, self._strides, padding):
            # TF 2.21's oneDNN bf16 Conv3DBackpropFilter returns NaN/garbage for an input
            # depth of 2 with a 3-deep kernel at stride 1 on some CPUs (AVX512-BF16 without
            # AMX); where the probe finds that, the layer trains in float32 instead.
            inputs = tf.cast(inputs, tf.float32)
        outputs = tf.nn.convolution(inputs, tf.cast(self.W, inputs.dtype), strides=self._strides, padding=padding,
                                    data_format=self.data_format)
        return tf.cast(outputs, dtype)

    def _suspect_bf16_filter_grad(self, shape):
        """The case oneDNN got wrong: 3D, a depth of 2 (4 once symmetric-padded), a 3-deep
        kernel at depth stride 1. Only such convolutions are probed (15-120 ms a probe)."""
        return (len(shape) == 5 and self._kernel[0] == 3 and self._strides[0] == 1
                and shape[1] == (4 if self.padding == "symmetric" else 2))


# (input shape, kernel shape, strides, padding) -> whether bf16 is right; one probe per process.
_BF16_FILTER_GRAD_OK = {}
# Relative L2 error: between bf16 rounding through oneDNN or Eigen and the oneDNN bug's error
# (measured: docs/performance.md, "The depth-2 float32 workaround").
BF16_PROBE_TOLERANCE = 0.1


@tf.autograph.experimental.do_not_convert  # runs eagerly, whatever graph is being traced
def bf16_filter_grad_ok(input_shape, kernel_shape, strides, padding):
    """Whether this CPU's bf16 ``Conv3DBackpropFilterV2`` is right for exactly this case.

    Runs the filter gradient once in bfloat16 and once in float32 on random NDHWC data of
    ``input_shape`` (batch included), the kernel ``kernel_shape`` (kd, kh, kw, C_in, C_out),
    ``strides`` (3 ints) and ``padding`` ("SAME"/"VALID"), on the CPU, outside any graph
    being traced; bf16 is right when its result is finite and within
    ``BF16_PROBE_TOLERANCE`` relative L2 error of float32. The answer is cached per
    process. An unknown dimension (e.g. a batch of None) answers False: the probe needs
    the exact shape, and float32 is always right.
    """
    shape = tf.TensorShape(input_shape)
    if not shape.is_fully_defined():
        return False
    key = (tuple(shape.as_list()), tuple(kernel_shape), tuple(strides), padding)
    if key not in _BF16_FILTER_GRAD_OK:
        _BF16_FILTER_GRAD_OK[key] = _bf16_filter_grad_error(*key) < BF16_PROBE_TOLERANCE
    return _BF16_FILTER_GRAD_OK[key]


def _bf16_filter_grad_error(input_shape, kernel_shape, strides, padding):
    """Relative L2 error of the bf16 filter gradient against float32 (inf if not finite)."""
    with tf.init_scope(), tf.device("/CPU:0"):
        x = tf.random.stateless_normal(input_shape, seed=[1, 2])
        w = tf.random.stateless_normal(kernel_shape, seed=[3, 4])
        out_shape = tf.nn.convolution(x, w, strides=strides, padding=padding, data_format="NDHWC").shape
        dy = tf.random.stateless_normal(out_shape, seed=[5, 6])
        grads = {}
        for dtype in (tf.float32, tf.bfloat16):
            # A graph, as in training, so that the graph rewrite picks the same oneDNN kernel.
            fn = tf.function(lambda x, dy: tf.raw_ops.Conv3DBackpropFilterV2(
                input=x, filter_sizes=kernel_shape, out_backprop=dy, strides=(1,) + tuple(strides) + (1,),
                padding=padding, data_format="NDHWC")).get_concrete_function(
                    tf.TensorSpec(x.shape, dtype), tf.TensorSpec(dy.shape, dtype))
            grads[dtype] = tf.cast(fn(tf.cast(x, dtype), tf.cast(dy, dtype)), tf.float32)
        exact = grads[tf.float32]
        error = tf.norm(grads[tf.bfloat16] - exact) / tf.maximum(tf.norm(exact), 1e-30)
        return float(error) if bool(tf.math.is_finite(error)) else math.inf


def runs_on_cpu(tensor):
    """Whether an op on ``tensor`` made here runs on a CPU: the device a probe op gets
    (eagerly, where it ran; in a graph, the replica's or an inner ``tf.device`` scope), else
    the ``tf.device`` scope a ``tf.function`` is traced under, else the default placement (a
    GPU when TensorFlow sees one)."""
    device = tf.identity(tensor).device or _traced_under()
    kind = tf.DeviceSpec.from_string(device).device_type if device else None
    if kind:
        return kind == "CPU"
    return not tf.config.list_logical_devices("GPU")


def _traced_under():
    try:  # a function graph's ops carry no device; the scope it is traced in is the eager context's
        from tensorflow.python.eager import context
        return context.context().device_name or ""
    except (ImportError, AttributeError):  # pragma: no cover - moved in some future TF
        return ""


class GlobalAvgPool(tl.layers.Layer):
    """Mean over every spatial axis: (N, [D,] H, W, C) -> (N, C) float32.

    The cast to float32 is where a mixed-precision network returns to full precision,
    so logits and the loss are always float32.
    """

    def build(self, inputs_shape):
        self.rank = _spatial_rank(inputs_shape, self.name)

    def forward(self, inputs):
        return tf.reduce_mean(tf.cast(inputs, tf.float32), axis=list(range(1, self.rank + 1)))


class WideBasicBlock(tl.layers.Layer):
    """The pre-activation wide basic block, 2D or 3D, as one TensorLayer layer.

    Input (N, [D,] H, W, C_in) -> output (N, [ceil(D/s),] ceil(H/s), ceil(W/s), out_channels),
    in the input's dtype. Residual branch: BN-ReLU -> conv 3 per axis (stride) -> BN-ReLU
    -> [dropout] -> conv 3. Shortcut: the identity, or with ``projection=True`` a
    1-per-axis conv with the block's stride applied to the first BN-ReLU output, as in the
    paper's reference code. Which blocks project is the model's plan
    (``wrn3d_tl.config.WRNConfig.blocks``), not decided here. Sub-layers are named
    ``{name}/bn1``, ``{name}/conv1``, ``{name}/bn2``, ``{name}/dropout``, ``{name}/conv2``,
    ``{name}/shortcut`` (see ``leaf_layers``).

    With ``recompute=True`` the block keeps only its input for the backward pass and
    recomputes its activations there (``tf.recompute_grad``): less memory, more compute.
    ``kernel_dtype`` is its convolutions' (see ``Conv``).
    """

    def __init__(self, out_channels, strides=1, dropout=0.0, *, projection, name, bn_decay=0.9, bn_epsilon=1e-5,
                 sync_bn=False, recompute=False, padding="same", kernel_dtype=tf.float32):
        super().__init__(name)
        if recompute and dropout > 0:
            raise ValueError(f"block {name!r}: recompute=True needs dropout == 0 (a recomputed dropout mask "
                             f"would differ from the forward one), got dropout={dropout}")
        self.out_channels = int(out_channels)
        self.strides = strides
        self.dropout = float(dropout)
        self.recompute = bool(recompute)
        bn = dict(decay=bn_decay, epsilon=bn_epsilon, sync=sync_bn, act=tf.nn.relu)
        self.bn1 = BatchNorm(name=f"{name}/bn1", **bn)
        conv = dict(padding=padding, kernel_dtype=kernel_dtype)
        self.conv1 = Conv(out_channels, 3, strides, name=f"{name}/conv1", **conv)
        self.bn2 = BatchNorm(name=f"{name}/bn2", **bn)
        self.drop = tl.layers.Dropout(keep=1.0 - dropout, name=f"{name}/dropout") if dropout > 0 else None
        self.conv2 = Conv(out_channels, 3, 1, name=f"{name}/conv2", **conv)
        self.shortcut = Conv(out_channels, 1, strides, name=f"{name}/shortcut", **conv) if projection else None
        self._forward_calls = 0

    def __repr__(self):
        return (f"WideBasicBlock(out_channels={self.out_channels}, strides={self.strides}, "
                f"dropout={self.dropout}, projection={self.shortcut is not None}, recompute={self.recompute}, "
                f"name='{self.name}')")

    def build(self, inputs_shape):
        rank = _spatial_rank(inputs_shape, self.name)
        strides = ensure_tuple_rep(self.strides, rank, f"{self.name}: strides")
        inner = [inputs_shape[0]] + list(same_output_shape(inputs_shape[1:-1], strides)) + \
            [self.out_channels]
        plan = [(self.bn1, inputs_shape), (self.conv1, inputs_shape), (self.bn2, inner), (self.conv2, inner)]
        if self.shortcut is not None:
            plan.append((self.shortcut, inputs_shape))
        for layer, shape in plan:
            layer.build(shape)
            layer._built = True
        self._layers = [layer for layer, _ in plan] + ([self.drop] if self.drop else [])

    def _set_mode_for_layers(self, is_train):
        self.is_train = is_train
        for layer in self._layers or []:
            layer._set_mode_for_layers(is_train)

    def _fix_nodes_for_layers(self):
        self._nodes_fixed = True
        for layer in self._layers or []:
            layer._fix_nodes_for_layers()

    def _body(self, x):
        # Under recompute the body runs again in the backward pass; only the first run
        # of a step may move the BN statistics.
        first = self._forward_calls == 0
        self._forward_calls += 1
        for bn in (self.bn1, self.bn2):
            bn.update_stats = first
        pre = self.bn1.forward(x)
        y = self.bn2.forward(self.conv1.forward(pre))
        if self.drop is not None:
            y = self.drop.forward(y)
        y = self.conv2.forward(y)
        return y + (self.shortcut.forward(pre) if self.shortcut is not None else x)

    def forward(self, inputs):
        self._forward_calls = 0
        if self.recompute and self.is_train:
            return tf.recompute_grad(self._body)(inputs)
        return self._body(inputs)


def variable_name(var):
    """A variable's hierarchical name without TensorFlow's ":0" suffix, e.g.
    ``"group2/block1/conv1/kernel"``: the key of weights in checkpoints."""
    return var.name.split(":")[0]


def leaf_layers(model_or_layer):
    """Every non-composite layer of a TensorLayer model or layer, in order (blocks are
    expanded into their sub-layers): what to search by name, e.g. ``group2/block1/conv1``."""
    layers = model_or_layer.all_layers if hasattr(model_or_layer, "all_layers") else [model_or_layer]
    out = []
    for layer in layers:
        out.extend(layer._layers if isinstance(layer, WideBasicBlock) else [layer])
    return out
