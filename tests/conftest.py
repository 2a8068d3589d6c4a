"""Shared fixtures: where ../shared is, and skips for hardware/library-dependent tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI replays the same examples on every run, so a red CI reproduces exactly on a developer's machine.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTPIPE_SHARED", REPO.parent / "shared"))
DEIT_TINY_WEIGHTS = SHARED / "data" / "deit-tiny" / "deit_tiny_patch16_224.safetensors"
IMAGENET_DEV = SHARED / "data" / "imagenet-dev"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (set QUANTPIPE_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def deit_tiny_weights() -> Path:
    if not DEIT_TINY_WEIGHTS.is_file():
        pytest.skip(f"{DEIT_TINY_WEIGHTS} not present")
    return DEIT_TINY_WEIGHTS


@pytest.fixture(scope="session")
def imagenet_dev() -> Path:
    if not IMAGENET_DEV.is_dir():
        pytest.skip(f"{IMAGENET_DEV} not present")
    return IMAGENET_DEV


@pytest.fixture(scope="session")
def deit_tiny_stages(deit_tiny_weights, imagenet_dev, tmp_path_factory) -> Path:
    """DeiT-Tiny exported once per test session at --split 4,8 (export's own verification on 16 real
    images included): the slow tests of export and calibration share it instead of exporting twice."""
    pytest.importorskip("timm")
    from quantpipe.cli import main

    out = tmp_path_factory.mktemp("deit") / "stages"
    code = main([
        "export", "--model", "deit_tiny_patch16_224", "--checkpoint", str(deit_tiny_weights), "--split", "4,8",
        "--out", str(out), "--verify-data", str(imagenet_dev), "--verify-samples", "16", "--threads", "2", "-q",
    ])
    assert code == 0, "quantpipe export of DeiT-Tiny failed"
    return out
