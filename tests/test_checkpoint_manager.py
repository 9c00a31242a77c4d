"""CheckpointManager: naming, keep-N, newest verified (damaged skipped and reported), and
temporary files: only this host's, only when their writer is gone."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from wrn3d_tl.checkpoint import (CheckpointManager, read_checkpoint, remove_stale_temporaries, temporary_path,
                                 write_checkpoint)


def write(path, step):
    return write_checkpoint(path, config={"depth": 10}, trainer={}, step=step, normalization=None,
                            weights={"w": np.full(3, step, np.float32)}, optimizer={})


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_naming_listing_and_keep_n(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep=2)
    assert mgr.checkpoints() == [] and mgr.latest() is None
    for step in (3, 12, 7):
        write(mgr.path_for(step), step)
    write(tmp_path / "run" / "last.h5", 12)  # not a periodic checkpoint
    assert os.path.basename(mgr.path_for(12)) == "ckpt-00000012.h5"
    assert [s for s, _ in mgr.checkpoints()] == [3, 7, 12] and mgr.latest() == mgr.path_for(12)
    assert mgr.prune() == [mgr.path_for(3)]
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt-00000007.h5", "ckpt-00000012.h5", "last.h5"]
    assert CheckpointManager(tmp_path / "run", keep=None).prune() == []
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def test_newest_verified_skips_and_reports_damaged_files(tmp_path):
    lines = []
    mgr = CheckpointManager(tmp_path, report=lines.append)
    for step in (1, 2, 3):
        write(mgr.path_for(step), step)
    with open(mgr.path_for(3), "r+b") as f:  # one flipped byte in the newest
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert mgr.latest() == mgr.path_for(3)  # by name
    assert mgr.newest_verified() == mgr.path_for(2)
    assert len(lines) == 1 and "skipping damaged checkpoint" in lines[0] and "ckpt-00000003.h5" in lines[0]
    # a run's final file counts by its stored step; a missing one is ignored
    write(tmp_path / "last.h5", 5)
    assert mgr.newest_verified(also=[tmp_path / "last.h5", tmp_path / "absent.h5"]) == str(tmp_path / "last.h5")
    write(tmp_path / "old.h5", 1)
    assert mgr.newest_verified(also=[tmp_path / "old.h5"]) == mgr.path_for(2)
    assert CheckpointManager(tmp_path / "none").newest_verified() is None


def test_temporaries_of_other_hosts_and_live_writers_are_kept(tmp_path):
    host = socket.gethostname()
    gone = dead_pid()
    names = {
        "mine_dead": f".ckpt-00000001.h5.tmp-{host}-{gone}",
        "mine_alive": f".ckpt-00000002.h5.tmp-{host}-{os.getppid()}",
        "mine_now": os.path.basename(temporary_path(tmp_path / "ckpt-00000003.h5")),
        # the same dead pid, but written by another machine on a shared filesystem
        "other_host": f".ckpt-00000004.h5.tmp-{host}-worker-2-{gone}",
        "other_host_dotted": f".last.h5.tmp-node7.cluster.local-{gone}",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    assert names["mine_now"] == f".ckpt-00000003.h5.tmp-{host}-{os.getpid()}"
    removed = CheckpointManager(tmp_path).remove_stale_temporaries()
    assert removed == [names["mine_dead"]]
    left = set(os.listdir(tmp_path))
    assert left == set(names.values()) - {names["mine_dead"]}
    # a checkpoint write cleans up the same way, and leaves no temporary of its own
    (tmp_path / names["mine_dead"]).write_bytes(b"partial")
    write(tmp_path / "ckpt-00000009.h5", 9)
    assert set(os.listdir(tmp_path)) == left | {"ckpt-00000009.h5"}
    assert read_checkpoint(tmp_path / "ckpt-00000009.h5")["step"] == 9
    assert remove_stale_temporaries(str(tmp_path)) == []
