"""The device-side package stays lean: the runtime, codec, wire format and engines never pull in
torch or timm (a stage daemon on a Jetson has numpy, pyzmq and an engine runtime only)."""

from __future__ import annotations

import json
import subprocess
import sys

DEVICE_SIDE = ["quantpipe.quant", "quantpipe.wire", "quantpipe.runtime", "quantpipe.engines", "quantpipe.manifest"]
HEAVY = ["torch", "timm", "torchvision", "onnx", "PIL", "matplotlib"]

_PROBE = r"""
import importlib, json, pkgutil, sys
roots = json.loads(sys.argv[1])
imported = []
for root in roots:
    try:
        mod = importlib.import_module(root)
    except ModuleNotFoundError as exc:
        if exc.name == root:
            continue  # not written yet
        raise
    imported.append(root)
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), root + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
print(json.dumps({"imported": imported, "modules": sorted(sys.modules)}))
"""


def test_device_side_modules_do_not_import_heavy_dependencies():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(DEVICE_SIDE)], check=True, capture_output=True, text=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert "quantpipe.quant.codec" in result["imported"] and "quantpipe.wire" in result["imported"]
    loaded = {m.split(".")[0] for m in result["modules"]}
    assert not loaded & set(HEAVY), f"device-side import pulled in {sorted(loaded & set(HEAVY))}"


def test_cli_help_imports_no_subcommand_module():
    code = "import sys; from quantpipe import cli; cli._top_level_parser(); print(sorted(m for m in sys.modules if m.startswith('quantpipe')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == str(["quantpipe", "quantpipe.cli", "quantpipe.errors"])
