"""The served model: what the pipeline takes and returns, in KServe v2 terms, and the conversions.

A request carries exactly one input tensor, in one of three forms (the three inputs of the metadata):

* ``input``  FP32 ``[N, *stage0 input]``: already preprocessed (normalized ``[N, 3, H, W]`` for a
  ViT), sent as it is.
* ``pixels`` UINT8 ``[N, H, W, 3]``: raw RGB pixels of any size, preprocessed like calibration
  (:class:`quantpipe.calib.data.Preprocess`: resize, center crop, /255, normalize).
* ``image``  BYTES ``[N]``: encoded image files (JPEG, PNG, ...), decoded with PIL, then the same.

The first hop carries either float32 (normalized values, 4 bytes per value) or, when stage 0 takes
pixels (stage 0's engine is the export's ``stage0.pixels.onnx``, written by ``quantpipe export
--pixels-stage`` with the normalization folded in: chosen automatically; or ``--first-hop uint8`` on a
builtin pipeline), the uint8 pixels themselves as an exact 8-bit frame (:mod:`quantpipe.serve.bridge`).

The output ``logits`` is the last stage's FP32 output ``[N, ...]``; with Triton's classification
extension it becomes BYTES ``[N, k]`` of ``"value:index:label"`` (labels: the ImageNet wnids shipped
with the package, for 1000-class models).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import ConfigError
from quantpipe.runtime.config import BUILTIN_PREFIX, PipelineConfig
from quantpipe.serve.protocol import InferError, OutputRequest, Tensor

__all__ = ["ServedModel", "BUILTIN_MODEL_NAME", "OUTPUT_NAME"]

#: The model name of a pipeline of builtin engines (no export to take a name from).
BUILTIN_MODEL_NAME = "quantpipe-builtin"
OUTPUT_NAME = "logits"
VERSION = "1"
FIRST_HOPS = ("auto", "float32", "uint8")


@dataclass
class ServedModel:
    """The pipeline as one model.

    Attributes:
        name: model name (the exported timm model's, ``--model-name``, or :data:`BUILTIN_MODEL_NAME`).
        input_shape: stage 0's per-image input shape.
        output_shape: the last stage's per-image output shape.
        first_hop: ``"float32"`` or ``"uint8"`` (what the first link carries).
        preprocess: timm's eval transform for images, or None when stage 0 does not take images.
        labels: class labels for the classification extension (empty: "value:index" only).
    """

    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    first_hop: str = "float32"
    preprocess: Any = None
    labels: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: PipelineConfig, name: str = "", first_hop: str = "auto") -> "ServedModel":
        if first_hop not in FIRST_HOPS:
            raise ConfigError(f"--first-hop {first_hop!r}: choose one of {', '.join(FIRST_HOPS)}")
        builtin = all(s.engine.startswith(BUILTIN_PREFIX) for s in cfg.stages)
        data_config: dict[str, Any] = {}
        pixels = False
        if cfg.stages_dir and not builtin:
            from quantpipe.manifest import load_manifest

            m = load_manifest(cfg.stages_dir, verify=False)
            in_shape = tuple(int(d) for d in m.stages[0].input.shape[1:])
            out_shape = tuple(int(d) for d in m.stages[-1].output.shape[1:])
            data_config, model_name, num_classes = m.data_config, m.model, m.num_classes
            # Stage 0 takes pixels when its engine is the export's folded graph (export --pixels-stage).
            folded = m.pixels_stage0 and (Path(cfg.stages_dir) / str(m.pixels_stage0["file"])).resolve()
            pixels = bool(folded) and Path(cfg.stages[0].engine).resolve() == folded
        elif builtin:
            from quantpipe.runtime.stage import load_stage_engine

            in_shape = tuple(cfg.input_shape)
            out_shape = tuple(int(d) for d in load_stage_engine(cfg, len(cfg.stages) - 1).output.shape[1:])
            model_name, num_classes = BUILTIN_MODEL_NAME, int(np.prod(out_shape))
        else:
            raise ConfigError("serving a pipeline of exported stages needs pipeline.stages_dir (the export directory)")
        if first_hop == "uint8" and not builtin and not pixels:
            raise ConfigError("--first-hop uint8: stage 0's engine takes normalized float32 input; export with "
                              "--pixels-stage and set stage 0's engine = \"stage0.pixels.onnx\", or use --first-hop float32")
        if first_hop == "float32" and pixels:
            raise ConfigError("--first-hop float32: stage 0's engine is the export's pixel-taking graph "
                              f"({cfg.stages[0].engine}); use --first-hop uint8 (or auto)")
        hop = "uint8" if first_hop == "uint8" or (first_hop == "auto" and pixels) else "float32"
        preprocess = None
        if len(in_shape) == 3 and in_shape[0] == 3:
            from quantpipe.calib.data import Preprocess

            preprocess = Preprocess.from_config({**data_config, "input_size": list(in_shape)})
        labels: tuple[str, ...] = ()
        if num_classes == 1000 and not builtin:
            from quantpipe.calib.data import imagenet_wnids

            labels = tuple(imagenet_wnids())
        return cls(name or model_name, in_shape, out_shape, hop, preprocess, labels)

    # -- metadata -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """``GET /v2/models/{name}``: the three accepted inputs and the output."""
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, *self.input_shape]}]
        if self.preprocess is not None:
            inputs += [{"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                       {"name": "image", "datatype": "BYTES", "shape": [-1]}]
        return {"name": self.name, "versions": [VERSION], "platform": "quantpipe",
                "inputs": inputs,
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, *self.output_shape]}]}

    def check_version(self, version: str | None) -> None:
        if version not in (None, "", VERSION):
            raise InferError(f"model '{self.name}' has only version {VERSION}, not {version!r}", 404, "unknown_model")

    # -- inputs -----------------------------------------------------------------------------------
    @property
    def hop_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.first_hop == "uint8" else np.dtype(np.float32)

    def needs_decoding(self, t: Tensor) -> bool:
        """Whether converting ``t`` costs real CPU (image decoding, resizing): run it off the event loop."""
        return t.datatype in ("UINT8", "BYTES")

    def to_stage_input(self, inputs: list[Tensor]) -> np.ndarray:
        """The request's images as stage 0 takes them on the first hop: ``[N, *input_shape]``."""
        if len(inputs) != 1:
            raise InferError(f"send exactly one input tensor (one of {', '.join(self._input_names())}), "
                             f"got {len(inputs)}")
        t = inputs[0]
        expected = {"input": "FP32", "pixels": "UINT8", "image": "BYTES"}
        if t.name not in self._input_names():
            raise InferError(f"unknown input '{t.name}': model '{self.name}' takes one of {', '.join(self._input_names())}")
        if t.datatype != expected[t.name]:
            raise InferError(f"input '{t.name}' must be {expected[t.name]}, got {t.datatype}")
        if t.name == "input":
            if len(t.shape) != 1 + len(self.input_shape) or tuple(t.shape[1:]) != self.input_shape or t.shape[0] < 1:
                raise InferError(f"input 'input' must have shape [N, {', '.join(map(str, self.input_shape))}] "
                                 f"with N >= 1, got {list(t.shape)}")
            x = np.ascontiguousarray(t.data, dtype=np.float32)
            if not np.isfinite(x).all():
                raise InferError("input 'input' holds NaN or infinite values")
            return self._normalized_to_hop(x)
        if t.name == "pixels":
            if len(t.shape) != 4 or t.shape[3] != 3 or min(t.shape) < 1:
                raise InferError(f"input 'pixels' must be UINT8 [N, H, W, 3] RGB, got {list(t.shape)}")
            from PIL import Image

            return self._stack([Image.fromarray(np.ascontiguousarray(img), "RGB") for img in t.data])
        if len(t.shape) != 1 or t.shape[0] < 1:
            raise InferError(f"input 'image' must be BYTES [N] (one encoded file per image), got {list(t.shape)}")
        from PIL import Image, UnidentifiedImageError

        images = []
        for i, blob in enumerate(t.data):
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    im.load()
                    images.append(im.convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                raise InferError(f"input 'image' element {i} is not a readable image file: {exc}") from None
        return self._stack(images)

    def _input_names(self) -> list[str]:
        return ["input", "pixels", "image"] if self.preprocess is not None else ["input"]

    def _stack(self, images: list[Any]) -> np.ndarray:
        # exactly calibration's transform; a uint8 first hop takes its pixels before normalization (the
        # values that normalizing and undoing it would give back, without the float round trip)
        px = np.stack([self.preprocess.pixels(im) for im in images])
        return px if self.first_hop == "uint8" else self.preprocess.normalize(px)

    def _normalized_to_hop(self, x: np.ndarray) -> np.ndarray:
        if self.first_hop == "float32":
            return x
        # uint8 first hop: stage 0 takes pixel values 0..255. Preprocessed images are (p/255 - mean)/std
        # of integer p, so undoing the normalization and rounding recovers p exactly.
        mean = np.asarray(self.preprocess.mean, np.float32)[:, None, None]
        std = np.asarray(self.preprocess.std, np.float32)[:, None, None]
        return np.clip(np.rint((x * std + mean) * np.float32(255)), 0, 255).astype(np.uint8)

    # -- outputs ----------------------------------------------------------------------------------
    def outputs(self, y: np.ndarray, wanted: list[OutputRequest] | None,
                binary_default: bool) -> list[tuple[str, str, np.ndarray, bool]]:
        """(name, datatype, array, binary) for each requested output of logits ``y``."""
        if wanted is None:
            return [(OUTPUT_NAME, "FP32", y, binary_default)]
        self.check_outputs(wanted)
        out = []
        for o in wanted:
            if o.classification:
                out.append((o.name, "BYTES", self.classify(y, o.classification), o.binary))
            else:
                out.append((o.name, "FP32", y, o.binary))
        return out

    def check_outputs(self, wanted: list[OutputRequest] | None) -> None:
        """Refuse unknown outputs before the request spends the pipeline's time."""
        for o in wanted or ():
            if o.name != OUTPUT_NAME:
                raise InferError(f"unknown output '{o.name}': model '{self.name}' has output '{OUTPUT_NAME}'")

    def classify(self, y: np.ndarray, k: int) -> np.ndarray:
        """Triton's classification extension: the k best ``"value:index(:label)"`` per image."""
        z = y.reshape(len(y), -1)
        k = min(k, z.shape[1])
        top = np.argsort(-z, axis=1, kind="stable")[:, :k]
        out = np.empty((len(z), k), dtype=object)
        for i in range(len(z)):
            for j, c in enumerate(top[i]):
                label = f":{self.labels[c]}" if c < len(self.labels) else ""
                out[i, j] = f"{z[i, c]:f}:{c}{label}".encode()
        return out
