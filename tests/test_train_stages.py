"""Training stages end to end on real rice images, and DVC's rerun rules for them.

The last tests are the pipeline contract of issue 3: after a full run, changing `student.*` or
`kd.*` must rerun the student stages but never a teacher, also for a smaller student input.
"""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import torch
import yaml
from tiny_pipeline import set_params

from src.edgekd.ckpt import load_checkpoint
from src.edgekd.export import read_metadata

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": {"batch_size": 16, "eval_batch_size": 64}, "teachers": {"epochs": 1},
        "student": {"epochs": 1}}


def _params(tmp_path: Path, **sections) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in {**TINY, **sections}.items():
        raw[name] = {**raw[name], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage(module: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"src.stages.{module}", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_teacher_baseline_distill_stages(prepared_small, tmp_path):
    params = _params(tmp_path, teachers={"epochs": 1, "archs": ["resnet18", "mobilenet_v2"]})
    for arch in ("resnet18", "mobilenet_v2"):
        run = _stage("train_teacher", "--arch", arch, "--data", prepared_small, "--out",
                     tmp_path / f"teachers/{arch}.pt", "--metrics", tmp_path / f"teacher_{arch}.json",
                     "--live", tmp_path / f"live_{arch}", "--params", params)
        assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "teacher_resnet18.json").read_text())
    assert {"val_acc", "params", "epochs_run", "wall_s", "train_images_per_s"} <= set(metrics)
    ckpt = load_checkpoint(tmp_path / "teachers/resnet18.pt")
    assert ckpt["model"] == {"arch": "resnet18", "num_classes": 5, "width": 1.0}
    assert ckpt["image_size"] == 32 and len(ckpt["mean"]) == 3

    run = _stage("soft_targets", "--data", prepared_small, "--teachers", tmp_path / "teachers", "--out",
                 tmp_path / "soft_targets.pt", "--metrics", tmp_path / "soft_targets.json", "--params", params)
    assert run.returncode == 0, run.stderr
    soft = json.loads((tmp_path / "soft_targets.json").read_text())
    assert 0 <= soft["teacher_ensemble_val_acc"] <= 1 and soft["views"] == 20 and 0 <= soft["ensemble_view_acc"] <= 1
    logits = load_checkpoint(tmp_path / "soft_targets.pt")["logits"]
    assert logits.shape[0] == 20 and logits.shape[2] == 5 and not torch.equal(logits[0], logits[1])

    for mode, out in (("baseline", "baseline.pt"), ("distill", "student_fp32.pt")):
        run = _stage("train_student", "--mode", mode, "--data", prepared_small, "--soft-targets",
                     tmp_path / "soft_targets.pt", "--out", tmp_path / out, "--metrics", tmp_path / f"{mode}.json",
                     "--live", tmp_path / f"live_{mode}", "--params", params)
        assert run.returncode == 0, run.stderr
    distill = json.loads((tmp_path / "distill.json").read_text())
    assert distill["train_images_per_s"] > 0 and distill["epochs_run"] == 1
    assert load_checkpoint(tmp_path / "student_fp32.pt")["model"]["width"] == 0.25
    assert (tmp_path / "live_distill/plots/metrics/val_acc.tsv").is_file()
    assert not (tmp_path / "live_distill/resume.pt").exists()


def test_stage_errors_are_one_line(prepared_small, tmp_path):
    params = _params(tmp_path)
    run = _stage("train_teacher", "--arch", "resnet50", "--data", prepared_small, "--out", tmp_path / "t.pt",
                 "--metrics", tmp_path / "m.json", "--params", params)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: --arch 'resnet50'")
    run = _stage("soft_targets", "--data", prepared_small, "--teachers", tmp_path / "none", "--out",
                 tmp_path / "st.pt", "--metrics", tmp_path / "m.json", "--params", params)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'none/resnet18.pt'}: checkpoint not found (run the stage that writes it first)"
    run = _stage("train_student", "--mode", "distill", "--data", prepared_small, "--soft-targets",
                 tmp_path / "st.pt", "--out", tmp_path / "s.pt", "--metrics", tmp_path / "m.json", "--params", params)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'st.pt'}: checkpoint not found (run the stage that writes it first)"
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "st.pt").exists()


def _dvc(repo: Path, *args) -> str:
    run = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _changed(repo: Path, **edits) -> tuple[set[str], str]:
    """Stages `dvc status` reports, and `dvc repro --dry` output, after editing params.yaml."""
    path = repo / "params.yaml"
    original = path.read_text()
    raw = yaml.safe_load(original)
    for key, value in edits.items():
        section, name = key.split("__")
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw))
    try:
        status = set(json.loads(_dvc(repo, "status", "--json")))
        return status, _dvc(repo, "repro", "--dry")
    finally:
        path.write_text(original)


def test_student_and_kd_params_never_rerun_teachers(tiny_repo: Path):
    repo = tiny_repo  # the whole project, reproduced with tiny params (conftest)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    assert _changed(repo)[0] == set()
    teachers = {f"train_teacher@{a}" for a in raw["teachers"]["archs"]}
    width, dry = _changed(repo, student__width=0.5)
    assert {"baseline", "distill"} <= width and not width & (teachers | {"soft_targets"})
    assert "Running stage 'baseline'" in dry and "Running stage 'train_teacher" not in dry
    assert "Running stage 'soft_targets'" not in dry
    temperature, dry = _changed(repo, kd__temperature=2.0)
    assert "distill" in temperature and "baseline" not in temperature
    assert not temperature & (teachers | {"soft_targets"})
    assert "Running stage 'distill'" in dry and "Running stage 'baseline'" not in dry
    assert "Running stage 'train_teacher" not in dry and "Running stage 'soft_targets'" not in dry
    views, dry = _changed(repo, kd__views=3)
    assert "soft_targets" in views and not views & teachers and "Running stage 'soft_targets'" in dry


def test_smaller_student_input_trains_on_teacher_views_and_deploys_at_its_size(tiny_repo: Path):
    repo = tiny_repo  # data.image_size 32: the teachers and their soft targets stay as they are
    set_params(repo, {"student": {"image_size": 16}})
    out = _dvc(repo, "repro")
    assert "Running stage 'distill'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'train_teacher" not in out and "Running stage 'soft_targets'" not in out
    for name in ("baseline", "student_fp32", "student_int8"):
        path = repo / "models" / f"{name}.onnx"
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert read_metadata(path).image_size == 16 and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert load_checkpoint(repo / "models/student_qat.pt")["image_size"] == 16
    assert 0 <= json.loads((repo / "metrics/evaluate.json").read_text())["int8"]["accuracy"] <= 1
    image = next(Path(yaml.safe_load((repo / "params.yaml").read_text())["data"]["root"]).rglob("*.jpg"))
    run = subprocess.run([sys.executable, "-m", "src.predict", "models/student_int8.onnx", str(image), "--json"],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and json.loads(run.stdout)["path"] == str(image), run.stderr
