"""The inference side loads models without the trainer (wrn3d_tl.loading)."""

import os
import subprocess
import sys

USE = """
import sys
import numpy as np
from wrn3d_tl.export import export_saved_model
from wrn3d_tl.explain import grad_cam
from wrn3d_tl.predict import Predictor
p = Predictor(sys.argv[1])
x = np.zeros((2, 2, 8, 8, 1), np.float32)
out = p.predict(x)
cams = grad_cam(p, x)
export_saved_model(sys.argv[1], sys.argv[2])
print(all(n in ("a", "b", "c") for n in out["class_name"]) and len(out["class_name"]) == 2, cams.shape)
print(sorted(m for m in sys.modules if m in ("wrn3d_tl.train", "wrn3d_tl.optim", "wrn3d_tl.logs")))
"""


def test_predict_explain_and_export_never_import_the_trainer(tmp_path):
    from wrn3d_tl.model import WRNConfig, build_wrn
    from wrn3d_tl.train import Trainer

    ckpt = str(tmp_path / "c.h5")
    cfg = WRNConfig(depth=10, widen_factor=1, num_classes=3, input_shape=(2, 8, 8, 1))
    Trainer(build_wrn(cfg), lr=0.1, verbose=False, class_names=["a", "b", "c"]).save(ckpt)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", USE, ckpt, str(tmp_path / "served")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "True (2, 2, 8, 8)"
    assert lines[-1] == "[]", "the inference side imported the trainer"
