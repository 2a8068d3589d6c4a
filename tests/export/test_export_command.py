"""`quantpipe export` end to end on timm's test ViT: graphs, manifest, verification, engines, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from quantpipe.cli import main
from quantpipe.engines import load_engine, tensorrt_available
from quantpipe.manifest import load_manifest


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("test_vit_export")
    code = main(["export", "--model", "test_vit", "--split", "2,4", "--out", str(out), "--verify-samples", "4", "-q"])
    assert code == 0
    return out


def test_writes_one_graph_per_stage_and_a_valid_manifest(export_dir):
    manifest = load_manifest(export_dir)  # also checks every sha256
    assert manifest.model == "test_vit" and manifest.split == [2, 4] and manifest.num_blocks == 6
    assert [s.file for s in manifest.stages] == ["stage0.onnx", "stage1.onnx", "stage2.onnx"]
    assert [s.blocks for s in manifest.stages] == [(0, 2), (2, 4), (4, 6)]
    assert [(s.input.name, s.output.name) for s in manifest.stages] == [
        ("input", "boundary0"), ("boundary0", "boundary1"), ("boundary1", "logits")]
    assert manifest.stages[0].input.shape == (None, 3, 160, 160)
    assert [b.shape for b in manifest.boundaries] == [(None, 101, 64), (None, 101, 64)]
    assert manifest.stages[2].output.shape == (None, 1000)
    assert manifest.data_config["input_size"] == [3, 160, 160]
    assert manifest.data_config["interpolation"] == "bicubic"
    assert {"torch", "timm", "onnx", "onnxruntime"} <= set(manifest.versions)
    assert manifest.provenance["opset"] == 18
    assert manifest.provenance["weights"]["kind"] == "random"
    verification = manifest.provenance["verification"]
    assert all(c["passed"] for c in verification["comparisons"])
    assert manifest.engines["onnxruntime"]["providers"][-1] == "CPUExecutionProvider"


def test_graphs_pin_the_opset_and_keep_a_dynamic_batch_axis(export_dir):
    for k in range(3):
        graph = onnx.load(str(export_dir / f"stage{k}.onnx"))
        assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]
        for value in [*graph.graph.input, *graph.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed batch


def test_chained_engines_match_torch_at_several_batch_sizes(export_dir):
    from quantpipe.export.model import create_model

    model = create_model("test_vit")  # same seed as the export: same random weights
    manifest = load_manifest(export_dir)
    engines = [load_engine(manifest.stage_path(k), threads=1) for k in range(manifest.num_stages)]
    assert engines[1].input.name == "boundary0" and engines[1].input.shape == (None, 101, 64)
    assert "onnxruntime" in engines[0].describe()
    for batch in (1, 3, 16):
        x = torch.randn(batch, 3, 160, 160, generator=torch.Generator().manual_seed(batch))
        h = x.numpy()
        for engine in engines:
            h = engine.run(h)
        with torch.no_grad():
            ref = model(x).numpy()
        assert h.shape == (batch, 1000)
        assert np.abs(h - ref).max() <= 1e-4 * np.abs(ref).max()
        assert (h.argmax(1) == ref.argmax(1)).all()


def test_verification_fails_loudly_when_graphs_do_not_match_the_model(export_dir):
    from quantpipe.errors import QuantpipeError
    from quantpipe.export.data import random_inputs
    from quantpipe.export.model import create_model
    from quantpipe.export.split import build_stages
    from quantpipe.export.verify import verify_stages

    other = create_model("test_vit")
    with torch.no_grad():
        other.blocks[3].mlp.fc2.bias.add_(0.05)  # a small change in stage 1 only
    report = verify_stages(other, build_stages(other, [2, 4]), [export_dir / f"stage{k}.onnx" for k in range(3)],
                           random_inputs((3, 160, 160), 2))
    failed = [c.name for c in report.failures]
    assert "stage 1 onnx vs torch" in failed and "stage 0 onnx vs torch" not in failed
    with pytest.raises(QuantpipeError, match="verification failed"):
        report.raise_if_failed()


def test_stale_graphs_of_a_longer_split_are_removed(tmp_path):
    from quantpipe.export.command import _remove_stale

    for name in ("stage0.onnx", "stage1.onnx", "stage2.onnx", "stage2.onnx.data", "stage5.onnx", "manifest.json",
                 "stage0.fp16.onnx", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    _remove_stale(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "stage0.fp16.onnx", "stage0.onnx", "stage1.onnx"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model", "test_vit", "--split", "4,2"], "not sorted"),
        (["--model", "test_vit", "--split", "6"], "out of range"),
        (["--model", "test_vit", "--split", "2,2"], "repeats"),
        (["--model", "no_such_vit", "--split", "2"], "unknown timm model"),
        (["--model", "test_vit", "--split", "2", "--batch", "8:4:16"], "MIN <= OPT <= MAX"),
        (["--model", "test_vit", "--split", "2", "--fp16"], "--engine tensorrt"),
        (["--model", "test_vit", "--split", "2", "--opset", "13"], "opset >= 17"),
    ],
)
def test_user_errors_are_one_line_messages(tmp_path, capsys, argv, fragment):
    assert main(["export", *argv, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "quantpipe export: error:" in err and fragment in err
    assert "Traceback" not in err


@pytest.mark.skipif(tensorrt_available(), reason="checks the message shown where TensorRT is missing")
def test_engine_tensorrt_without_tensorrt_says_what_to_install(tmp_path, capsys):
    assert main(["export", "--model", "test_vit", "--split", "2", "--out", str(tmp_path), "--engine", "tensorrt"]) == 1
    assert "pip install 'quantpipe[tensorrt]'" in capsys.readouterr().err


def test_manifest_records_the_command_that_regenerates_it(export_dir):
    command = json.loads((export_dir / "manifest.json").read_text())["provenance"]["command"]
    assert command.startswith("quantpipe export --model test_vit --split 2,4 --out ")


def test_engine_chain_comparison_used_for_tensorrt_plans(export_dir):
    # The same comparison export runs on TensorRT plans, exercised here with onnxruntime engines.
    from quantpipe.export.data import random_inputs
    from quantpipe.export.model import create_model
    from quantpipe.export.verify import compare_engine_chain

    engines = [load_engine(export_dir / f"stage{k}.onnx") for k in range(3)]
    comparison, agreement = compare_engine_chain(engines, create_model("test_vit"), random_inputs((3, 160, 160), 5),
                                                 batch_size=2, name="chain")
    assert comparison.samples == 5 and agreement == 1.0
    assert comparison.passed(rtol=1e-4, min_cosine=0.99999)


def test_without_torch_the_subcommand_is_disabled_with_the_extra_to_install():
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; from quantpipe.cli import main; sys.exit(main(['export', '--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install 'quantpipe[export]'" in result.stderr and "Traceback" not in result.stderr
