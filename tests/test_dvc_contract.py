"""What dvc.yaml promises about every stage, checked against the code and against a real run.

DVC reruns a stage only when something it declares changes, and restores an earlier setting's outputs
from its run-cache only for stages without `persist` outputs. So:
- each stage's code deps are exactly its import closure inside the project (every project module the
  entry point imports, directly or not), computed here from the source with `ast`;
- each stage's params are exactly the keys it read in the tiny project's `dvc repro` (recorded by
  src/edgekd/config.py, written by runtime.run_stage when EDGEKD_PARAMS_TRACE is set);
- no output keeps a stage out of the run-cache, and returning to an earlier setting restores every
  student stage from it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shlex
from pathlib import Path

import networkx as nx
import pytest
import yaml
from dvc.repo import Repo
from tiny_pipeline import PARAMS_TRACE, REPRO_LOG, set_params, sh

from edgekd.config import _LEAVES, _SECTION_PREFIX
from edgekd.runtime import stream_seed
from tools.dvc_deps import PACKAGES, import_closure, imported_modules, project_files, sync

REPO = Path(__file__).resolve().parents[1]


def stages(repo: Path = REPO) -> list:
    return [s for s in Repo(str(repo)).index.stages if s.cmd]


def entry_module(cmd: str) -> str:
    args = shlex.split(cmd)
    assert args[:2] == ["python", "-m"], f"stage command does not run a module: {cmd}"
    return args[2]


def declared_code(stage) -> set[str]:
    return {d.def_path for d in stage.deps if d.def_path.endswith(".py")}


def declared_params(stage) -> set[str]:
    """Declared params keys, sections expanded to their fields (`train` -> train.device, ...)."""
    keys = set()
    for dep in stage.deps:
        for key in getattr(dep, "params", None) or []:
            section = next((cls for cls, prefix in _SECTION_PREFIX.items() if prefix == f"{key}."), None)
            keys.update(f"{key}.{leaf}" for leaf in _LEAVES[section]) if section else keys.add(key)
    return keys


def test_project_code_imports_absolutely():
    """A relative import would hide a dependency from `imported_modules`."""
    relative = [
        f"{p.relative_to(REPO)}:{n.lineno}"
        for p in project_files()
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ImportFrom) and n.level
    ]
    assert not relative, relative


def test_library_imports_no_stage_and_no_tooling():
    """The layout's one rule: stages/ and tools/ build on edgekd, never the other way round."""
    library = [p for p in project_files() if p.is_relative_to(PACKAGES["edgekd"] / "edgekd")]
    wrong = [
        f"{p.relative_to(REPO)} imports {name}"
        for p in library
        for name in imported_modules(p)
        if name.split(".")[0] in ("stages", "tools")
    ]
    assert library and not wrong, wrong


def test_closure_follows_from_package_imports():
    closure = import_closure("stages.qat")
    # runtime.py imports `from edgekd import config`; qat imports `from edgekd.train import engine`
    assert {
        "stages/qat.py",
        "src/edgekd/train/engine.py",
        "src/edgekd/runtime.py",
        "src/edgekd/config.py",
        "src/edgekd/errors.py",
    } <= closure
    assert not any(p.endswith("__init__.py") for p in closure)


def test_package_inits_hold_no_code():
    """They are left out of the closures, which is only right while they run nothing."""
    for init in (p for p in project_files() if p.name == "__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


def test_sync_rewrites_exactly_the_code_deps(tmp_path: Path):
    text = (REPO / "dvc.yaml").read_text()
    broken = text.replace("      - src/edgekd/train/quant.py\n", "", 1).replace(
        "      - stages/prepare.py\n", "      - stages/prepare.py\n      - src/edgekd/train/engine.py\n", 1
    )
    assert broken != text and sync(broken) == sync(text)
    assert sync(text) == text  # the committed dvc.yaml is in sync
    studies = (REPO / "studies/dvc.yaml").read_text()
    assert sync(studies) == studies  # and the studies' pipeline file


@pytest.mark.parametrize("stage", stages(), ids=lambda s: s.addressing)
def test_code_deps_are_the_import_closure(stage):
    closure = import_closure(entry_module(stage.cmd))
    declared = declared_code(stage)
    assert not closure - declared, f"{stage.addressing}: imports but does not declare {sorted(closure - declared)}"
    assert not declared - closure, f"{stage.addressing}: declares but does not import {sorted(declared - closure)}"


def test_no_output_keeps_a_stage_out_of_the_run_cache():
    """DVC skips its run-cache for a stage with a `persist: true` output (dvc/stage/cache.py) or with a
    `cache: false` output that is neither a metric nor a plot (dvc/stage/__init__.py, Stage.run)."""
    blocking = [
        f"{s.addressing}: {o.def_path}"
        for s in stages()
        for o in s.outs
        if o.persist or not (o.use_cache or o.is_metric or o.is_plot)
    ]
    assert not blocking, blocking


def test_every_param_a_stage_reads_is_declared_and_nothing_else(tiny_repo_template: Path):
    traces = [json.loads(p.read_text()) for p in (tiny_repo_template.parent / PARAMS_TRACE).glob("*.json")]
    by_args = {tuple(t["argv"]): set(t["params"]) for t in traces}
    checked = 0
    for stage in stages(tiny_repo_template):  # this dvc.yaml, with the tiny project's data.root
        args = tuple(shlex.split(stage.cmd)[3:])
        assert args in by_args, f"{stage.addressing}: no params trace for {args}"
        read, declared = by_args[args], declared_params(stage)
        assert not read - declared, f"{stage.addressing}: reads undeclared params {sorted(read - declared)}"
        assert not declared - read, f"{stage.addressing}: declares params it never reads {sorted(declared - read)}"
        checked += 1
    assert checked == len(stages()) == len(traces)


def test_declared_params_expand_sections_only():
    """The expansion above would hide a typo'd section name; every declared key must exist."""
    known = {f"{prefix}{leaf}" for cls, prefix in _SECTION_PREFIX.items() for leaf in _LEAVES[cls]}
    for stage in stages():
        assert declared_params(stage) <= known, (stage.addressing, sorted(declared_params(stage) - known))


def test_quick_start_prints_no_library_warnings(tiny_repo_template: Path):
    log = (tiny_repo_template.parent / REPRO_LOG).read_text()
    assert "Running stage 'evaluate@int8'" in log
    noisy = [line for line in log.splitlines() if "Warning" in line or "warnings.warn" in line]
    assert not noisy, noisy[:5]


def _output_md5s(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        f"{name}:{out['path']}": out["md5"] for name, stage in lock["stages"].items() for out in stage.get("outs", [])
    }


def _file_md5s(repo: Path, folders=("models", "metrics", "plots", "dvclive")) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest()
        for d in folders
        for p in sorted((repo / d).rglob("*"))
        if p.is_file()
    }


STUDENT_STAGES = ("baseline", "distill", "qat", "export@fp32", "export@int8", "evaluate@fp32", "evaluate@int8")


DEPLOYED_PIPELINE = [
    "prepare",
    "train_teacher@resnet18",
    "train_teacher@mobilenet_v2",
    "train_teacher@densenet121",
    "baseline",
    "soft_targets",
    "distill",
    "qat",
    "export@fp32",
    "export@int8",
    "export@baseline",
    "evaluate@fp32",
    "evaluate@int8",
    "evaluate@baseline",
]


def test_default_pipeline_builds_the_deployed_model_and_a_student_change_reruns_only_its_stages(
    changed_student_repo: Path,
):
    """`dvc repro` runs dvc.yaml alone: the studies (studies/dvc.yaml) only with -P. A width and input
    change reruns the students, their exports and evaluations, nothing else."""
    assert [s.name for s in stages(changed_student_repo) if s.path_in_repo == "dvc.yaml"] == DEPLOYED_PIPELINE
    log = (changed_student_repo.parent / REPRO_LOG).read_text()
    assert set(re.findall(r"Running stage '([^']+)'", log)) == set(STUDENT_STAGES) | {
        "export@baseline",
        "evaluate@baseline",
    }


def test_going_back_restores_every_student_stage_from_the_run_cache(
    tiny_repo_template: Path, changed_student_repo: Path
):
    before_lock, before_files = _output_md5s(tiny_repo_template), _file_md5s(tiny_repo_template)
    assert _output_md5s(changed_student_repo) != before_lock  # the change really retrained the students
    set_params(changed_student_repo, {"student": {"width": 0.25, "image_size": None}})
    proc = sh("dvc", "repro", cwd=changed_student_repo)

    output = proc.stdout + proc.stderr
    for name in STUDENT_STAGES:
        assert f"Stage '{name}' is cached - skipping run, checking out outputs" in output, (name, output)
    assert "Running stage" not in output and "epoch" not in output.lower()  # nothing trained
    assert _output_md5s(changed_student_repo) == before_lock
    assert _file_md5s(changed_student_repo) == before_files  # byte-identical, git-tracked metrics and curves too


RAN = r"Running stage '(?:studies/dvc.yaml:)?([^']+)'"  # a study stage by its name alone


def _would_run(repo: Path) -> set[str]:
    """Stages of both pipelines (-P) `dvc repro --dry` would run because something they declare changed."""
    return set(re.findall(RAN, sh("dvc", "repro", "-P", "--dry", cwd=repo).stdout))


def _reruns(repo: Path, changed: set[str]) -> set[str]:
    """The changed stages and every stage downstream of them, from DVC's own stage graph (its edges
    point from a stage to the stages it depends on, so downstream stages are ancestors)."""
    graph = Repo(str(repo)).index.graph
    by_name = {s.name: s for s in graph.nodes if s.cmd}
    return changed | {s.name for name in changed for s in nx.ancestors(graph, by_name[name]) if s.cmd}


TEACHER_STAGES = {"train_teacher@resnet18", "train_teacher@mobilenet_v2", "train_teacher@densenet121", "soft_targets"}


def test_training_seed_never_resplits_and_split_seed_does(tiny_repo: Path):
    trained = {s.name for s in stages(tiny_repo) if "seed" in declared_params(s)}
    assert "prepare" not in trained and TEACHER_STAGES <= trained
    set_params(tiny_repo, {"seed": 1})
    assert _would_run(tiny_repo) == trained
    set_params(tiny_repo, {"seed": 42, "data": {"split_seed": 1}})
    assert _would_run(tiny_repo) == {"prepare"}


def test_student_seed_and_ensemble_rerun_no_teacher(tiny_repo: Path):
    """A seed sweep (`-S student.seed=N`) retrains every student and no teacher, and draws PTQ's
    calibration sample anew; `-S kd.ensemble=...` only what learns from the soft targets."""
    set_params(tiny_repo, {"student": {"seed": 1}})
    changed = _would_run(tiny_repo)
    assert changed == {
        "baseline",
        "distill",
        "qat",
        "qat_kd@a16",
        "qat_kd@mixed",
        "qat_kd@mixed_a16",
        "qat_scratch",
        "ptq",
    }
    assert not _reruns(tiny_repo, changed) & TEACHER_STAGES
    set_params(tiny_repo, {"student": {"seed": 42}, "kd": {"ensemble": "confidence"}})
    changed = _would_run(tiny_repo)
    assert changed == {"distill", "qat", "qat_kd@a16", "qat_kd@mixed", "qat_kd@mixed_a16"}
    assert "baseline" not in _reruns(tiny_repo, changed) and not _reruns(tiny_repo, changed) & TEACHER_STAGES


def test_bit_budget_reruns_only_allocation_mixed_qat_export_and_evaluate(tiny_repo: Path):
    """A real experiment: the activation allocation is rewritten byte for byte, so DVC skips the mixed
    16/8 QAT that reads it, which the stage graph alone cannot tell; only the mixed file is exported
    and measured again."""
    proc = sh("dvc", "exp", "run", "-P", "-S", "qat.avg_weight_bits=4.5", cwd=tiny_repo)
    ran = set(re.findall(RAN, proc.stdout + proc.stderr))
    assert ran == {"allocate_bits", "qat_kd@mixed", "export@mixed", "evaluate@mixed"}
    assert json.loads((tiny_repo / "metrics/bit_allocation.json").read_text())["budget"] == 4.5


def test_each_teacher_has_its_own_seed_stream():
    seeds = {arch: stream_seed(42, f"teacher/{arch}") for arch in ("resnet18", "mobilenet_v2", "densenet121")}
    assert len(set(seeds.values())) == 3 and 42 not in seeds.values()
    assert seeds == {arch: stream_seed(42, f"teacher/{arch}") for arch in seeds}  # fixed by the seed
    assert stream_seed(1, "teacher/resnet18") != seeds["resnet18"]


def test_a_local_teacher_weights_file_reruns_exactly_its_teacher(tiny_repo: Path):
    (tiny_repo / "weights/teachers/mobilenet_v2/imagenet.pth").write_bytes(b"weights")
    assert _would_run(tiny_repo) == {"train_teacher@mobilenet_v2"}
