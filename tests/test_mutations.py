"""The mutation list of tests/mutation_check.py stays applicable to today's library."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mutation_check import MUTATIONS, ROOT, apply  # noqa: E402


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_once_and_names_existing_tests(mutation, tmp_path):
    target = tmp_path / mutation.path
    target.parent.mkdir(parents=True)
    original = open(os.path.join(ROOT, mutation.path), encoding="utf-8").read()
    target.write_text(original, encoding="utf-8")
    apply(mutation, str(tmp_path))
    mutated = target.read_text(encoding="utf-8")
    assert mutated != original and mutated.count(mutation.new) == original.count(mutation.new) + 1
    assert all(os.path.exists(os.path.join(ROOT, t)) for t in mutation.tests)
    with pytest.raises(ValueError, match=f"{mutation.name}: .* occurs 0 times"):
        apply(mutation, str(tmp_path))   # applied twice: refused, not a silent no-op
