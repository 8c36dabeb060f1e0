"""`python -m edgekd.deploy.predict`: metadata-only preprocessing, per-file errors, exit codes, JSON lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_pipeline import repo_params
from torch import nn

from edgekd.data.batches import normalize
from edgekd.data.images import load_image
from edgekd.deploy.export import export_onnx
from edgekd.deploy.metadata import ModelMeta
from edgekd.deploy.predict import main
from edgekd.train.models import build_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Arborio", "Basmati", "Ipsala", "Jasmine", "Karacadag"]
SIZE, MEAN, STD = 32, [0.1, 0.3, 0.5], [0.2, 0.3, 0.4]  # the fixture's metadata; per channel: a mix-up shows


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """An untrained student whose answers depend on the image: freshly initialised, its eval-mode
    BN statistics and tiny head make every softmax ~0.2 whatever the input, so the BN statistics
    are estimated on random inputs and the head is scaled up."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small_minimal", 5, 0.25)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batch below
    with torch.no_grad():
        model.train()(torch.randn(64, 3, SIZE, SIZE))
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight.mul_(100)
    meta = ModelMeta(classes=CLASSES, image_size=SIZE, mean=MEAN, std=STD)
    out = tmp_path_factory.mktemp("predict") / "m.onnx"
    return export_onnx(model, out, meta, 17)


@pytest.fixture()
def mixed_folder(small_rice_tree, tmp_path):
    """Two real images (one in a sub-folder, name with a space), a corrupt JPEG, a text `.jpg`."""
    good = sorted((small_rice_tree / "Arborio").iterdir())[:2]
    (tmp_path / "sub dir").mkdir()
    shutil.copyfile(good[0], tmp_path / good[0].name)
    shutil.copyfile(good[1], tmp_path / "sub dir" / good[1].name)
    (tmp_path / "corrupt.jpg").write_bytes(good[0].read_bytes()[:300])
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    return tmp_path


def expected_answer(model_path: Path, image: Path) -> tuple[str, float]:
    """Class and top softmax probability of the ONNX model for one image, computed here: the
    training side's decode and normalisation, a plain onnxruntime session, torch's softmax."""
    pixels = torch.from_numpy(load_image(image, SIZE, repo_params().data.max_image_pixels)).permute(2, 0, 1)[None]
    x = normalize(pixels, MEAN, STD).numpy()  # (1, 3, SIZE, SIZE)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    probs = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x})[0][0]).double().softmax(0)
    return CLASSES[int(probs.argmax())], float(probs.max())


def test_json_lines_for_good_files_errors_for_bad_and_nonzero_exit(model_path, mixed_folder, capsys):
    rc = main([str(model_path), str(mixed_folder), "--json"])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert rc == 1
    assert len(records) == 2 and {Path(r["path"]).parent.name for r in records} == {mixed_folder.name, "sub dir"}
    for r in records:  # each answer is the model's own for that file: argmax class, its softmax probability
        cls, confidence = expected_answer(model_path, Path(r["path"]))
        assert r["class"] == cls and r["confidence"] == pytest.approx(confidence, abs=2e-6), r
    assert abs(records[0]["confidence"] - records[1]["confidence"]) > 0.01  # the answers depend on the image
    errors = err.splitlines()
    assert len(errors) == 2 and all(e.startswith("error: ") for e in errors)
    assert any("corrupt.jpg" in e for e in errors) and any("notes.jpg" in e for e in errors)


def test_all_good_files_exit_zero_with_text_and_bench(model_path, small_rice_tree, capsys):
    files = sorted((small_rice_tree / "Basmati").iterdir())[:3]
    rc = main([str(model_path), *map(str, files), "--bench"])
    out, err = capsys.readouterr()
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.endswith(" ms") and line.split("\t")[1] in CLASSES for line in lines)
    assert "p50" in err


def test_model_without_metadata_is_refused_with_one_line(model_path, small_rice_tree, tmp_path):
    bare = onnx.load(str(model_path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    image = sorted((small_rice_tree / "Ipsala").iterdir())[0]
    proc = subprocess.run(
        [sys.executable, "-m", "edgekd.deploy.predict", str(tmp_path / "bare.onnx"), str(image)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "metadata lacks" in proc.stderr
