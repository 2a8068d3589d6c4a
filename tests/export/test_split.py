"""Split validation and the stage modules: chaining the stages must be the whole model, exactly."""

from __future__ import annotations

import pytest
import torch

from quantpipe.errors import ConfigError
from quantpipe.export.model import create_model
from quantpipe.export.split import build_stages, parse_split, stage_io_names


@pytest.mark.parametrize("text, expected", [("4,8", [4, 8]), (" 1 , 11 ", [1, 11]), ("6", [6]), ([3, 9], [3, 9])])
def test_parse_split_accepts_sorted_in_range(text, expected):
    assert parse_split(text, 12) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("4,,8", "empty"),
        ("a,b", "comma-separated"),
        ("0,8", "out of range"),
        ("4,12", "out of range"),
        ("4,13", "out of range"),
        ("-1", "out of range"),
        ("8,4", "not sorted"),
        ("4,4", r"repeats \[4\]"),
        ([], "empty"),
    ],
)
def test_parse_split_rejects_bad_splits_with_a_reason(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_split(text, 12)


def test_out_of_range_message_names_the_valid_range():
    with pytest.raises(ConfigError, match=r"valid: 1\.\.11"):
        parse_split("12", 12)


def test_io_names_are_stable():
    assert [stage_io_names(k, 3) for k in range(3)] == [
        ("input", "boundary0"),
        ("boundary0", "boundary1"),
        ("boundary1", "logits"),
    ]
    assert stage_io_names(0, 1) == ("input", "logits")


def test_stage_chain_is_the_whole_model_bit_for_bit():
    model = create_model("test_vit")
    stages = build_stages(model, [2, 4])
    assert [len(s.blocks) for s in stages] == [2, 2, 2]
    x = torch.randn(3, *model.default_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = x
        shapes = []
        for stage in stages:
            h = stage(h)
            shapes.append(tuple(h.shape))
        ref = model(x)
    assert shapes[:-1] == [(3, 101, 64), (3, 101, 64)]  # one residual-stream tensor per boundary
    assert torch.equal(h, ref)


@pytest.mark.parametrize("name", ["test_vit2", "test_vit3", "deit_tiny_distilled_patch16_224"])
def test_variants_cut_exactly(name):
    # register tokens + average pooling, attention-pool ("map") head, distillation token + two heads
    model = create_model(name)
    n = len(model.blocks)
    stages = build_stages(model, [n // 3, 2 * n // 3])
    x = torch.randn(2, *model.default_cfg["input_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        assert torch.equal(h, model(x))
