"""Checkpoints: atomic writes, weights_only loads, malicious pickles refused without running."""

import pickle
from pathlib import Path

import pytest
import torch

from edgekd.data.prepared import DatasetInfo
from edgekd.errors import UserError
from edgekd.train.checkpoints import load_checkpoint, load_model, model_payload, save_checkpoint
from edgekd.train.models import build_model


class _Evil:
    """Unpickling this calls Path.touch(marker): stands in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_roundtrip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "sub" / "m.pt"
    save_checkpoint(path, {"state_dict": {"w": torch.arange(3.0)}, "classes": ["a", "b"], "epoch": 2})
    loaded = load_checkpoint(path)
    assert loaded["classes"] == ["a", "b"] and loaded["epoch"] == 2
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"version": 1})
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint(path, {"version": 2, "bad": lambda: None})  # lambdas cannot be pickled
    assert load_checkpoint(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if fmt == "torch_zip":
        torch.save({"state_dict": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    with pytest.raises(UserError, match="evil.pt: refused to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # control: an unsafe load of the same file really would run the payload
    if fmt == "torch_zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(UserError, match="nope.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(UserError, match="junk.pt"):
        load_checkpoint(junk)


def test_model_payload_rebuilds_the_model(tmp_path):
    info = DatasetInfo(["a", "b", "c"], 32, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    model = build_model("mobilenet_v3_small_minimal", 3, 0.5, stem="small").eval()
    spec = {"arch": "mobilenet_v3_small_minimal", "width": 0.5, "stem": "small"}
    save_checkpoint(tmp_path / "s.pt", model_payload(model, spec, info, val_acc=0.9))
    rebuilt, payload = load_model(tmp_path / "s.pt")
    assert payload["model"] == {**spec, "num_classes": 3}
    assert payload["classes"] == ["a", "b", "c"] and payload["image_size"] == 32 and payload["val_acc"] == 0.9
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_load_model_rejects_foreign_dicts(tmp_path):
    save_checkpoint(tmp_path / "x.pt", {"weights": torch.zeros(1)})
    with pytest.raises(UserError, match="x.pt: not a model checkpoint"):
        load_model(tmp_path / "x.pt")
