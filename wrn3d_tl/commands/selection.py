"""How ``wrn3d-train`` picks its model: the validation score by ``--select`` after every
evaluation, ``best.h5`` beside ``last.h5``, early stopping by ``--patience``, and the state
(``selection.json``) a resumed run goes on from."""

import json
import math
import os
import shutil

from wrn3d_tl.files import written_atomically

__all__ = ["SELECT", "Selection", "train_and_select", "write_json"]

# --select: the validation metric, and whether larger is better.
SELECT = {"accuracy": True, "auc": True, "loss": False}


def write_json(path, value):
    from wrn3d_tl.evaluation import json_safe

    with written_atomically(path, makedirs=True) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(json_safe(value), fh, indent=1, allow_nan=False)
    return path


class Selection:
    """The best validation score so far by ``metric`` and how many evaluations since it; kept
    in ``selection.json`` beside ``best.h5`` so that ``--resume`` goes on where it was."""

    def __init__(self, run_dir, metric, patience):
        self.path, self.metric, self.patience = os.path.join(run_dir, "selection.json"), metric, patience
        self.best_step = self.best = None
        self.since = 0
        self.history = []

    def load(self, step, best_checkpoint):
        """Go on from the state saved with the run, resumed at ``step``: evaluations after it
        (a resume from an older checkpoint) are dropped and the best is found again among the
        rest; when ``best_checkpoint`` no longer holds that best, the next evaluation writes it."""
        from wrn3d_tl.checkpoint import read_checkpoint

        with open(self.path, encoding="utf-8") as fh:
            state = json.load(fh)
        if state["metric"] != self.metric:
            raise ValueError(f"--select {self.metric}: the run selects by {state['metric']}; resume with it")
        for entry in state["history"]:
            if entry["step"] <= step:
                self.record(entry["step"], entry)
        if self.best_step is not None and (not os.path.exists(best_checkpoint)
                                           or read_checkpoint(best_checkpoint)["step"] != self.best_step):
            print(f"best.h5 does not hold step {self.best_step}, the best evaluation up to step {step}: the next "
                  "evaluation writes it", flush=True)
            self.best_step = self.best = None
        return self

    def better(self, value):
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if SELECT[self.metric] else value < self.best

    def record(self, step, result):
        """Note one evaluation; True when it is the best so far."""
        value = result[self.metric]
        value = float("nan") if value is None else float(value)
        self.history.append({"step": step, **{k: result[k] for k in ("loss", "accuracy", "auc")}})
        if self.better(value):
            self.best_step, self.best, self.since = step, value, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self):
        return bool(self.patience) and self.since >= self.patience

    def save(self):
        write_json(self.path, {"metric": self.metric, "best_step": self.best_step, "best": self.best,
                                "since": self.since, "history": self.history})


def train_and_select(trainer, steps, val, selection, run_dir, eval_every):
    """Train to ``steps``, evaluating ``val`` every ``eval_every`` steps and at the end; the
    best evaluation by the selection's metric writes ``best.h5``, every one ``last.h5`` and
    ``selection.json`` (without ``val``, ``last.h5`` is still written every ``eval_every``
    steps). Stops early after ``patience`` evaluations without a better score."""
    last, best = os.path.join(run_dir, "last.h5"), os.path.join(run_dir, "best.h5")

    def save_last(selected=False):
        trainer.save(last)
        if selected:   # the same state: a byte copy of the file just written, replaced atomically
            with written_atomically(best) as tmp:
                shutil.copyfile(last, tmp)

    def on_step(metrics):
        if eval_every and metrics["step"] % eval_every == 0:
            save_last()

    def on_eval(step, result):
        improved = selection.record(step, result)
        print(f"val   step {step}  loss {result['loss']:.4f}  acc {result['accuracy']:.4f}  auc {result['auc']:.4f}"
              + ("  (best)" if improved else f"  (best: step {selection.best_step})"), flush=True)
        save_last(selected=improved)
        selection.save()
        return selection.stop

    stopped = selection.stop
    if not stopped:
        if val is None:
            trainer.fit(steps, on_step=on_step)
        else:
            trainer.fit(steps, eval_data=val, eval_every=eval_every, on_eval=on_eval)
        stopped = trainer.step < steps
    if not stopped and val is not None and not (selection.history and selection.history[-1]["step"] == trainer.step):
        on_eval(trainer.step, trainer.evaluate(val))   # the last step, unless evaluated already
    if val is not None and selection.best_step is None:
        print(f"!!! no validation {selection.metric} was finite (e.g. an AUC of a validation set holding one "
              "class): the last step is the selected model !!!", flush=True)
    if val is None or selection.best_step is None:
        save_last(selected=True)
        selection.best_step = trainer.step
    return stopped
