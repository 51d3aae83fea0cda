import io
import os

import pytest
import torch

from dml_core.models.checkpoint import CheckpointError, load_model, model_checkpoint, read_checkpoint, save_model
from dml_core.models.head import EmbeddingModel, ProjectionHead
from dml_core.models.registry import build_model
from dml_core.models.small_cnn import SmallCNN


class _CreatesFile:
    """Unpickled, it creates the file `path`: a checkpoint that runs code when loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name,kwargs", [("small_cnn", {"widths": (4, 8)}), ("vit_tiny", {"depth": 1})])
def test_save_and_load_round_trip(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=8, head="linear", **kwargs)
    with torch.no_grad():  # move BN running stats off their defaults so they must be restored too
        model.train()(torch.randn(4, 1, 28, 28))
    url = str(tmp_path / "ckpt" / "model.pt")
    save_model(model, url)
    loaded = load_model(url)
    assert loaded.spec == model.spec
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)
    assert list((tmp_path / "ckpt").iterdir()) == [tmp_path / "ckpt" / "model.pt"]  # no temp file left


@pytest.mark.parametrize("norm", ["frozen_batch", "group"])
def test_round_trip_keeps_the_norm(norm):
    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=4, widths=(4, 8), norm=norm)
    with torch.no_grad():
        model.backbone.features[1].weight.mul_(2.0)
    loaded = load_model(model_checkpoint(model))
    assert loaded.backbone.norm == norm and loaded.spec["kwargs"]["norm"] == norm
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():  # training mode: per-sample norms give the same output
        torch.testing.assert_close(loaded.train()(x), model.train()(x), atol=0, rtol=0)


def test_checkpoint_without_norm_in_its_spec_loads_as_batch_norm():
    """Checkpoints written before the norm option have no "norm" in their spec."""
    model = build_model("small_cnn", embedding_dim=4, widths=(4,))
    ckpt = model_checkpoint(model)
    del ckpt["spec"]["kwargs"]["norm"]
    loaded = load_model(ckpt)
    assert loaded.backbone.norm == "batch" and isinstance(loaded.backbone.features[1], torch.nn.BatchNorm2d)
    assert loaded.spec == model.spec  # the rebuilt spec names the norm
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)


def test_load_from_bytes_and_dict():
    model = build_model("small_cnn", embedding_dim=4, widths=(4,)).eval()
    buf = io.BytesIO()
    torch.save(model_checkpoint(model), buf)
    x = torch.randn(2, 1, 28, 28)
    for source in (buf.getvalue(), model_checkpoint(model)):
        torch.testing.assert_close(load_model(source).eval()(x), model(x))


def test_an_unsafe_checkpoint_is_refused_naming_it_and_never_run(tmp_path):
    marker, path = tmp_path / "code-ran", tmp_path / "evil.pt"
    torch.save({"spec": {"name": "small_cnn"}, "state_dict": {}, "payload": _CreatesFile(str(marker))}, path)
    for load in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError) as err:
            load(str(path))
        message = str(err.value)
        assert str(path) in message and "io.open" in message and "unsafe" in message
        assert "weights_only" not in message and "\n" not in message  # one line, no advice to load it unsafely
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the refusal kept from running
    assert marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_checkpoint_is_named(tmp_path, keep):
    from dml_core.training.state import load_state, save_state

    model = build_model("small_cnn", embedding_dim=4, widths=(4,))
    directory = tmp_path / "checkpoint_00000001"
    save_state(str(directory), model, None, None, None, step=1, config={})
    path = directory / "state.pt"
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))
    with pytest.raises(CheckpointError) as err:
        load_state(str(directory))
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} is truncated or not a checkpoint")
    assert "weights_only" not in message and "\n" not in message
    with pytest.raises(CheckpointError, match="checkpoint \\(bytes\\) is truncated"):
        read_checkpoint(path.read_bytes())


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="expected keys 'spec' and 'state_dict'"):
        load_model({"weights": {}})
    torch.save({"weights": {}}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'weights.pt'} is not a model checkpoint"):
        load_model(tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="no spec"):
        model_checkpoint(EmbeddingModel(SmallCNN(widths=(4,)), ProjectionHead(4, 2)))
    ckpt = model_checkpoint(build_model("small_cnn", widths=(4,)))
    ckpt["spec"]["kwargs"]["widths"] = (4, 8)
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        load_model(ckpt)
