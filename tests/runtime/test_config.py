"""Pipeline config files, flag overrides and validation; bandwidth schedules and the emulated link."""

from __future__ import annotations

import json

import pytest

from quantpipe.errors import ConfigError
from quantpipe.runtime.config import load_config
from quantpipe.runtime.shaping import MBIT, EmulatedLink, RateSchedule

TOML = """
[pipeline]
clip_table = "table.json"
bits = [32, 8, 4]
target_rate = 40.0
microbatch = 4
input_shape = [5, 8]

[source]
images = "imgs"
count = 10

[sink]
address = "tcp://127.0.0.1:5610"

[[stages]]
engine = "stage0.onnx"
address = "tcp://127.0.0.1:5600"
metrics_port = 9100

[[stages]]
engine = "builtin:identity"
address = "tcp://127.0.0.1:5601"
"""


def _write(tmp_path, text=TOML, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_resolves_paths_and_applies_overrides(tmp_path):
    cfg = load_config(_write(tmp_path), {"target_rate": 80.0, "window": None, "source.count": 99})
    assert cfg.target_rate == 80.0 and cfg.window == 10 and cfg.source.count == 99
    assert cfg.clip_table == str(tmp_path / "table.json") and cfg.source.images == str(tmp_path / "imgs")
    assert cfg.stages[0].engine == str(tmp_path / "stage0.onnx") and cfg.stages[1].engine == "builtin:identity"
    assert cfg.bits == (32, 8, 4) and cfg.downstream_address(0) == "tcp://127.0.0.1:5601"
    assert cfg.downstream_address(1) == cfg.sink.address
    assert cfg.allowed_bits((2, 4, 8, 16)) == [32, 8, 4]


def test_keys_dir_resolves_against_the_config_file(tmp_path):
    (tmp_path / "keys").mkdir()
    cfg = load_config(_write(tmp_path, TOML.replace("microbatch = 4", 'microbatch = 4\nkeys_dir = "keys"')))
    assert cfg.keys_dir == str(tmp_path / "keys")


def test_resolved_document_round_trips_through_json(tmp_path):
    cfg = load_config(_write(tmp_path))
    again = load_config(_write(tmp_path, json.dumps(cfg.to_document()), "config.json"))
    assert again == cfg


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('bits = [32, 8, 4]', 'bits = [32, 9]'), "bits"),
    (lambda t: t.replace('target_rate = 40.0', 'target_rate = 0'), "target_rate"),
    (lambda t: t.replace('microbatch = 4', 'microbatch = 0'), "microbatch"),
    (lambda t: t.replace('address = "tcp://127.0.0.1:5601"', 'address = "127.0.0.1:5601"'), "ZeroMQ endpoint"),
    (lambda t: t.replace('5601', '5600'), "same address"),
    (lambda t: t.replace('microbatch = 4', 'microbatch = 4\nbogus = 1'), "unknown key"),
    (lambda t: t.replace('[pipeline]', '[pipelin]'), "unknown table"),
    (lambda t: t.replace('microbatch = 4', 'bandwidth_schedule = "5:100"'), "start at 0"),
    (lambda t: t + "\n[[stages]]\naddress = 'tcp://127.0.0.1:5602'\n", "no engine"),
    (lambda t: "[pipeline]\n", r"no \[\[stages\]\]"),
    (lambda t: "[pipeline\n", "cannot read"),
    (lambda t: t.replace('microbatch = 4', 'microbatch = 4\nkeys_dir = "nokeys"'), "quantpipe keys generate"),
])
def test_invalid_configs_say_what_to_fix(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, edit(TOML)))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_schedule_parse_and_lookup():
    s = RateSchedule.parse("0:500, 20:50,40:250")
    assert [s.rate_at(t) for t in (0, 19.9, 20, 39, 40, 1e6)] == [500, 500, 50, 50, 250, 250]
    assert str(s) == "0:500,20:50,40:250" and s.duration == 40
    assert RateSchedule.parse("100").steps == ((0.0, 100.0),)
    for bad in ("", "0:x", "0:-5", "10:5", "0:5,0:6"):
        with pytest.raises(ConfigError):
            RateSchedule.parse(bad)


def test_emulated_link_serializes_frames_at_its_rate():
    link = EmulatedLink(10 * MBIT, now=0.0)
    frame = 125_000  # 1 Mbit: 0.1 s at 10 Mbit/s
    assert link.release_time(frame, 0.0) == pytest.approx(0.1)
    assert link.release_time(frame, 0.0) == pytest.approx(0.2)  # queued behind the first
    assert link.release_time(frame, 1.0) == pytest.approx(1.1)  # an idle link starts at once
    link.set_rate(1 * MBIT, 1.1)
    assert link.release_time(frame, 1.1) == pytest.approx(2.1)
    with pytest.raises(ConfigError):
        EmulatedLink(0, 0.0)

