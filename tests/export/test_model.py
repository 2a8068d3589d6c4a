"""Model creation: names, weight sources and their errors."""

from __future__ import annotations

import pytest
import torch

from quantpipe.errors import ArtifactMismatchError, ConfigError, QuantpipeError
from quantpipe.export.model import create_model, data_config_of, load_checkpoint


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match="unknown timm model 'deit_tiny_patch16_22'.*deit_tiny_patch16_224"):
        create_model("deit_tiny_patch16_22")


@pytest.mark.parametrize("name", ["resnet18", "test_vit_relpos"])
def test_non_vit_model_is_refused(name):
    with pytest.raises(ConfigError, match="plain VisionTransformer models"):
        create_model(name)


def test_pretrained_without_hub_suggests_checkpoint(monkeypatch):
    # Offline mode makes huggingface_hub fail at once instead of retrying for a minute; the hub is
    # unreachable here either way.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(QuantpipeError, match="hub.*--checkpoint"):
        create_model("test_vit", pretrained=True)


def test_checkpoint_round_trip_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = create_model("test_vit")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)  # differ from the seeded random init that create_model gives
    state = source.state_dict()
    torch.save({"model": state}, tmp_path / "w.pth")  # wrapped, as training scripts save it
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = create_model("test_vit", checkpoint=tmp_path / name)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_checkpoint_mismatch_names_the_keys(tmp_path):
    state = create_model("test_vit").state_dict()
    del state["head.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 5, 64)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ArtifactMismatchError, match=r"1 missing \(e\.g\. head\.weight\).*1 unexpected.*pos_embed"):
        load_checkpoint(create_model("test_vit"), tmp_path / "bad.pth")


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QuantpipeError, match="cannot read checkpoint"):
        create_model("test_vit", checkpoint=tmp_path / "junk.safetensors")
    with pytest.raises(QuantpipeError, match="not found"):
        create_model("test_vit", checkpoint=tmp_path / "missing.pth")


def test_data_config_comes_from_timm():
    cfg = data_config_of(create_model("test_vit"))
    assert cfg["input_size"] == [3, 160, 160]
    assert set(cfg) == {"input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"}
