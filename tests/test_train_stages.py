"""Training stages end to end on real rice images, and DVC's rerun rules for them.

The last tests are the pipeline contract of issue 3: after a full run, changing `student.*` or
`kd.*` must rerun the student stages but never a teacher, also for a smaller student input.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from tiny_pipeline import REPRO_LOG

from edgekd.data.batches import load_split, normalize
from edgekd.data.prepared import load_info, read_split
from edgekd.deploy.metadata import read_metadata
from edgekd.deploy.sessions import ort_session
from edgekd.eval.inputs import ArrayInputs
from edgekd.train.checkpoints import load_checkpoint, load_teachers
from edgekd.train.losses import prepare_teachers
from edgekd.train.models import build_model
from edgekd.train.soft_targets import combine_teachers

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": {"batch_size": 16, "eval_batch_size": 64}, "teachers": {"epochs": 1}, "student": {"epochs": 1}}


def _params(tmp_path: Path, **sections) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in {**TINY, **sections}.items():
        raw[name] = {**raw[name], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage(module: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"stages.{module}", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_teacher_baseline_distill_stages(prepared_small, tmp_path):
    # kd.views and student.width differ from params.yaml: the stages must use these values
    params = _params(
        tmp_path,
        teachers={"epochs": 1, "archs": ["resnet18", "mobilenet_v2"]},
        kd={"views": 3},
        student={"epochs": 1, "width": 0.5},
    )
    for arch in ("resnet18", "mobilenet_v2"):
        run = _stage(
            "train_teacher",
            "--arch",
            arch,
            "--data",
            prepared_small,
            "--out",
            tmp_path / f"teachers/{arch}.pt",
            "--metrics",
            tmp_path / f"teacher_{arch}.json",
            "--live",
            tmp_path / f"live_{arch}",
            "--params",
            params,
        )
        assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "teacher_resnet18.json").read_text())
    # the selected epoch's, single-view and flip-averaged; the per-epoch figures are the curves
    assert set(metrics) == {"val_acc", "val_acc_flip"}
    ckpt = load_checkpoint(tmp_path / "teachers/resnet18.pt")
    assert ckpt["model"] == {"arch": "resnet18", "num_classes": 5, "width": 1.0, "stem": "imagenet"}
    assert ckpt["image_size"] == 32 and len(ckpt["mean"]) == 3

    run = _stage(
        "soft_targets",
        "--data",
        prepared_small,
        "--teachers",
        tmp_path / "teachers",
        "--out",
        tmp_path / "soft_targets.pt",
        "--metrics",
        tmp_path / "soft_targets.json",
        "--params",
        params,
    )
    assert run.returncode == 0, run.stderr
    soft = json.loads((tmp_path / "soft_targets.json").read_text())
    targets = load_checkpoint(tmp_path / "soft_targets.pt")
    per_teacher, (_, train_labels) = targets["teacher_logits"], load_split(prepared_small, "train")
    assert soft["views"] == 3 and len(targets["view_hashes"]) == 3
    assert per_teacher.shape == (3, len(train_labels), 2, 5) and not torch.equal(per_teacher[0], per_teacher[1])
    assert per_teacher.dtype == torch.float16
    per_teacher = per_teacher.float()
    # the float16 rounding is reported: under 2^-11 of the largest logit, and it flips few top-1s
    assert 0 < soft["stored_logit_max_error"] <= per_teacher.abs().max().item() * 2**-11
    assert set(soft["stored_top1_changed"]) == {"mean", "confidence"}
    assert max(soft["stored_top1_changed"].values()) < 0.01
    # the accuracy on the views is that of each ensemble of the stored logits against the train labels
    for scheme in ("mean", "confidence"):
        logits = combine_teachers(per_teacher, train_labels, scheme)[0]
        hits = (logits.argmax(-1) == train_labels).sum().item()
        assert soft["ensemble_view_acc"][scheme] == pytest.approx(hits / logits[..., 0].numel(), abs=1e-6)
    assert sum(soft["teacher_weights"]["confidence"].values()) == pytest.approx(1.0, abs=1e-3)
    # the val accuracy is that of the two saved teachers' mean logits on the val split, recomputed here
    info, (val_images, val_labels) = load_info(prepared_small), load_split(prepared_small, "val")
    teachers = prepare_teachers(load_teachers(tmp_path / "teachers", ["resnet18", "mobilenet_v2"], info)[0])
    with torch.no_grad():
        x = normalize(val_images, info.mean, info.std)
        mean_logits = torch.stack([t(x) for t in teachers]).mean(0)
        mirrored = torch.stack([t(x.flip(-1)) for t in teachers]).mean(0)
    val_hits = (mean_logits.argmax(1) == val_labels).sum().item()
    assert soft["teacher_ensemble_val_acc"] == pytest.approx(val_hits / len(val_labels), abs=1e-6)
    flip_hits = ((mean_logits + mirrored).argmax(1) == val_labels).sum().item()
    assert soft["teacher_ensemble_val_acc_flip"] == pytest.approx(flip_hits / len(val_labels), abs=1e-6)

    for mode, out in (("baseline", "baseline.pt"), ("distill", "student_fp32.pt")):
        run = _stage(
            "train_student",
            "--mode",
            mode,
            "--data",
            prepared_small,
            "--soft-targets",
            tmp_path / "soft_targets.pt",
            "--out",
            tmp_path / out,
            "--metrics",
            tmp_path / f"{mode}.json",
            "--live",
            tmp_path / f"live_{mode}",
            "--params",
            params,
        )
        assert run.returncode == 0, run.stderr
    distill = json.loads((tmp_path / "distill.json").read_text())
    speed = (tmp_path / "live_distill/plots/metrics/images_per_s.tsv").read_text().splitlines()
    assert len(speed) == 2 and float(speed[1].split("\t")[-1]) > 0  # one epoch, its training img/s
    student = load_checkpoint(tmp_path / "student_fp32.pt")
    arch = student["model"]["arch"]
    assert student["model"]["width"] == 0.5
    # the weights are a width-0.5 network's, not the default 0.25 one's
    wide, narrow = build_model(arch, 5, 0.5), build_model(arch, 5, 0.25)
    wide.load_state_dict(student["state_dict"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        narrow.load_state_dict(student["state_dict"])
    assert distill["val_acc"] == student["val_acc"]
    assert (tmp_path / "live_distill/plots/metrics/val_acc.tsv").is_file()
    # done: no resume file, and no dvclive summary beside the stage's own metrics file
    assert not (tmp_path / "live_distill.resume.pt").exists() and not (tmp_path / "live_distill/metrics.json").exists()


def test_stage_errors_are_one_line(prepared_small, tmp_path):
    params = _params(tmp_path)
    run = _stage(
        "train_teacher",
        "--arch",
        "resnet50",
        "--data",
        prepared_small,
        "--out",
        tmp_path / "t.pt",
        "--metrics",
        tmp_path / "m.json",
        "--params",
        params,
    )
    assert run.returncode == 2 and run.stderr.strip().startswith("error: --arch 'resnet50'")
    run = _stage(
        "soft_targets",
        "--data",
        prepared_small,
        "--teachers",
        tmp_path / "none",
        "--out",
        tmp_path / "st.pt",
        "--metrics",
        tmp_path / "m.json",
        "--params",
        params,
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip()
        == f"error: {tmp_path / 'none/resnet18.pt'}: checkpoint not found (run the stage that writes it first)"
    )
    run = _stage(
        "train_student",
        "--mode",
        "distill",
        "--data",
        prepared_small,
        "--soft-targets",
        tmp_path / "st.pt",
        "--out",
        tmp_path / "s.pt",
        "--metrics",
        tmp_path / "m.json",
        "--params",
        params,
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip() == f"error: {tmp_path / 'st.pt'}: checkpoint not found (run the stage that writes it first)"
    )
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


def test_smaller_student_input_trains_on_teacher_views_and_deploys_at_its_size(changed_student_repo: Path):
    repo = changed_student_repo  # student.image_size 16 under data.image_size 32 (tiny_pipeline.CHANGED_STUDENT)
    out = (repo.parent / REPRO_LOG).read_text()  # its `dvc repro`: teachers and soft targets stay as they are
    assert "Running stage 'distill'" in out and "Running stage 'evaluate@int8'" in out
    assert "Running stage 'train_teacher" not in out and "Running stage 'soft_targets'" not in out
    for name in ("baseline", "student_fp32", "student_int8"):
        path = repo / "models" / f"{name}.onnx"
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert read_metadata(path).image_size == 16 and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert load_checkpoint(repo / "models/student_qat.pt")["image_size"] == 16
    # evaluate's accuracies are the exported models' own answers on the test split, its images resized
    # by the files' own rule as predict resizes them: its per-image answers (plots/confusion_<name>.csv)
    # match onnxruntime run here, and the accuracy counts them
    info, (images, labels) = load_info(repo / "prepared"), read_split(repo / "prepared", "test")
    for name, file in (("baseline", "baseline"), ("fp32", "student_fp32"), ("int8", "student_int8")):
        path = repo / "models" / f"{file}.onnx"
        meta = read_metadata(path)
        sess = ort_session(path, threads=1)
        x = ArrayInputs(images, meta.image_size, meta.mean, meta.std)[:]
        answers = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
        with (repo / "plots" / f"confusion_{name}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [r["actual"] for r in rows] == [info.classes[i] for i in labels]
        assert [r["predicted"] for r in rows] == [info.classes[i] for i in answers], name
        right = sum(r["actual"] == r["predicted"] for r in rows)
        evaluation = json.loads((repo / "metrics" / "evaluate" / f"{name}.json").read_text())
        assert evaluation["accuracy"] == right / len(rows), name
    image = next(Path(yaml.safe_load((repo / "params.yaml").read_text())["data"]["root"]).rglob("*.jpg"))
    run = subprocess.run(
        [sys.executable, "-m", "edgekd.deploy.predict", "models/student_int8.onnx", str(image), "--json"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and json.loads(run.stdout)["path"] == str(image), run.stderr
