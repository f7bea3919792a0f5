"""Stage plumbing: atomic outputs and described Parquet tables."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from stages.artifacts import staged_output, write_parquet


def test_failed_stage_leaves_no_output(tmp_path):
    final = tmp_path / "outputs" / "distill"
    final.mkdir(parents=True)
    (final / "synset.pt").write_text("stale from an earlier run")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(final) as out:
            (out / "synset.pt").write_text("half written")
            raise RuntimeError("boom")
    assert not final.exists() and not list((tmp_path / "outputs").iterdir())


def test_successful_stage_replaces_output(tmp_path):
    final = tmp_path / "outputs" / "cluster"
    final.mkdir(parents=True)
    (final / "old.parquet").write_text("old")
    with staged_output(final) as out:
        (out / "new.parquet").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.parquet"]


def test_parquet_carries_its_column_meanings(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(pd.DataFrame({"cluster_id": [0, 1]}), path, "clusters", {"cluster_id": "the cluster"})
    meta = pq.read_schema(path).metadata
    assert meta[b"description"] == b"clusters" and json.loads(meta[b"columns"]) == {"cluster_id": "the cluster"}
    with pytest.raises(ValueError, match=r"\['size'\]"):
        write_parquet(pd.DataFrame({"cluster_id": [0]}), path, "x", {"cluster_id": "c", "size": "n"})
