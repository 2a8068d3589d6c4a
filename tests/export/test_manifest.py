"""The stage manifest: round trip, and refusal of foreign, newer, inconsistent or modified exports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantpipe.errors import ArtifactMismatchError, QuantpipeError
from quantpipe.manifest import (
    BoundaryInfo,
    StageInfo,
    StageManifest,
    TensorInfo,
    load_manifest,
    sha256_file,
)


def _write_export(tmp_path, external: bool = False) -> StageManifest:
    names = [("input", "boundary0"), ("boundary0", "boundary1"), ("boundary1", "logits")]
    shapes = [(None, 3, 32, 32), (None, 5, 8), (None, 5, 8), (None, 10)]
    stages = []
    for k, (name_in, name_out) in enumerate(names):
        path = tmp_path / f"stage{k}.onnx"
        path.write_bytes(f"graph {k}".encode())
        data = None
        if external and k == 1:
            data = tmp_path / "stage1.onnx.data"
            data.write_bytes(b"weights")
        stages.append(
            StageInfo(
                index=k, file=path.name, sha256=sha256_file(path),
                input=TensorInfo(name_in, shapes[k]), output=TensorInfo(name_out, shapes[k + 1]),
                blocks=(2 * k, 2 * k + 2),
                data_file=data.name if data else None, data_sha256=sha256_file(data) if data else None,
            )
        )
    manifest = StageManifest(
        model="test_vit", split=[2, 4], num_blocks=6, stages=stages,
        boundaries=[BoundaryInfo(0, (None, 5, 8)), BoundaryInfo(1, (None, 5, 8))],
        data_config={"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
                     "mean": [0.5] * 3, "std": [0.5] * 3},
        num_classes=10, versions={"onnx": "x"},
        provenance={"command": "quantpipe export --model test_vit --split 2,4 --out D"},
    )
    manifest.write(tmp_path)
    return manifest


def test_round_trip(tmp_path):
    written = _write_export(tmp_path, external=True)
    loaded = load_manifest(tmp_path)
    assert loaded.to_dict() == written.to_dict()
    assert loaded.stages[1].data_file == "stage1.onnx.data"
    assert loaded.boundaries[1].name == "boundary1"
    assert loaded.stage_path(2) == (tmp_path / "stage2.onnx").resolve()
    assert load_manifest(tmp_path / "manifest.json").num_stages == 3
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["format"] == "quantpipe.stages" and on_disk["version"] == 1
    assert on_disk["stages"][0]["input"] == {"name": "input", "shape": [None, 3, 32, 32]}


def test_modified_stage_is_refused_with_the_regenerate_command(tmp_path):
    _write_export(tmp_path)
    (tmp_path / "stage1.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactMismatchError, match="stage 1 .*sha256.*quantpipe export --model test_vit --split 2,4"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path, verify=False).num_stages == 3  # structure alone still reads


def test_modified_external_data_is_refused(tmp_path):
    _write_export(tmp_path, external=True)
    (tmp_path / "stage1.onnx.data").write_bytes(b"other weights")
    with pytest.raises(ArtifactMismatchError, match="stage1.onnx.data"):
        load_manifest(tmp_path)


def test_missing_stage_file(tmp_path):
    _write_export(tmp_path)
    (tmp_path / "stage2.onnx").unlink()
    with pytest.raises(ArtifactMismatchError, match="stage2.onnx is missing"):
        load_manifest(tmp_path)


def test_not_an_export_dir(tmp_path):
    with pytest.raises(QuantpipeError, match="not an export directory.*quantpipe export"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d.update(format="something.else"), "format 'something.else'"),
        (lambda d: d.update(version=2), "version 2.*Re-export"),
        (lambda d: d.pop("stages"), "malformed"),
        (lambda d: d["stages"][1]["input"].update(name="boundary7"), "inconsistent.*boundary7"),
        (lambda d: d.update(split=[2]), "inconsistent"),
    ],
)
def test_foreign_or_edited_manifests_are_refused(tmp_path, edit, fragment):
    _write_export(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(QuantpipeError, match=fragment):
        load_manifest(tmp_path)


def test_unparseable_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(QuantpipeError, match="cannot read"):
        load_manifest(tmp_path)


def test_manifest_and_engines_do_not_import_torch_or_timm():
    # Stage daemons on devices import these without torch; a stray import would make them fail there.
    code = (
        "import sys, quantpipe.manifest, quantpipe.engines, quantpipe.engines.onnxruntime, quantpipe.engines.tensorrt;"
        "bad = [m for m in ('torch', 'timm', 'onnx', 'tensorrt') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
