"""The optimizer of the paper's code: SGD with Nesterov momentum in Torch's semantics, the
learning-rate schedules, and dynamic loss scaling for fp16.

Torch's SGD (which the paper's code uses), per weight ``w`` with gradient ``g``::

    g <- g + weight_decay * w            (convolution and dense kernels only)
    v <- momentum * v + g
    w <- w - lr * (g + momentum * v)     (nesterov=True; otherwise w <- w - lr * v)

Every variable here is float32 and is created in the caller's strategy scope.
"""

import functools
import math
import re

import tensorflow as tf

from wrn3d_tl.layers import variable_name

__all__ = ["SGD", "LossScale", "scheduled_lr", "SCHEDULES", "FP16_MAX_FLOOR_SKIPS"]

SCHEDULES = ("constant", "step", "cosine")
_DECAYED = re.compile(r"/(kernel|weights)(:\d+)?$")  # conv and dense kernels: the paper's L2

# A healthy fp16 run overflows now and then and the scale halves; a diverging one keeps
# overflowing at the smallest scale (1.0, i.e. unscaled). After this many consecutive
# non-finite steps at that scale the run is declared diverged (FloatingPointError).
FP16_MAX_FLOOR_SKIPS = 10


def scheduled_lr(step, *, base_lr, schedule, total_steps, warmup_steps):
    """The learning rate of the 0-based ``step`` (a float).

    Linear warm-up over ``warmup_steps`` steps to ``base_lr``, then ``schedule``:
    "constant"; "step" (x0.2 at 30%, 60% and 80% of ``total_steps``, the paper's);
    "cosine" (from ``base_lr`` at the end of warm-up to 0 at ``total_steps``).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "step":
        return base_lr * 0.2 ** sum(step >= f * total_steps for f in (0.3, 0.6, 0.8))
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(step - warmup_steps, span) / span
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return base_lr


class SGD:
    """SGD with (Nesterov) momentum and L2 weight decay on kernels, Torch semantics.

    ``weights``: the trainable variables; one float32 momentum buffer per weight
    (``slots``, named ``<weight>/momentum``) and the learning rate ``lr`` (a scalar
    variable, so changing it does not retrace a compiled step) are created here.
    """

    def __init__(self, weights, *, lr, momentum, nesterov, weight_decay):
        self.weights = list(weights)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.decay_mask = [bool(_DECAYED.search(w.name)) for w in self.weights]
        self.slots = [tf.Variable(tf.zeros_like(w), trainable=False, name=variable_name(w) + "/momentum")
                      for w in self.weights]
        self.lr = tf.Variable(float(lr), trainable=False, dtype=tf.float32, name="learning_rate")

    def apply(self, strategy, grads, ok, unscale=None):
        """Cross-replica context: one update per weight from the summed ``grads``, skipped
        (weights and momentum untouched) where the scalar bool ``ok`` is False.
        ``unscale``: a function applied to each gradient first (fp16 loss scaling)."""
        def update_all():
            for w, g, slot, decay in zip(self.weights, grads, self.slots, self.decay_mask):
                strategy.extended.update(w, functools.partial(self._update, unscale=unscale),
                                         args=(g, slot, decay), group=False)
            return tf.constant(True)

        # One branch for the whole update: a skipped step costs nothing, a taken one no
        # per-weight selects.
        tf.cond(ok, update_all, lambda: tf.constant(False))

    def _update(self, w, g, slot, decay, unscale):
        if unscale is not None:
            g = unscale(g)
        if decay and self.weight_decay:
            g = g + self.weight_decay * w
        # One fused kernel per weight, in Torch's semantics: v <- m v + g, then
        # w <- w - lr (g + m v) (Nesterov) or w <- w - lr v.
        return tf.raw_ops.ResourceApplyMomentum(
            var=w.handle, accum=slot.handle, lr=tf.convert_to_tensor(self.lr), grad=g,
            momentum=tf.constant(self.momentum), use_nesterov=self.nesterov)


class LossScale:
    """Dynamic loss scaling for fp16 (a no-op scale of 1 when ``enabled`` is False).

    The loss is multiplied by ``scale`` before the backward pass and the gradients are
    divided by it. A non-finite step halves the scale (down to 1.0) and the update is
    skipped; 2000 finite steps in a row double it. ``floor_skips`` counts consecutive
    non-finite steps taken at the floor; ``diverged()`` is True once it reaches
    ``FP16_MAX_FLOOR_SKIPS``.
    """

    INITIAL = 2.0 ** 15
    FLOOR = 1.0
    GROWTH_INTERVAL = 2000

    def __init__(self, enabled):
        self.enabled = bool(enabled)
        self.scale = tf.Variable(self.INITIAL if enabled else 1.0, trainable=False, name="loss_scale")
        self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64, name="loss_scale_good_steps")
        self.floor_skips = tf.Variable(0, trainable=False, dtype=tf.int64, name="loss_scale_floor_skips")

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    def unscale(self, grad):
        return grad / self.scale

    def update(self, ok, counts=True):
        """After a step: adjust the scale by whether the step was finite (cross-replica).
        ``counts`` (a bool tensor): False leaves the scale alone, for a step refused for its
        inputs, which says nothing about the scale."""
        at_floor = self.scale <= self.FLOOR
        grow = tf.logical_and(ok, self.good_steps >= self.GROWTH_INTERVAL - 1)
        new = (tf.where(tf.logical_or(ok, tf.logical_not(at_floor)), tf.zeros_like(self.floor_skips),
                        self.floor_skips + 1),
               tf.where(ok, tf.where(grow, self.scale * 2.0, self.scale), tf.maximum(self.scale / 2.0, self.FLOOR)),
               tf.where(tf.logical_and(ok, tf.logical_not(grow)), self.good_steps + 1, tf.zeros_like(self.good_steps)))
        for var, value in zip((self.floor_skips, self.scale, self.good_steps), new):
            var.assign(tf.where(counts, value, var))

    def diverged(self):
        """True after ``FP16_MAX_FLOOR_SKIPS`` consecutive non-finite steps at the floor (a host read)."""
        return self.enabled and int(self.floor_skips.numpy()) >= FP16_MAX_FLOOR_SKIPS

    def state(self):
        """The checkpoint's ``state`` entries (numpy scalars)."""
        return {"loss_scale": self.scale.numpy(), "loss_scale_good_steps": self.good_steps.numpy(),
                "loss_scale_floor_skips": self.floor_skips.numpy()}

    def load_state(self, state):
        self.scale.assign(state.get("loss_scale", self.scale.numpy()))
        self.good_steps.assign(state.get("loss_scale_good_steps", 0))
        self.floor_skips.assign(state.get("loss_scale_floor_skips", 0))
