"""The clip table: calibrated clip ranges for every boundary, method and bitwidth, in one JSON file.

The stage daemons load it (this module imports numpy and json only) and use it as the
:class:`quantpipe.wire.RangeProvider` of their frames: a frame names its boundary, its method (an
index into :attr:`ClipTable.methods`) and its bitwidth, and carries the first 4 bytes of the table's
sha256 (:attr:`ClipTable.digest`) so that a receiver holding another table refuses it.

File layout (``format`` = ``"quantpipe.cliptable"``, ``version`` = 1)::

    {"format": "quantpipe.cliptable", "version": 1,
     "content_sha256": "<sha256 of the canonical content, see below>",
     "provenance": {"model": ..., "split": [4, 8], "stages": [{"index": 0, "file": ..., "sha256": ...}],
                    "dataset": {...}, "num_images": 300, "tool": {...}, "created": ..., "command": ...},
     "bits": [2, 3, 4, 5, 6, 8, 16],
     "methods": [{"name": "naive", "granularity": "tensor", "transform": null, "description": ...},
                 {"name": "rot_mse_pc", "granularity": "channel",
                  "transform": {"key": "hadamard-0", "kind": "hadamard", "seed": 0}, ...}, ...],
     "boundaries": [{"index": 0, "shape": [null, 197, 192], "channels": 192,
                     "transforms": {"hadamard-0": [[...192 floats...], ...]},
                     "ranges": {"naive": {"2": {"lo": -51.2, "hi": 60.1}, ...},
                                "mse_pc": {"2": {"lo": [...192...], "hi": [...]}, ...}, ...}}, ...]}

Every number is a float32 value written as the shortest decimal that reads back to the same float32,
so the file round-trips exactly. Per-tensor methods store scalars, per-channel methods lists of length
``channels`` (the last axis of the boundary tensor).

Rotation matrices are *stored* (not regenerated from their seed): a table then means the same thing
on every device whatever version of the generator it runs; ``transform.kind``/``seed`` only record
how the matrix was made. Methods sharing a rotation share one stored matrix per boundary (under the
method's ``transform.key``). Loading checks every matrix is orthogonal.

``content_sha256`` covers everything except itself: the canonical content is
``json.dumps(content, sort_keys=True, separators=(",", ":"))`` of the other keys. Loading recomputes it
and refuses a file whose content does not match (a hand edit or a corrupted copy).

The wire :attr:`ClipTable.digest` covers only what decoding depends on (``bits``, ``methods``,
``boundaries``), not the provenance: two calibrations that produce the same ranges (say, run on two
devices with the same command) interoperate even though their creation times differ.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import ArtifactMismatchError, QuantpipeError

__all__ = ["TABLE_FORMAT", "TABLE_VERSION", "ClipTable", "canonical_sha256", "stage_hashes"]

TABLE_FORMAT = "quantpipe.cliptable"
TABLE_VERSION = 1
_GRANULARITIES = ("tensor", "channel")
# Orthogonality tolerance of a stored rotation: float32 rounding of a 768x768 matrix stays far below.
_ORTHO_TOL = 1e-4


#: The keys a receiver decodes with; the wire digest covers these and nothing else.
_DECODING_KEYS = ("bits", "methods", "boundaries")

def canonical_sha256(content: Mapping[str, Any]) -> str:
    """Hex sha256 of the canonical JSON form of ``content`` (without its ``content_sha256`` key)."""
    body = {k: v for k, v in content.items() if k != "content_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stage_hashes(manifest: Any) -> list[str]:
    """The sha256 of every stage graph of a manifest given as a dict, a manifest object or a stage dir."""
    if isinstance(manifest, (str, Path)):
        path = Path(manifest)
        path = path / "manifest.json" if path.is_dir() else path
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise QuantpipeError(f"cannot read stage manifest {path}: {exc}; run 'quantpipe export' first") from None
    stages = manifest["stages"] if isinstance(manifest, Mapping) else getattr(manifest, "stages")
    return [str(s["sha256"] if isinstance(s, Mapping) else getattr(s, "sha256")) for s in stages]


def _f32(v: Any) -> float | list:
    """A float32 value (or nested list of them) as Python floats that JSON writes exactly."""
    a = np.asarray(v, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError("clip table values must be finite")
    # str(np.float32) is the shortest decimal that reads back to the same float32: readable and exact.
    flat = [float(str(x)) for x in a.reshape(-1)]
    return np.asarray(flat, dtype=object).reshape(a.shape).tolist() if a.ndim else flat[0]


class ClipTable:
    """Calibrated clip ranges (and rotations) for every boundary x method x bitwidth.

    Build one with :meth:`build` (calibration), or read one with :meth:`load`. Lookups are
    precomputed float32 arrays, so :meth:`ranges` and :meth:`transform` cost a dict access per frame.
    """

    def __init__(self, content: Mapping[str, Any], *, source: str = "<memory>"):
        """Validate ``content`` (the parsed JSON document) and index it. Raises :class:`QuantpipeError`."""
        self._source = source
        self._content = dict(content)
        self._validate_and_index()
        # Frames carry the digest and receivers compare it on every frame: hash the content once, here.
        decoding = {k: self._content[k] for k in _DECODING_KEYS}
        self._digest = int.from_bytes(bytes.fromhex(canonical_sha256(decoding)[:8]), "little")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        *,
        methods: Sequence[Mapping[str, Any]],
        bits: Sequence[int],
        boundaries: Sequence[Mapping[str, Any]],
        provenance: Mapping[str, Any],
    ) -> "ClipTable":
        """Assemble a table from calibration results.

        Args:
            methods: ``{"name", "granularity", "transform", "description"}`` per method, in index order.
            bits: the calibrated bitwidths.
            boundaries: per boundary ``{"index", "shape", "channels", "ranges": {method: {bits: (lo, hi)}},
                "transforms": {key: R}}`` with numpy arrays or floats; a rotation method's
                ``transform`` record names its matrix with ``key``.
            provenance: model, split, stages (with sha256), dataset, num_images, tool versions, ...
        """
        entries = []
        for b in boundaries:
            ranges = {
                str(m): {str(int(k)): {"lo": _f32(lo), "hi": _f32(hi)} for k, (lo, hi) in sorted(per_bits.items())}
                for m, per_bits in b["ranges"].items()
            }
            transforms = {str(k): _f32(r) for k, r in (b.get("transforms") or {}).items()}
            entries.append({"index": int(b["index"]), "shape": list(b["shape"]), "channels": int(b["channels"]),
                            "ranges": ranges, "transforms": transforms})
        content: dict[str, Any] = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "provenance": json.loads(json.dumps(dict(provenance), default=str)),
            "bits": sorted(int(k) for k in bits),
            "methods": [dict(m) for m in methods],
            "boundaries": entries,
        }
        content["content_sha256"] = canonical_sha256(content)
        return cls(content)

    @classmethod
    def load(cls, path: str | Path, manifest: Any = None) -> "ClipTable":
        """Read a table file; with ``manifest`` (dict, manifest object or stage dir), check it matches.

        Raises:
            QuantpipeError: the file is missing, unreadable or not a valid clip table.
            ArtifactMismatchError: the table was calibrated for other stage graphs.
        """
        path = Path(path)
        try:
            content = json.loads(path.read_text())
        except FileNotFoundError:
            raise QuantpipeError(f"clip table {path} does not exist; create it with 'quantpipe calibrate'") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise QuantpipeError(f"cannot read clip table {path}: {exc}; regenerate it with 'quantpipe calibrate'") from None
        if not isinstance(content, dict):
            raise QuantpipeError(f"{path} is not a clip table (expected a JSON object)")
        table = cls(content, source=str(path))
        if manifest is not None:
            table.check_stages(manifest)
        return table

    def save(self, path: str | Path) -> Path:
        """Write the table as readable JSON (number lists on one line each); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(_dump_readable(self._content) + "\n")
        tmp.replace(path)  # atomic: a daemon never reads a half-written table
        return path

    # ------------------------------------------------------------------ RangeProvider
    @property
    def sha256(self) -> str:
        """Hex sha256 of the table's canonical content."""
        return self._content["content_sha256"]

    @property
    def digest(self) -> int:
        """What frames carry: the first 4 bytes, as a little-endian u32, of the sha256 of the canonical
        JSON of the decoding content (``bits``, ``methods``, ``boundaries``; provenance excluded).
        Computed once when the table is loaded or built."""
        return self._digest

    def ranges(self, boundary: int, method: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` float32: 0-d for per-tensor methods, ``[C]`` for per-channel ones.

        Raises:
            KeyError: no such boundary, method index or bitwidth in this table.
        """
        try:
            return self._ranges[(int(boundary), int(method), int(bits))]
        except KeyError:
            raise KeyError(f"clip table has no range for boundary {boundary}, method {method}, {bits} bits "
                           f"(boundaries {self.boundaries}, {len(self.methods)} methods, bits {self.bits})") from None

    def transform(self, boundary: int, method: int) -> np.ndarray | None:
        """Orthogonal ``[C, C]`` float32 matrix R for rotation methods (sender quantizes ``x @ R``), else None."""
        if int(boundary) not in self._boundary_set or not 0 <= int(method) < len(self.methods):
            raise KeyError(f"clip table has no boundary {boundary} / method {method}")
        return self._transforms.get((int(boundary), int(method)))

    # ------------------------------------------------------------------ description
    @property
    def methods(self) -> tuple[str, ...]:
        """Method names; a method's index in this tuple is what frames carry."""
        return tuple(m["name"] for m in self._content["methods"])

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(self._content["bits"])

    @property
    def boundaries(self) -> tuple[int, ...]:
        return tuple(b["index"] for b in self._content["boundaries"])

    @property
    def provenance(self) -> dict[str, Any]:
        return self._content["provenance"]

    def method_index(self, name: str) -> int:
        """Index of method ``name``. Raises :class:`QuantpipeError` naming the available methods."""
        try:
            return self.methods.index(name)
        except ValueError:
            raise QuantpipeError(f"clip table {self._source} has no method '{name}'; it has {', '.join(self.methods)} "
                                 "(re-run 'quantpipe calibrate --methods ...' to add it)") from None

    def method_info(self, name_or_index: str | int) -> dict[str, Any]:
        """The method's record: name, granularity, transform recipe, description."""
        i = name_or_index if isinstance(name_or_index, int) else self.method_index(name_or_index)
        return dict(self._content["methods"][i])

    def channels(self, boundary: int) -> int:
        return int(self._boundary_entry(boundary)["channels"])

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the JSON document."""
        return json.loads(json.dumps(self._content))

    def check_stages(self, manifest: Any) -> None:
        """Refuse (ArtifactMismatchError) if the stage graphs of ``manifest`` are not those calibrated."""
        expected = [str(s.get("sha256")) for s in self.provenance.get("stages", [])]
        actual = stage_hashes(manifest)
        if expected != actual:
            prov = self.provenance
            how = prov.get("command") or "quantpipe calibrate --stages DIR --dataset ... --out TABLE"
            raise ArtifactMismatchError(
                f"clip table {self._source} was calibrated for other stage graphs "
                f"(model {prov.get('model')}, split {prov.get('split')}, stage sha256 "
                f"{', '.join(h[:12] for h in expected)}; these stages: {', '.join(h[:12] for h in actual)}). "
                f"Regenerate it for these stages: {how}"
            )

    def __repr__(self) -> str:
        return (f"ClipTable({self._source!r}, digest={self.digest:08x}, methods={list(self.methods)}, "
                f"bits={list(self.bits)}, boundaries={list(self.boundaries)})")

    # ------------------------------------------------------------------ validation
    def _fail(self, why: str) -> QuantpipeError:
        return QuantpipeError(f"{self._source} is not a valid clip table: {why}; regenerate it with 'quantpipe calibrate'")

    def _boundary_entry(self, boundary: int) -> Mapping[str, Any]:
        for b in self._content["boundaries"]:
            if b["index"] == int(boundary):
                return b
        raise KeyError(f"clip table has no boundary {boundary}")

    def _validate_and_index(self) -> None:
        c = self._content
        if c.get("format") != TABLE_FORMAT:
            raise self._fail(f"format is {c.get('format')!r}, expected {TABLE_FORMAT!r}")
        if not isinstance(c.get("version"), int) or c["version"] > TABLE_VERSION:
            raise QuantpipeError(f"clip table {self._source} has version {c.get('version')}, this quantpipe reads "
                                 f"up to {TABLE_VERSION}: upgrade quantpipe or regenerate the table")
        for key in ("content_sha256", "provenance", "bits", "methods", "boundaries"):
            if key not in c:
                raise self._fail(f"missing key {key!r}")
        if canonical_sha256(c) != c["content_sha256"]:
            raise self._fail("its content does not match its content_sha256 (edited or corrupted)")
        names = [m.get("name") for m in c["methods"]]
        if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names) or len(names) > 256:
            raise self._fail(f"method names must be unique strings (at most 256), got {names}")
        for m in c["methods"]:
            if m.get("granularity") not in _GRANULARITIES:
                raise self._fail(f"method {m['name']} has granularity {m.get('granularity')!r}")
        self._ranges: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._transforms: dict[tuple[int, int], np.ndarray] = {}
        self._boundary_set = set()
        for b in c["boundaries"]:
            bi, ch = int(b["index"]), int(b["channels"])
            if not 0 <= bi < 256 or bi in self._boundary_set:
                raise self._fail(f"boundary index {bi} is out of range 0..255 or repeated")
            self._boundary_set.add(bi)
            rotations: dict[str, np.ndarray] = {}
            for mi, m in enumerate(c["methods"]):
                per_bits = b["ranges"].get(m["name"])
                if per_bits is None:
                    raise self._fail(f"boundary {bi} has no ranges for method {m['name']}")
                for k in c["bits"]:
                    self._ranges[(bi, mi, int(k))] = self._checked_range(bi, m, k, per_bits.get(str(k)), ch)
                if m.get("transform"):
                    key = str(m["transform"].get("key", m["name"]))
                    if key not in rotations:
                        rotations[key] = self._checked_rotation(bi, key, b.get("transforms", {}).get(key), ch)
                    self._transforms[(bi, mi)] = rotations[key]

    def _checked_range(self, bi: int, method: Mapping[str, Any], bits: int, entry: Any, ch: int):
        where = f"boundary {bi}, method {method['name']}, {bits} bits"
        if not isinstance(entry, Mapping) or "lo" not in entry or "hi" not in entry:
            raise self._fail(f"no range for {where}")
        lo = np.asarray(entry["lo"], dtype=np.float32)
        hi = np.asarray(entry["hi"], dtype=np.float32)
        want = () if method["granularity"] == "tensor" else (ch,)
        if lo.shape != want or hi.shape != want:
            raise self._fail(f"range of {where} has shape {lo.shape}, expected {want}")
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
            raise self._fail(f"range of {where} is not finite or inverted")
        lo.setflags(write=False)
        hi.setflags(write=False)
        return lo, hi

    def _checked_rotation(self, bi: int, name: str, rows: Any, ch: int) -> np.ndarray:
        if rows is None:
            raise self._fail(f"boundary {bi} has no stored rotation {name!r}")
        r = np.asarray(rows, dtype=np.float32)
        if r.shape != (ch, ch):
            raise self._fail(f"rotation {name!r} at boundary {bi} has shape {r.shape}, expected ({ch}, {ch})")
        err = float(np.abs(r.astype(np.float64) @ r.T.astype(np.float64) - np.eye(ch)).max())
        if not math.isfinite(err) or err > _ORTHO_TOL:
            raise self._fail(f"rotation {name!r} at boundary {bi} is not orthogonal (max |R R^T - I| = {err:.2e})")
        r = np.ascontiguousarray(r)
        r.setflags(write=False)
        return r


def _dump_readable(obj: Any, indent: int = 0) -> str:
    """JSON with one key per line but every list of numbers on a single line (matrices: a row per line)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, Mapping):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_dump_readable(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and all(isinstance(v, list) for v in obj) and all(
            not isinstance(x, (dict, list)) for v in obj for x in v):
        rows = [inner + json.dumps(v, allow_nan=False, separators=(",", ":")) for v in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _dump_readable(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False, separators=(",", ": ") if isinstance(obj, dict) else (", ", ": "))
