"""Atomic writes (wrn3d_tl.files): the old file or the new one, never half of one; and every
file the library writes goes through them."""

import ast
import os
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from wrn3d_tl import files
from wrn3d_tl.files import save_figure, temporary_path, written_atomically

PACKAGE = Path(__file__).resolve().parent.parent / "wrn3d_tl"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with written_atomically(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with written_atomically(path) as tmp:
        assert tmp == temporary_path(path) and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_data_and_rename_are_synced_and_folders_made_on_request(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    path = tmp_path / "new" / "deeper" / "b.txt"
    with pytest.raises(FileNotFoundError):
        with written_atomically(path) as tmp:
            open(tmp, "w").write("x")
    with written_atomically(path, makedirs=True) as tmp:
        open(tmp, "w").write("x")
    assert path.read_text() == "x"
    assert synced == [temporary_path(path), str(path.parent)]   # the data, then the folder's rename
    synced.clear()
    with written_atomically(path, fsync=False) as tmp:
        open(tmp, "w").write("y")
    assert synced == [] and path.read_text() == "y"


def test_save_figure_writes_the_format_of_the_extension(tmp_path):
    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    png = save_figure(fig, tmp_path / "f" / "a.png", dpi=20)
    svg = save_figure(fig, tmp_path / "f" / "a.svg")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and b"<svg" in open(svg, "rb").read(400)
    assert sorted(os.listdir(tmp_path / "f")) == ["a.png", "a.svg"]


def _writes(tree):
    """(line, what) of every call that opens a file for writing or saves a figure."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        mode = next((a.value for a in node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)), "r")
        if name == "savefig" or (name in ("open", "File") and set(mode) & set("wx+")):
            target = node.args[0] if node.args else None
            found.append((node.lineno, name, target.id if isinstance(target, ast.Name) else ast.unparse(target)))
    return sorted(found)


def test_every_file_the_library_writes_goes_through_written_atomically():
    """Each write names the temporary of written_atomically (``tmp``); appending to a log
    is the one exception (MetricsLogger's metrics.csv, one row at a time)."""
    stray = [f"{path.relative_to(PACKAGE)}:{line} {name}({target})"
             for path in sorted(PACKAGE.rglob("*.py"))
             for line, name, target in _writes(ast.parse(path.read_text(encoding="utf-8")))
             if target != "tmp"]
    assert stray == []


def test_the_write_finder_sees_a_direct_write():
    tree = ast.parse("open(path, 'w').write(x)\nfig.savefig(out)\nh5py.File(tmp, 'w')\nopen(p).read()\n")
    assert _writes(tree) == [(1, "open", "path"), (2, "savefig", "out"), (3, "File", "tmp")]
