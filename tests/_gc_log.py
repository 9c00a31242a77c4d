"""Timing of Python's full garbage collections in a test process (WRN3D_TEST_GC_LOG).

They were the suite's spikes: single collections of 15-100 s, 50-180 s per pytest worker in
7-11 minute runs on 2 cores, where the same tests alone collect in ~2 s. A full collection
frees, at once, the dropped Trainers (a Trainer sits in reference cycles) and their tf.data
iterators; py-spy and gdb showed each slow one waiting in an iterator's destructor for its
autotuning thread (RootDataset::Iterator joining Model::OptimizeLoop, which sleeps up to
60 s). conftest.py now turns tf.data's autotuning off in the test processes; collections
take ~6 s per worker in all.
"""

import atexit
import faulthandler
import gc
import os
import resource
import time


class GCLog:
    """Times every generation-2 collection; at exit writes ``{prefix}.{pid}``: the count, the
    total seconds, the peak resident memory and each collection over ``slow`` seconds with the test it interrupted
    (``self.test``, set by conftest). ``stacks``: a prefix for the Python stacks of the slow
    collections (faulthandler, after ``slow`` seconds)."""

    def __init__(self, prefix, stacks=None, slow=1.0):
        self.prefix, self.slow, self.test = prefix, slow, ""
        self.total, self.count, self.start, self.slow_ones = 0.0, 0, 0.0, []
        self.stacks = open(f"{stacks}.{os.getpid()}", "w") if stacks else None
        gc.callbacks.append(self._timer)
        atexit.register(self._write)

    def _timer(self, phase, info):
        if info["generation"] != 2:
            return
        if phase == "start":
            self.start = time.perf_counter()
            if self.stacks:
                faulthandler.dump_traceback_later(self.slow, file=self.stacks)
            return
        if self.stacks:
            faulthandler.cancel_dump_traceback_later()
        took = time.perf_counter() - self.start
        self.total += took
        self.count += 1
        if took > self.slow:
            self.slow_ones.append(f"  {took:.1f} s, {info['collected']} collected, in {self.test}")

    def _write(self):
        with open(f"{self.prefix}.{os.getpid()}", "w") as f:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            f.write(f"gen2 {self.count} collections, {self.total:.1f} s, objects {len(gc.get_objects())}, "
                    f"peak RSS {peak:.0f} MiB\n")
            f.writelines(line + "\n" for line in self.slow_ones)
