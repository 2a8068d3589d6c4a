"""The console script: lazy registry, one-line user errors, missing-extra messages."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from quantpipe import cli
from quantpipe.errors import ConfigError


def _fake_module(monkeypatch, name: str, run):
    module = types.ModuleType(name)
    module.__doc__ = "A fake command for tests."
    module.add_arguments = lambda parser: parser.add_argument("--value", type=int, default=1)
    module.run = run
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", cli.Subcommand(name, "fake command"))


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["frobnicate"])
    assert exit_.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_user_error_is_one_line_without_traceback(monkeypatch, capsys):
    def run(args):
        raise ConfigError(f"--value {args.value} is too large: pass at most 3")

    _fake_module(monkeypatch, "quantpipe_fake_cmd", run)
    assert cli.main(["fake", "--value", "9"]) == 1
    err = capsys.readouterr().err
    assert err == "quantpipe fake: error: --value 9 is too large: pass at most 3\n"


def test_bug_keeps_its_traceback(monkeypatch):
    def run(args):
        raise ZeroDivisionError("bug")

    _fake_module(monkeypatch, "quantpipe_fake_cmd2", run)
    with pytest.raises(ZeroDivisionError):
        cli.main(["fake"])


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    def run(args):
        import timm  # noqa: F401  (blocked below)

    _fake_module(monkeypatch, "quantpipe_fake_cmd3", run)
    monkeypatch.setitem(sys.modules, "timm", None)
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert "needs the optional dependency 'timm'" in err and "pip install 'quantpipe[export]'" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "quantpipe.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("quantpipe ")
