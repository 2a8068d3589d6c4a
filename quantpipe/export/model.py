"""Create the timm model to export: by name, with hub weights, a local checkpoint, or random weights.

Only timm's ``VisionTransformer`` family is supported (``vit_*``, ``deit_*`` including the distilled
variants, and timm's small test ViTs): QuantPipe cuts at transformer block boundaries, which needs the
``patch_embed -> blocks -> norm -> head`` structure where ``model.blocks`` is an ``nn.Sequential``.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from quantpipe.errors import ArtifactMismatchError, ConfigError, QuantpipeError

__all__ = ["create_model", "load_checkpoint", "data_config_of", "weights_source"]

log = logging.getLogger(__name__)

# timm modules whose models are plain VisionTransformer (or its distilled subclass): patch_embed ->
# blocks (nn.Sequential) -> norm -> forward_head. Other ViT variants (relpos, hybrid, eva, ...) differ.
_SUPPORTED_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    candidates = timm.list_models("vit_*") + timm.list_models("deit*") + timm.list_models("test_vit*")
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else " List them with: python -c \"import timm; print(timm.list_models('vit_*'))\""
    raise ConfigError(f"unknown timm model {name!r}.{hint}")


def create_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """Create ``name`` in eval mode with exportable layers and the requested weights.

    Args:
        name: a timm model name of the ViT/DeiT family.
        pretrained: download timm's pretrained weights from the Hugging Face hub.
        checkpoint: a ``.safetensors`` or ``.pth`` state dict, loaded strictly. With neither this nor
            ``pretrained`` the weights are random (seeded), which is enough for shapes and latency.

    Raises:
        ConfigError: unknown or unsupported model, or both weight sources given.
        QuantpipeError: the hub is unreachable (suggests ``--checkpoint``).
        ArtifactMismatchError: the checkpoint does not fit the model.
    """
    _check_name(name)
    module = timm.models.model_entrypoint(name).__module__
    if module not in _SUPPORTED_MODULES:
        raise ConfigError(
            f"{name} is defined in {module}; quantpipe export supports the plain VisionTransformer models of "
            "timm.models.vision_transformer and timm.models.deit (vit_*, deit_*, test_vit..test_vit4), whose "
            "blocks can be cut into pipeline stages"
        )
    if pretrained and checkpoint is not None:
        raise ConfigError("give either --pretrained or --checkpoint, not both")
    # exportable=True turns off fused attention (scaled_dot_product_attention), which exports to ONNX as
    # an opaque op on older opsets; dynamic_img_size=False keeps the position embedding a constant so
    # the graph has one static image size (the test ViTs default to dynamic sizes).
    kwargs: dict[str, Any] = {"exportable": True, "dynamic_img_size": False}
    torch.manual_seed(0)  # random-weight exports are reproducible
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError, connection errors, ...
        raise QuantpipeError(
            f"could not download the pretrained weights of {name} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}). The hub is unreachable from here: "
            "download the weights on a connected machine and pass them with --checkpoint FILE (.safetensors or .pth)"
        ) from exc
    except RuntimeError as exc:
        if pretrained and "pretrained" in str(exc).lower():
            raise QuantpipeError(f"timm has no pretrained weights for {name} ({exc}); use --checkpoint FILE") from exc
        raise
    if not isinstance(model, VisionTransformer) or not isinstance(getattr(model, "blocks", None), torch.nn.Sequential):
        raise ConfigError(
            f"{name} is a {type(model).__name__}; quantpipe export supports timm's VisionTransformer family "
            "(vit_*, deit_*, test_vit*), whose blocks can be cut into pipeline stages"
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict into ``model`` strictly.

    A ``.pth`` that wraps the weights (``{"model": ...}`` or ``{"state_dict": ...}``, as training scripts
    save them) is unwrapped; it is read with ``weights_only=True`` so a checkpoint cannot run code.

    Raises:
        QuantpipeError: the file is missing or unreadable.
        ArtifactMismatchError: missing, unexpected or mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise QuantpipeError(f"checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is the user's file, say which
        raise QuantpipeError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); pass a .safetensors file or a .pth "
            "state dict saved with torch.save(model.state_dict(), ...)"
        ) from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise QuantpipeError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel/DDP prefix
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise ArtifactMismatchError(
            f"checkpoint {path} does not fit {type(model).__name__} "
            f"'{getattr(model, 'default_cfg', {}).get('architecture', '?')}': {'; '.join(parts)}. "
            "Check that --model names the architecture the checkpoint was trained as"
        )
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s", len(state), path)


def data_config_of(model: torch.nn.Module) -> dict[str, Any]:
    """timm's resolved preprocessing for ``model``, as JSON-ready values (never hard-coded)."""
    cfg = timm.data.resolve_model_data_config(model)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
    }


def weights_source(pretrained: bool, checkpoint: str | Path | None) -> dict[str, Any]:
    """Provenance entry for the weights (a checkpoint is identified by its sha256)."""
    if checkpoint is not None:
        from quantpipe.manifest import sha256_file

        return {"kind": "checkpoint", "path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)}
    return {"kind": "pretrained" if pretrained else "random", "seed": None if pretrained else 0}
