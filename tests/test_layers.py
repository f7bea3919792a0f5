"""The code's layers point one way (ddm_ops < stages < pipeline, no stage importing another) and dvc.yaml cannot
drift: every project module a stage imports, directly or not, and every params block it reads is declared."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from ddm_ops.config import Params
from pipeline import PACKAGES
from stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
HOLDERS = ("params", "p", "variant")  # the names a Params object goes by in the code (and self.params)


def source(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its code (functions' own imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if source(sub).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(imports(m))
    return seen


def params_read(module: str) -> set[str]:
    """`block.field` for every params.block.field the module reads, `block` where it uses a block whole."""
    blocks, found = set(Params.model_fields), set()
    tree = ast.parse(source(module).read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        holder = node.value if isinstance(node, ast.Attribute) else None
        is_params = (isinstance(holder, ast.Name) and holder.id in HOLDERS) or (
            isinstance(holder, ast.Attribute) and holder.attr == "params"
        )
        if is_params and node.attr in blocks:
            parent = parents.get(node)
            fields = type(Params.model_fields[node.attr].default).model_fields
            if isinstance(parent, ast.Attribute) and parent.attr in fields:
                found.add(f"{node.attr}.{parent.attr}")
            else:
                found.add(node.attr)
    return found


def layer(module: str) -> int:
    return PACKAGES.index(module.split(".")[0])


@pytest.mark.parametrize("module", modules())
def test_imports_point_down(module):
    up = sorted(m for m in imports(module) if layer(m) > layer(module))
    assert not up, f"{module} imports {up} from a higher layer ({' < '.join(PACKAGES)})"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    others = sorted(f"stages.{s}" for s in STAGES if s != stage)
    assert not set(others) & closure(f"stages.{stage}"), f"stages.{stage} reaches another stage's module"


def test_packages_are_the_installed_ones():
    import tomllib

    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = {".".join(p.relative_to(ROOT).parts) for p in ROOT.glob("*/**/") if (p / "__init__.py").is_file()}
    assert set(installed) == {p for p in packages if p.split(".")[0] in PACKAGES}


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_declares_every_module_and_params_block_a_stage_depends_on(stage):
    spec = DVC[stage]
    reached = closure(f"stages.{stage}")
    files = {str(source(m).relative_to(ROOT)) for m in reached}
    missing = sorted(files - set(spec["deps"]))
    gone = sorted(d for d in spec["deps"] if d.endswith(".py") and not (ROOT / d).is_file())
    assert not gone, f"dvc.yaml: stage {stage} depends on {gone}, which do not exist (dvc repro would fail)"
    assert not missing, f"dvc.yaml: stage {stage} lacks deps {missing}; a change there would leave it stale"
    declared = {p if isinstance(p, str) else next(iter(p)) for p in spec.get("params", [])}
    read = set().union(*(params_read(m) for m in reached))
    lacking = sorted(r for r in read if r not in declared and r.split(".")[0] not in declared)
    assert not lacking, f"dvc.yaml: stage {stage} reads params {lacking} but does not declare them"


def test_the_checks_can_fail():
    """The derivations see what they must: the report reaches the quality code, perturb reads its own block."""
    assert "stages.reporting.quality" in closure("stages.report") and "ddm_ops.metrics" in closure("stages.report")
    assert "perturb.update" in params_read("stages.curvature") and "stages.synsets" not in closure("stages.perturb")
    assert {"distill", "baselines.gradient_ascent_steps"} <= params_read("ddm_ops.methods")
