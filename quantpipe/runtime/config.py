"""The pipeline configuration: one TOML file that every process of a pipeline reads; flags override it.

(A ``.json`` file of the same layout is read too: ``quantpipe run`` writes the resolved config as
``config.json`` and hands it to every process it starts, so they all run with the same values.)

Example (all keys, with their defaults where they have one)::

    [pipeline]
    stages_dir = "out/stages"       # export directory with manifest.json (engine files resolve here)
    clip_table = "out/table.json"   # optional; without it quantized frames carry a per-microbatch
                                    # min-max range inline (the paper's naive PTQ: worse accuracy)
    method = "ds-aciq"              # clip-table method used for quantized boundaries
    bits = [32, 16, 8, 6, 4, 2]     # bitwidths the policy may choose (those the table holds)
    policy = "paper"                # "paper" (adaptive, algorithms.md section 8) or "fixed"
    fixed_bits = 32                 # the bitwidth of policy "fixed"
    target_rate = 50.0              # R: images/s the pipeline should deliver
    window = 10                     # N: microbatches per policy window
    upgrade_margin = 0.15           # hysteresis: a wider bitwidth must fit with 15 % to spare
    microbatch = 8                  # images per microbatch
    credits = 4                     # unacknowledged microbatches per link (flow-control window)
    backend = "onnxruntime"         # engine backend ("onnxruntime", "tensorrt", "auto")
    threads = 1                     # engine threads per stage
    input_shape = [197, 192]        # per-image input shape, for builtin engines and synthetic input
    bandwidth_schedule = ""         # e.g. "0:500,20:50,40:250" (s:Mbit/s) on stage-to-stage links
    shaping = "emulate"             # how the schedule is applied: "emulate" (in-process), "netns" (tc)
    burst_bytes = 32768             # tc tbf burst (netns shaping)
    keys_dir = ""                   # CURVE keys (quantpipe keys generate): every link encrypted and
                                    # authenticated; the directory holds this process's NAME.key_secret
                                    # and its neighbours' NAME.key (source, stage0.., sink). Empty: plaintext

    [source]
    images = ""                     # image folder (ImageFolder = labelled); empty: synthetic input
    count = 200                     # images to stream
    rate = 0.0                      # images/s offered by the source (0: target_rate)
    offset = 0                      # skip this many images of every class (those calibrated on)

    [sink]
    address = "tcp://127.0.0.1:5600"
    output = "results.jsonl"

    [[stages]]                      # one table per stage, in pipeline order
    engine = "stage0.onnx"          # or "builtin:identity" / "builtin:linear" / "builtin:head:1000"
    address = "tcp://127.0.0.1:5500"  # where this stage's input binds (upstream connects here)
    metrics_port = 9100             # Prometheus endpoint (0: none)
    namespace = ""                  # network namespace to run in under 'quantpipe run' (netns shaping)

Relative paths resolve against the config file's directory. :meth:`PipelineConfig.to_dict` is the
resolved configuration that every process logs at start and ``quantpipe run`` writes next to its output.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantpipe.errors import ConfigError
from quantpipe.quant.primitives import WIRE_BITS
from quantpipe.runtime.shaping import RateSchedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["StageConfig", "SourceConfig", "SinkConfig", "PipelineConfig", "load_config", "BUILTIN_PREFIX"]

BUILTIN_PREFIX = "builtin:"
_PATH_KEYS = ("stages_dir", "clip_table", "source.images", "sink.output")
SHAPING = ("none", "emulate", "netns")


@dataclass(frozen=True)
class StageConfig:
    """One stage daemon: its engine, the address its input binds, its metrics port, its namespace."""

    engine: str
    address: str
    metrics_port: int = 0
    namespace: str = ""


@dataclass(frozen=True)
class SourceConfig:
    images: str = ""
    count: int = 200
    rate: float = 0.0
    offset: int = 0


@dataclass(frozen=True)
class SinkConfig:
    address: str = "tcp://127.0.0.1:5600"
    output: str = "results.jsonl"
    namespace: str = ""


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline (see the module docstring for the meaning and unit of every field)."""

    stages: tuple[StageConfig, ...]
    stages_dir: str = ""
    clip_table: str = ""
    method: str = "ds-aciq"
    bits: tuple[int, ...] = (32, 16, 8, 6, 4, 2)
    policy: str = "paper"
    fixed_bits: int = 32
    target_rate: float = 50.0
    window: int = 10
    upgrade_margin: float = 0.15
    microbatch: int = 8
    credits: int = 4
    backend: str = "onnxruntime"
    threads: int = 1
    input_shape: tuple[int, ...] = ()
    bandwidth_schedule: str = ""
    shaping: str = "emulate"
    burst_bytes: int = 32768
    keys_dir: str = ""
    source: SourceConfig = field(default_factory=SourceConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` with what to fix for any invalid value."""
        if not self.stages:
            raise ConfigError("the config has no [[stages]]: add one table per stage")
        for i, s in enumerate(self.stages):
            if not s.engine:
                raise ConfigError(f"stage {i} has no engine: set engine = 'stage{i}.onnx' or 'builtin:identity'")
            _check_address(s.address, f"stage {i} address")
            if not 0 <= s.metrics_port < 65536:
                raise ConfigError(f"stage {i} metrics_port {s.metrics_port} is not a port (0 disables metrics)")
        _check_address(self.sink.address, "sink address")
        addresses = [s.address for s in self.stages] + [self.sink.address]
        if len(set(addresses)) != len(addresses):
            raise ConfigError(f"two processes bind the same address ({addresses}): give each its own port")
        bad = [b for b in self.bits if b not in WIRE_BITS]
        if bad or not self.bits:
            raise ConfigError(f"bits {list(self.bits)}: choose among {list(WIRE_BITS)}")
        if self.policy not in ("paper", "fixed"):
            raise ConfigError(f"policy '{self.policy}': choose 'paper' or 'fixed'")
        if self.fixed_bits not in WIRE_BITS:
            raise ConfigError(f"fixed_bits {self.fixed_bits}: choose among {list(WIRE_BITS)}")
        for name, value, low in (("target_rate", self.target_rate, 0.0), ("upgrade_margin", self.upgrade_margin, -1e-12)):
            if not value > low:
                raise ConfigError(f"{name} must be > {low:g}, got {value}")
        for name, value in (("window", self.window), ("microbatch", self.microbatch), ("credits", self.credits),
                            ("threads", self.threads), ("burst_bytes", self.burst_bytes)):
            if int(value) != value or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value}")
        if self.shaping not in SHAPING:
            raise ConfigError(f"shaping '{self.shaping}': choose one of {', '.join(SHAPING)}")
        if self.bandwidth_schedule:
            RateSchedule.parse(self.bandwidth_schedule)
        if self.keys_dir and not Path(self.keys_dir).is_dir():
            raise ConfigError(f"keys_dir {self.keys_dir} is not a directory: create the keys with "
                              "'quantpipe keys generate --out DIR --name NAME' for each process")
        if self.source.count < 1 or self.source.rate < 0 or self.source.offset < 0:
            raise ConfigError("source.count must be >= 1, source.rate >= 0 (0 = target_rate), source.offset >= 0")
        needs_shape = any(s.engine.startswith(BUILTIN_PREFIX) for s in self.stages) and not self.stages_dir
        if needs_shape and not self.input_shape:
            raise ConfigError("builtin engines need pipeline.input_shape (per image, e.g. [197, 192])")

    # -- derived values ----------------------------------------------------------------------------
    @property
    def schedule(self) -> RateSchedule | None:
        return RateSchedule.parse(self.bandwidth_schedule) if self.bandwidth_schedule else None

    @property
    def source_rate(self) -> float:
        return self.source.rate or self.target_rate

    def allowed_bits(self, table_bits: tuple[int, ...] | None) -> list[int]:
        """The configured bitwidths that can actually be sent: 32, plus those the clip table holds."""
        held = set(table_bits or ()) | {32}
        allowed = sorted((b for b in self.bits if b in held), reverse=True)
        if not allowed:
            raise ConfigError(f"none of bits {list(self.bits)} is in the clip table ({sorted(held)})")
        return allowed

    def downstream_address(self, k: int) -> str:
        """Where stage ``k`` sends: the next stage's input, or the sink after the last stage."""
        return self.stages[k + 1].address if k + 1 < len(self.stages) else self.sink.address

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_document(self) -> dict[str, Any]:
        """The resolved config in the file's own layout (``[pipeline]``, ``[source]``, ``[sink]``,
        ``[[stages]]``); :func:`load_config` reads it back from a ``.json`` file."""
        d = self.to_dict()
        return {"stages": d.pop("stages"), "source": d.pop("source"), "sink": d.pop("sink"), "pipeline": d}

    def replace(self, **changes: Any) -> PipelineConfig:
        return dataclasses.replace(self, **changes)


def _check_address(address: str, what: str) -> None:
    if not (address.startswith("tcp://") or address.startswith("ipc://") or address.startswith("inproc://")):
        raise ConfigError(f"{what} '{address}' is not a ZeroMQ endpoint: write e.g. tcp://127.0.0.1:5500")


def _resolve(base: Path, value: str) -> str:
    if not value or value == "-" or value.startswith(BUILTIN_PREFIX):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _pick(d: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; known: {sorted(names)}")
    return d


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline TOML file and apply ``overrides`` (flag values; None means "not given").

    Overrides use the field names of :class:`PipelineConfig`, plus ``source.*`` and ``sink.*`` keys.
    """
    path = Path(path)
    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    base = path.resolve().parent
    unknown = set(doc) - {"pipeline", "source", "sink", "stages"}
    if unknown:
        raise ConfigError(f"unknown table(s) {sorted(unknown)} in {path}: use [pipeline], [source], [sink], [[stages]]")
    top = dict(doc.get("pipeline", {}))
    source = dict(doc.get("source", {}))
    sink = dict(doc.get("sink", {}))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in _PATH_KEYS:
            value = _resolve(Path.cwd(), str(value))  # a path given as a flag is relative to where you are
        if key.startswith("source."):
            source[key[7:]] = value
        elif key.startswith("sink."):
            sink[key[5:]] = value
        else:
            top[key] = value
    _pick(top, PipelineConfig, "[pipeline]")
    stages_raw = doc.get("stages", [])
    if not isinstance(stages_raw, list):
        raise ConfigError("stages must be an array of tables: write [[stages]] once per stage")
    stages_dir = _resolve(base, str(top.get("stages_dir", "")))
    engine_base = Path(stages_dir) if stages_dir else base
    try:
        stages = tuple(
            StageConfig(**{**_pick(dict(s), StageConfig, f"stage {i}"),
                           "engine": _resolve(engine_base, str(s.get("engine", "")))})
            for i, s in enumerate(stages_raw)
        )
        top.update(stages_dir=stages_dir, clip_table=_resolve(base, str(top.get("clip_table", ""))),
                   keys_dir=_resolve(base, str(top.get("keys_dir", ""))))
        for key in ("bits", "input_shape"):
            if key in top:
                top[key] = tuple(int(v) for v in top[key])
        if "images" in source:
            source["images"] = _resolve(base, str(source["images"]))
        sink["output"] = _resolve(base, str(sink.get("output", SinkConfig.output)))
        return PipelineConfig(
            stages=stages,
            source=SourceConfig(**_pick(source, SourceConfig, "[source]")),
            sink=SinkConfig(**_pick(sink, SinkConfig, "[sink]")),
            **top,
        )
    except TypeError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from None
