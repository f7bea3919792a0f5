"""A committed benchmark reproduces: digits_k20 rerun from scratch (a fresh project, an empty retraining cache)
gives every number of benchmarks/results/quality.json that is not a time. Slow (~15 minutes): `make test-all`."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_digits_k20_reproduces_its_committed_numbers(tmp_path):
    from quality import RESULT, run_config
    from reproduce import compare

    committed = json.loads(RESULT.read_text())["digits_k20"]["report"]
    fresh = run_config("digits_k20", folder=tmp_path / "project", cache=tmp_path / "cache")["report"]
    found = compare(committed, fresh)
    assert found["compared"] > 100 and not found["differing"], found["differing"]
