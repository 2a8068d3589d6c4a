"""Cut a timm ViT into verified per-stage ONNX graphs (and engines) for a QuantPipe pipeline.

``quantpipe export --model deit_tiny_patch16_224 --checkpoint W.safetensors --split 4,8 --out DIR``
writes ``DIR/stage0.onnx ... stageN.onnx`` and ``DIR/manifest.json`` (read it with
:func:`quantpipe.manifest.load_manifest`). Verification against the torch model is on by default and a
result beyond tolerance is an error; the manifest is written only after the graphs pass.
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# Imported at module level on purpose: when torch, timm, onnx or tqdm is missing, the CLI's lazy registry
# catches the ModuleNotFoundError on import and disables only this subcommand, naming the extra to install.
import numpy
import onnx
import onnxruntime
import onnxscript
import timm
import torch
from tqdm import tqdm

import quantpipe
from quantpipe.engines import load_engine, tensorrt_available
from quantpipe.engines.tensorrt import TensorRTEngine, build_stage_engines, max_onnx_opset, needs_fp16_graph
from quantpipe.errors import ConfigError, MissingDependencyError, QuantpipeError
from quantpipe.export.data import image_inputs, random_inputs
from quantpipe.export.model import create_model, data_config_of, weights_source
from quantpipe.export.onnx_export import DEFAULT_OPSET, MIN_OPSET, export_stage
from quantpipe.export.split import HalfStage, PixelStage, build_stages, parse_split, stage_io_names
from quantpipe.export.verify import (
    DEFAULT_MIN_COSINE,
    DEFAULT_RTOL,
    Comparison,
    check_graphs,
    compare_engine_chain,
    verify_stages,
)
from quantpipe.manifest import BoundaryInfo, StageInfo, StageManifest, TensorInfo, sha256_file

__all__ = ["add_arguments", "run", "parse_batch"]

log = logging.getLogger("quantpipe.export")


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"1:8:32"`` -> ``(1, 8, 32)``, the TensorRT optimization profile's batch range (min <= opt <= max)."""
    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--batch {text!r} must be MIN:OPT:MAX, e.g. 1:8:32") from None
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"--batch {text!r} needs 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="timm model name (vit_*, deit_*, test_vit)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights from the Hugging Face hub")
    weights.add_argument("--checkpoint", type=Path, metavar="FILE", help=".safetensors or .pth state dict (strict load)")
    parser.add_argument("--split", required=True, help="block indices where a new stage starts, e.g. 4,8")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="export directory")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--batch", default="1:8:32", metavar="MIN:OPT:MAX", help="batch range of engines (default 1:8:32)")
    parser.add_argument("--fp16", action="store_true", help="build TensorRT engines in fp16 (with --engine tensorrt)")
    parser.add_argument("--engine", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                        help="engine to prepare for the stages (default onnxruntime)")
    group = parser.add_argument_group("verification")
    group.add_argument("--verify-data", type=Path, metavar="DIR", help="ImageFolder of real images (default: random input)")
    group.add_argument("--verify-samples", type=int, default=None, metavar="N",
                       help="samples to verify on (default 64 images from --verify-data, else 8 random inputs; "
                       "0 = every image)")
    group.add_argument("--verify-batch", type=int, default=8, metavar="B", help="batch size while verifying")
    group.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"max |onnx-torch| / max |torch| (default {DEFAULT_RTOL:g})")
    group.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE, help=f"min cosine similarity (default {DEFAULT_MIN_COSINE})")
    group.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads while verifying")
    parser.add_argument("--pixels-stage", action="store_true",
                        help="also write stage0.pixels.onnx: stage 0 with the normalization folded in, taking pixel "
                        "values 0..255 (name it as stage 0's engine; quantpipe serve then sends uint8 pixels)")


def _command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this export (stored in the manifest for error messages)."""
    parts = ["quantpipe", "export", "--model", args.model]
    if args.pretrained:
        parts.append("--pretrained")
    if args.checkpoint is not None:
        parts += ["--checkpoint", str(Path(args.checkpoint).resolve())]
    parts += ["--split", args.split, "--out", str(Path(args.out).resolve()), "--opset", str(args.opset)]
    if args.engine != "onnxruntime":
        parts += ["--engine", args.engine, "--batch", args.batch] + (["--fp16"] if args.fp16 else [])
    if args.verify_data is not None:
        parts += ["--verify-data", str(Path(args.verify_data).resolve())]
    if getattr(args, "pixels_stage", False):
        parts.append("--pixels-stage")
    return shlex.join(parts)


def _versions() -> dict[str, str]:
    return {
        "quantpipe": quantpipe.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def _remove_stale(out: Path, num_stages: int) -> None:
    # A previous export with more stages (or the manifest of one) must not be mistaken for this one.
    (out / "manifest.json").unlink(missing_ok=True)
    for path in out.glob("stage*.onnx*"):
        m = re.fullmatch(r"stage(\d+)\.onnx(\.data)?", path.name)
        if m and int(m.group(1)) >= num_stages:
            path.unlink()


def _check_args(args: argparse.Namespace) -> tuple[int, int, int]:
    """Refuse bad flag combinations before the slow work starts; return the batch range."""
    batch = parse_batch(args.batch)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory for the stage graphs and manifest")
    if args.opset < MIN_OPSET:
        raise ConfigError(f"--opset {args.opset} is too old: ViT stages need LayerNormalization, opset >= {MIN_OPSET}")
    if args.fp16 and args.engine != "tensorrt":
        raise ConfigError("--fp16 applies to TensorRT engines; add --engine tensorrt (the ONNX graphs stay float32)")
    if args.engine == "tensorrt" and not tensorrt_available():
        raise MissingDependencyError(
            "--engine tensorrt needs TensorRT's Python package, which is not installed: pip install "
            "'quantpipe[tensorrt]' (tensorrt>=8.6 and polygraphy) on a machine with an NVIDIA GPU and driver, or use "
            "--engine onnxruntime"
        )
    if args.engine == "tensorrt" and (limit := max_onnx_opset()) is not None and args.opset > limit:
        raise ConfigError(f"this TensorRT reads ONNX opsets up to {limit}; add --opset {limit}")
    if (args.verify_samples is not None and args.verify_samples < 0) or args.verify_batch < 1:
        raise ConfigError("--verify-samples must be >= 0 and --verify-batch >= 1")
    return batch


def _export_graphs(stages: list[Any], bounds: list[int], input_size: list[int], out: Path, opset: int,
                   progress: Any) -> list[Any]:
    """Export every stage; each stage's example input is the previous stage's real output."""
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    graphs = []
    for k, stage in enumerate(stages):
        progress.set_postfix_str(f"stage {k} to ONNX")
        name_in, name_out = stage_io_names(k, len(stages))
        graphs.append(export_stage(stage, example, out / f"stage{k}.onnx", name_in, name_out, opset=opset))
        with torch.no_grad():
            example = stage(example)
        log.info("stage %d (blocks %d-%d): %s %s -> %s %s", k, bounds[k], bounds[k + 1] - 1,
                 name_in, list(graphs[-1].input_shape), name_out, list(graphs[-1].output_shape))
        progress.update()
    return graphs


def _stage_infos(graphs: list[Any], bounds: list[int]) -> list[Any]:
    return [
        StageInfo(
            index=k,
            file=g.path.name,
            sha256=sha256_file(g.path),
            input=TensorInfo(g.input_name, g.input_shape),
            output=TensorInfo(g.output_name, g.output_shape),
            blocks=(bounds[k], bounds[k + 1]),
            data_file=g.data_path.name if g.data_path else None,
            data_sha256=sha256_file(g.data_path) if g.data_path else None,
        )
        for k, g in enumerate(graphs)
    ]


def run(args: argparse.Namespace) -> int:
    # onnx_ir and onnxscript log every graph rewrite at INFO; that is exporter detail, not export progress.
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    batch = _check_args(args)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    num_blocks = len(model.blocks)
    cuts = parse_split(args.split, num_blocks)
    stages = build_stages(model, cuts)
    bounds = [0, *cuts, num_blocks]
    data_config = data_config_of(model)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, len(stages))
    timings["load_model"] = time.perf_counter() - started
    log.info("%s: %d blocks, split %s -> %d stages, input %s", args.model, num_blocks, cuts, len(stages), data_config["input_size"])

    steps = len(stages) + 1 + (0 if args.no_verify else 1) + (len(stages) if args.engine == "tensorrt" else 0)
    report = None
    with tqdm(total=steps, desc="export", unit="step", disable=None, file=sys.stderr) as bar:
        t0 = time.perf_counter()
        graphs = _export_graphs(stages, bounds, data_config["input_size"], out, args.opset, bar)
        timings["export_onnx"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        bar.set_postfix_str("onnx.checker")
        check_graphs([g.path for g in graphs])
        bar.update()
        timings["check"] = time.perf_counter() - t0

        if not args.no_verify:
            t0 = time.perf_counter()
            bar.set_postfix_str("verify in onnxruntime")
            if args.verify_data is not None:
                limit = 64 if args.verify_samples is None else (args.verify_samples or None)
                inputs = image_inputs(args.verify_data, data_config, limit)
            else:
                inputs = random_inputs(data_config["input_size"], args.verify_samples or 8)
            with tqdm(total=len(inputs.labels), desc="verify", unit="sample", disable=None, leave=False,
                      file=sys.stderr) as samples:
                report = verify_stages(model, stages, [g.path for g in graphs], inputs, batch_size=args.verify_batch,
                                       rtol=args.rtol, min_cosine=args.min_cosine, threads=args.threads,
                                       progress=samples.update)
            bar.update()
            timings["verify"] = time.perf_counter() - t0
            report.raise_if_failed()  # before the manifest: unverified graphs must not look usable

        manifest = StageManifest(
            model=args.model,
            split=cuts,
            num_blocks=num_blocks,
            stages=_stage_infos(graphs, bounds),
            boundaries=[BoundaryInfo(k, g.output_shape) for k, g in enumerate(graphs[:-1])],
            data_config=data_config,
            num_classes=int(model.num_classes),
            versions=_versions(),
            provenance={
                "weights": weights_source(args.pretrained, args.checkpoint),
                "opset": args.opset,
                "exporter": "torch.onnx.export(dynamo=True)",
                "command": _command_line(args),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "verification": report.to_dict() if report is not None else None,
            },
            directory=out,
        )
        if args.pixels_stage:
            t0 = time.perf_counter()
            bar.set_postfix_str("stage 0 taking pixels")
            manifest.pixels_stage0 = _export_pixel_stage(stages[0], graphs[0].path, out, args.opset, data_config,
                                                         args.rtol, args.threads)
            timings["pixels_stage"] = time.perf_counter() - t0
        if args.engine == "tensorrt":
            t0 = time.perf_counter()
            bar.set_postfix_str("TensorRT engines")
            sources = [manifest.stage_path(k) for k in range(len(stages))]
            if args.fp16 and needs_fp16_graph():
                sources = _export_half_graphs(stages, graphs, out, args.opset, data_config)
            entry = build_stage_engines(sources, out / "engines", batch=batch, fp16=args.fp16, progress=bar.update)
            if report is not None:
                entry["verification"] = _verify_tensorrt(entry, out, model, inputs, min(args.verify_batch, batch[2]),
                                                         args.fp16)
            manifest.engines["tensorrt"] = entry
            timings["build_engines"] = time.perf_counter() - t0
        else:
            manifest.engines["onnxruntime"] = _onnxruntime_entry(manifest, args.threads)
    timings["total"] = time.perf_counter() - started
    manifest.provenance["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    path = manifest.write(out)

    for line in report.lines() if report is not None else ["verification skipped (--no-verify)"]:
        print(line)
    if "tensorrt" in manifest.engines and "verification" in manifest.engines["tensorrt"]:
        v = manifest.engines["tensorrt"]["verification"]
        print(f"  tensorrt chain vs torch model: max abs {v['max_abs']:.3e}  rel {v['rel']:.3e}  "
              f"min cosine {v['min_cosine']:.8f}  top-1 agreement {v['top1_agreement'] * 100:.2f}%")
    print(f"wrote {len(stages)} stages and {path} in {timings['total']:.1f} s "
          f"(model {timings['load_model']:.1f} s, ONNX export {timings['export_onnx']:.1f} s"
          + (f", verify {timings['verify']:.1f} s" if "verify" in timings else "") + ")")
    if manifest.pixels_stage0 is not None:
        v = manifest.pixels_stage0["verification"]
        print(f"  {PIXELS_FILE}: stage 0 taking pixels 0..255, vs stage0.onnx on the same pixels: max abs "
              f"{v['max_abs']:.3e}  rel {v['rel']:.3e}")
    for s in manifest.stages:
        size = (out / s.file).stat().st_size / 2**20
        print(f"  {s.file}: blocks {s.blocks[0]}-{s.blocks[1] - 1}  {s.input.name} {list(s.input.shape)} -> "
              f"{s.output.name} {list(s.output.shape)}  {size:.1f} MiB  sha256 {s.sha256[:12]}")
    return 0


PIXELS_FILE = "stage0.pixels.onnx"


def _export_pixel_stage(stage0: Any, plain: Path, out: Path, opset: int, data_config: dict[str, Any],
                        rtol: float, threads: int | None) -> dict[str, Any]:
    """Export stage 0 with the normalization folded in and check it against the plain stage 0 on
    random integer pixels normalized like calibration does (float32, the same operations)."""
    c, h, w = data_config["input_size"]
    pixels = numpy.random.default_rng(0).integers(0, 256, (4, c, h, w)).astype(numpy.float32)
    folded = PixelStage(stage0, data_config["mean"], data_config["std"]).eval()
    graph = export_stage(folded, torch.from_numpy(pixels[:2]), out / PIXELS_FILE, "input", "boundary0", opset=opset)
    mean = numpy.asarray(data_config["mean"], numpy.float32)[:, None, None]
    std = numpy.asarray(data_config["std"], numpy.float32)[:, None, None]
    normalized = ((pixels / numpy.float32(255)) - mean) / std
    a = load_engine(plain, threads=threads).run(normalized)
    b = load_engine(out / PIXELS_FILE, threads=threads).run(pixels)
    max_abs = float(numpy.abs(a - b).max())
    rel = max_abs / max(float(numpy.abs(a).max()), 1e-30)
    if rel > rtol:
        raise QuantpipeError(f"{PIXELS_FILE} differs from stage0.onnx by {rel:.3g} (relative) on the same pixels; "
                             "export without --pixels-stage and report this")
    return {"file": PIXELS_FILE, "sha256": sha256_file(out / PIXELS_FILE),
            "input": {"name": graph.input_name, "shape": list(graph.input_shape), "pixels": True},
            "verification": {"samples": len(pixels), "max_abs": max_abs, "rel": rel}}


def _export_half_graphs(stages: list[Any], graphs: list[Any], out: Path, opset: int,
                        data_config: dict[str, Any]) -> list[Path]:
    """fp16 copies of the stage graphs (float32 I/O) for TensorRT versions that only build strongly typed."""
    example = torch.randn(2, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
    paths = []
    for k, (stage, g) in enumerate(zip(stages, graphs)):
        half = export_stage(HalfStage(stage).eval(), example, out / f"stage{k}.fp16.onnx", g.input_name, g.output_name,
                            opset=opset)
        paths.append(half.path.resolve())
        check_graphs([half.path])
        # fp16 cannot meet the fp32 tolerance; check only that the half graph computes the same function.
        engine = load_engine(half.path, backend="onnxruntime", providers=["CPUExecutionProvider"])
        with torch.no_grad():
            reference = stage(example)
        comparison = Comparison(f"stage {k} fp16 onnx vs torch")
        comparison.update(engine.run(example.numpy()), reference.numpy())
        engine.close()
        log.info("%s", comparison.line())
        if not comparison.passed(rtol=2e-2, min_cosine=0.999):
            raise QuantpipeError(f"the fp16 graph of stage {k} is too far from fp32: {comparison.line()}")
        example = reference
    return paths


def _verify_tensorrt(entry: dict[str, Any], out: Path, model: Any, inputs: Any, batch_size: int,
                     fp16: bool) -> dict[str, Any]:
    """Run the built plans as a chain on the verification inputs and compare with torch.

    fp32 plans are built without TF32, so they should agree with torch about as closely as onnxruntime;
    fp16 plans are held to a cosine bound only, as fp16 rounding is far above the fp32 tolerance.
    """

    engines = [TensorRTEngine(out / s["plan"]) for s in entry["stages"]]
    try:
        comparison, agreement = compare_engine_chain(engines, model, inputs, batch_size,
                                                     f"tensorrt {entry['precision']} chain vs torch model")
    finally:
        for engine in engines:
            engine.close()
    rtol, min_cosine = (5e-2, 0.999) if fp16 else (1e-3, 0.9999)
    if not comparison.passed(rtol, min_cosine):
        raise QuantpipeError(
            f"the TensorRT engines do not reproduce the model (rel {comparison.rel:.2e} > {rtol:g} or cosine "
            f"{comparison.min_cosine:.6f} < {min_cosine}); rebuild without --fp16 or report the model and TensorRT version"
        )
    return {"max_abs": comparison.max_abs, "rel": comparison.rel, "min_cosine": comparison.min_cosine,
            "top1_agreement": agreement, "samples": comparison.samples}


def _onnxruntime_entry(manifest: Any, threads: int | None) -> dict[str, Any]:
    """Load each stage with the default provider order, so the manifest records what a device here would use."""
    providers: list[str] = []
    for k in range(manifest.num_stages):
        engine = load_engine(manifest.stage_path(k), backend="onnxruntime", threads=threads)
        providers = engine.providers
        engine.close()
    return {"version": onnxruntime.__version__, "available_providers": onnxruntime.get_available_providers(),
            "providers": providers}
