"""The clip table file: exact round trip, digest, refusals, and use as the wire's RangeProvider."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from quantpipe import wire
from quantpipe.errors import ArtifactMismatchError, FrameError, QuantpipeError
from quantpipe.quant.table import ClipTable, canonical_sha256

C = 16


def _rotation(c: int, seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((c, c)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _manifest(hashes=("a" * 64, "b" * 64, "c" * 64)) -> dict:
    return {"model": "m", "split": [1, 2], "stages": [{"index": i, "file": f"stage{i}.onnx", "sha256": h}
                                                     for i, h in enumerate(hashes)]}


def make_table(bits=(2, 4, 8, 16), seed: int = 0) -> ClipTable:
    rng = np.random.default_rng(seed)
    methods = [
        {"name": "naive", "granularity": "tensor", "transform": None, "description": "min/max"},
        {"name": "mse_pc", "granularity": "channel", "transform": None, "description": "per channel"},
        {"name": "rot_mse_pc", "granularity": "channel", "transform": {"key": "hadamard-0", "kind": "hadamard", "seed": 0},
         "description": "rotated"},
    ]
    boundaries = []
    for b in range(2):
        ranges = {
            "naive": {k: (np.float32(-3.1), np.float32(2.7)) for k in bits},
            "mse_pc": {k: (-rng.uniform(1, 3, C).astype(np.float32), rng.uniform(1, 3, C).astype(np.float32)) for k in bits},
            "rot_mse_pc": {k: (np.full(C, -2.5, np.float32), np.full(C, 2.5, np.float32)) for k in bits},
        }
        boundaries.append({"index": b, "shape": [None, 5, C], "channels": C, "ranges": ranges,
                           "transforms": {"hadamard-0": _rotation(C, b)}})
    prov = {"model": "m", "split": [1, 2], "stages": _manifest()["stages"], "dataset": {"kind": "synthetic"},
            "num_images": 4, "command": "quantpipe calibrate --stages S --dataset synthetic --out T"}
    return ClipTable.build(methods=methods, bits=bits, boundaries=boundaries, provenance=prov)


def test_save_load_round_trip_is_exact(tmp_path):
    table = make_table()
    path = table.save(tmp_path / "t.json")
    loaded = ClipTable.load(path, manifest=_manifest())
    assert loaded.digest == table.digest and loaded.sha256 == table.sha256
    assert loaded.methods == ("naive", "mse_pc", "rot_mse_pc") and loaded.bits == (2, 4, 8, 16)
    assert loaded.boundaries == (0, 1)
    for b in loaded.boundaries:
        for m in range(3):
            for k in loaded.bits:
                lo, hi = loaded.ranges(b, m, k)
                lo0, hi0 = table.ranges(b, m, k)
                assert lo.dtype == np.float32 and np.array_equal(lo, lo0) and np.array_equal(hi, hi0)
        assert np.array_equal(loaded.transform(b, 2), table.transform(b, 2))
        assert loaded.transform(b, 0) is None
    assert np.ndim(loaded.ranges(0, 0, 2)[0]) == 0 and loaded.ranges(0, 1, 2)[0].shape == (C,)
    # a second save writes the same bytes: the format is deterministic
    assert loaded.save(tmp_path / "u.json").read_bytes() == path.read_bytes()


def test_digest_covers_the_decoding_content_only(tmp_path):
    table = make_table()
    doc = json.loads(table.save(tmp_path / "t.json").read_text())
    assert canonical_sha256(doc) == doc["content_sha256"] == table.sha256
    body = {k: doc[k] for k in ("bits", "methods", "boundaries")}
    sha = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert table.digest == int.from_bytes(sha[:4], "little")
    assert make_table(seed=1).digest != table.digest
    # the same ranges calibrated at another time (other provenance) interoperate on the wire
    doc["provenance"]["created"] = "another day"
    doc["content_sha256"] = canonical_sha256(doc)
    (tmp_path / "u.json").write_text(json.dumps(doc))
    other = ClipTable.load(tmp_path / "u.json")
    assert other.sha256 != table.sha256 and other.digest == table.digest


def test_file_is_readable_json_with_provenance(tmp_path):
    text = make_table().save(tmp_path / "t.json").read_text()
    doc = json.loads(text)
    assert doc["format"] == "quantpipe.cliptable" and doc["version"] == 1
    assert doc["provenance"]["num_images"] == 4 and doc["provenance"]["stages"][2]["sha256"] == "c" * 64
    assert "-3.1" in text  # float32 values written as their shortest decimal
    assert len(text.splitlines()) < 400  # number lists on one line each


def test_edited_table_is_refused(tmp_path):
    path = make_table().save(tmp_path / "t.json")
    path.write_text(path.read_text().replace("-3.1", "-3.2", 1))
    with pytest.raises(QuantpipeError, match="quantpipe calibrate"):
        ClipTable.load(path)


def test_newer_version_and_garbage_are_refused(tmp_path):
    doc = make_table().to_dict()
    doc["version"] = 99
    doc["content_sha256"] = canonical_sha256(doc)
    (tmp_path / "v.json").write_text(json.dumps(doc))
    with pytest.raises(QuantpipeError, match="upgrade quantpipe"):
        ClipTable.load(tmp_path / "v.json")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(QuantpipeError, match="quantpipe calibrate"):
        ClipTable.load(tmp_path / "g.json")
    with pytest.raises(QuantpipeError, match="does not exist"):
        ClipTable.load(tmp_path / "missing.json")


def test_non_orthogonal_rotation_and_bad_shapes_are_refused():
    doc = make_table().to_dict()
    doc["boundaries"][0]["transforms"]["hadamard-0"][0][0] += 0.5
    doc["content_sha256"] = canonical_sha256(doc)
    with pytest.raises(QuantpipeError, match="not orthogonal"):
        ClipTable(doc)
    doc = make_table().to_dict()
    doc["boundaries"][1]["ranges"]["mse_pc"]["4"]["lo"] = [0.0] * (C - 1)
    doc["content_sha256"] = canonical_sha256(doc)
    with pytest.raises(QuantpipeError, match="shape"):
        ClipTable(doc)
    doc = make_table().to_dict()
    doc["boundaries"][0]["ranges"]["naive"]["2"] = {"lo": 1.0, "hi": -1.0}
    doc["content_sha256"] = canonical_sha256(doc)
    with pytest.raises(QuantpipeError, match="inverted"):
        ClipTable(doc)


def test_stage_mismatch_says_how_to_regenerate(tmp_path):
    path = make_table().save(tmp_path / "t.json")
    with pytest.raises(ArtifactMismatchError, match="quantpipe calibrate --stages S"):
        ClipTable.load(path, manifest=_manifest(("a" * 64, "b" * 64, "d" * 64)))
    # a stage directory works as the manifest too
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "manifest.json").write_text(json.dumps(_manifest()))
    ClipTable.load(path, manifest=tmp_path / "stages")


def test_lookups_and_errors():
    table = make_table()
    assert table.method_index("rot_mse_pc") == 2
    with pytest.raises(QuantpipeError, match="naive, mse_pc, rot_mse_pc"):
        table.method_index("nope")
    with pytest.raises(KeyError):
        table.ranges(0, 0, 3)
    with pytest.raises(KeyError):
        table.ranges(5, 0, 2)
    with pytest.raises(KeyError):
        table.transform(0, 7)


@pytest.mark.parametrize("method", ["naive", "mse_pc", "rot_mse_pc"])
def test_table_is_the_wire_range_provider(method):
    table = make_table()
    m = table.method_index(method)
    # inside every range, also after rotation (|(x @ R)_j| <= ||x_row|| <= 2)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (3, 5, C)).astype(np.float32)
    frames = wire.encode_frame(x, seq=1, first_id=0, stage=0, bits=16, table=table, boundary=1, method=m)
    header, y = wire.decode_frame(frames, table=table)
    assert header.table_digest == table.digest and header.method == m
    assert np.abs(y - x).max() < 1e-3  # 16 bits over a range of ~6: step <= 1e-4, plus the rotation round trip
    # a receiver holding another table refuses the frame instead of decoding garbage
    with pytest.raises(FrameError) as err:
        wire.decode_frame(frames, table=make_table(seed=3))
    assert err.value.kind == "table"


def test_rotation_is_applied_before_quantization():
    table = make_table()
    x = np.random.default_rng(1).normal(0, 1, (2, 5, C)).astype(np.float32)
    m = table.method_index("rot_mse_pc")
    frames = wire.encode_frame(x, seq=0, first_id=0, stage=0, bits=8, table=table, boundary=0, method=m)
    _, y = wire.decode_frame(frames, table=table)
    r = table.transform(0, m)
    lo, hi = table.ranges(0, m, 8)
    from quantpipe.quant import primitives

    expected = primitives.dequantize(primitives.quantize(x @ r, lo, hi, 8), lo, hi, 8) @ r.T
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_table_module_imports_numpy_and_json_only():
    code = ("import sys; import quantpipe.quant.table; heavy = [m for m in ('torch', 'timm', 'PIL', 'onnx', "
            "'onnxruntime', 'matplotlib', 'tqdm') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
