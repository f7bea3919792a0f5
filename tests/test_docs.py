"""The documentation: generated files in sync with their sources, every params key documented, every link inside the
repository and resolving, the README's first lines and length."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from ddm_ops.config import DistillParams, Params
from pipeline import docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+\s+(.+)$", FENCE.sub("", page.read_text()), re.M):
        slug = github_slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Links and images of `page` that leave the repository, miss their file, or miss their #anchor."""
    problems = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        path, _, anchor = target.partition("#")
        if re.match(r"^[a-z][a-z0-9+.-]*:", path):
            problems.append(f"{target}: points outside the repository")
            continue
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return problems


def test_generated_files_are_current():
    assert docs.stale() == [], "run `python -m pipeline.docs` (make docs)"
    assert docs.main(["--check"]) == 0


def test_check_names_a_stale_file_and_writes_nothing(tmp_path, capsys):
    for part in ("README.md", "docs", "benchmarks/results"):
        src = ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / part)
    results = tmp_path / "docs" / "results.md"
    results.write_text(results.read_text().replace("| `ddm` |", "| `ddm (edited)` |"))
    before = results.read_text()
    assert docs.main(["--check"], root=tmp_path) == 1
    assert "stale: docs/results.md" in capsys.readouterr().err
    assert results.read_text() == before
    assert docs.main([], root=tmp_path) == 0
    assert docs.main(["--check"], root=tmp_path) == 0


def test_readme_block_follows_the_results(tmp_path):
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    peers = tmp_path / "benchmarks" / "results" / "peers.json"
    results = json.loads(peers.read_text())
    next(m for m in results["digits_k50"]["methods"] if m["method"] == "ddm")["group-LDS"] = 0.123456
    peers.write_text(json.dumps(results))
    assert tmp_path / "README.md" in docs.stale(tmp_path)
    assert "| `ddm` | 0.123 |" in docs.expected(tmp_path)[tmp_path / "README.md"]


def test_headline_says_who_wins_from_the_numbers():
    """The generality line ranks DDM among the methods of the other quality configs; the mislabelled-data line's
    verdict follows the detection AUCs."""
    results = docs.load_results(ROOT)
    report = results["quality"]["digits_k20"]["report"]
    report["ddm.lds_margin_aligned"] = 0.99
    detection = results["data_quality"]["detection"]
    own = docs.own_ddm(detection)
    detection[own]["auc"] = 0.999
    text = "\n".join(docs.headline(results["peers"], results["quality"], results["data_quality"]))
    assert "- **digits, K = 20** (`digits_k20`, the strongest peers): DDM's 0.990 is ahead of 7 of the 7" in text
    assert "**peers win**: none." in text.split("K = 20")[1].splitlines()[0]
    assert f"**Finding mislabelled data, DDM wins**: detection AUC of DDM (`{own}`) 0.999" in text
    report["ddm.lds_margin_aligned"] = 0.2  # above gradient ascent only
    detection[own]["auc"] = 0.5
    text = "\n".join(docs.headline(results["peers"], results["quality"], results["data_quality"]))
    assert (
        "DDM's 0.200 is ahead of 1 of the 7 other methods (the best of them `gradient_ascent` 0.111); **peers win**: "
        "`ekfac_ensemble`" in text
    )
    assert "**Finding mislabelled data, peers win**" in text


def test_params_page_is_rendered_from_the_models():
    assert (ROOT / "docs" / "params.md").read_text() == docs.render_params()


def test_every_params_key_is_documented_with_its_description():
    page = (ROOT / "docs" / "params.md").read_text()
    keys = [key for block, info in Params.model_fields.items() for key, _ in docs.fields(info.annotation, f"{block}.")]
    assert len(keys) > 60 and "data.label_noise.mode" in keys and "distill.ipc" in keys
    for block in Params.model_fields:
        assert f"\n## {block}\n" in page
    for key, info in (kv for b, i in Params.model_fields.items() for kv in docs.fields(i.annotation, f"{b}.")):
        assert info.description, f"{key} has no description in ddm_ops/config.py"
        assert f"| `{key}` |" in page, key
    assert "| `distill.pairing` | str | `checkpoint` | `checkpoint`, `mirrored`, `lifo` |" in page
    assert "| `perturb.step_size` | float or str | `0.02` | > 0; `auto` |" in page


def test_a_changed_description_makes_params_page_stale(monkeypatch):
    monkeypatch.setattr(DistillParams.model_fields["ipc"], "description", "Changed on purpose.")
    rendered = docs.render_params()
    assert "Changed on purpose." in rendered
    assert rendered != (ROOT / "docs" / "params.md").read_text()
    assert ROOT / "docs" / "params.md" in docs.stale()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(page):
    assert LINK.findall(page.read_text()), f"{page.name} has no links"
    assert broken_links(page) == []


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Top part\n\n## Second\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#top-part) [ok](#here) [bad](a.md#nowhere) [gone](missing.md) [out](../x.md) "
        "[web](https://example.org) ![img](fig.png)\n\n## Here\n\n```\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "a.md#nowhere: no heading #nowhere in a.md",
        "missing.md: no such file",
        "../x.md: points outside the repository",
        "https://example.org: points outside the repository",
        "fig.png: no such file",
    ]


def test_github_slugs():
    assert github_slug("Experiments and overrides") == "experiments-and-overrides"
    assert github_slug("The pipeline, stage by stage") == "the-pipeline-stage-by-stage"
    assert github_slug("`make ui`: the three UIs") == "make-ui-the-three-uis"


def test_readme_starts_with_the_two_commands_and_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    head = "\n".join(lines[:6])
    assert re.search(r"^make run\s+#", head, re.M) and re.search(r"^make test\s+#", head, re.M)
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    assert docs.BEGIN in lines and docs.END in lines
