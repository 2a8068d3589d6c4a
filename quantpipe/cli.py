"""The ``quantpipe`` console script: one command, lazily registered subcommands.

Each subcommand lives in the module that owns its work and exposes two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int | None: ...

Modules are imported only when their subcommand is invoked, so ``quantpipe --help`` and the daemon
subcommands never import torch. If a subcommand's module needs an optional dependency that is not
installed, only that subcommand is disabled, with a message naming the extra to install.

A :class:`~quantpipe.errors.QuantpipeError` is printed as one line (exit 1); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from quantpipe import __version__
from quantpipe.errors import QuantpipeError

__all__ = ["main", "SUBCOMMANDS"]


@dataclass(frozen=True)
class Subcommand:
    module: str
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "export": Subcommand("quantpipe.export.command", "cut a timm ViT into verified per-stage ONNX graphs and engines"),
    "calibrate": Subcommand("quantpipe.calib.calibrate", "compute clip tables for every bitwidth at every boundary"),
    "evaluate": Subcommand("quantpipe.calib.evaluate", "accuracy of the quantized pipeline per method and bitwidth"),
    "stage": Subcommand("quantpipe.runtime.stage", "run one stage daemon (one per device)"),
    "run": Subcommand("quantpipe.runtime.launcher", "start a whole pipeline (source, stages, sink) on this machine"),
    "serve": Subcommand("quantpipe.serve.command", "serve the pipeline as a KServe v2 inference service (HTTP, gRPC)"),
    "keys": Subcommand("quantpipe.runtime.keys", "generate CURVE key pairs for encrypted links"),
    "bench": Subcommand("quantpipe.benchmarks.command", "benchmarks (run it without a name to list them)"),
}

# The extras of pyproject.toml and the top-level modules each one installs.
_EXTRAS: dict[str, frozenset[str]] = {
    "export": frozenset({"torch", "timm", "onnx", "onnxscript", "safetensors", "tqdm"}),
    "calib": frozenset({"PIL", "matplotlib", "tqdm"}),
    "tensorrt": frozenset({"tensorrt", "polygraphy"}),
    "serve": frozenset({"aiohttp", "grpc", "tritonclient", "google"}),
}
# The extra a subcommand's users install first (a module in several extras is named by this one).
_EXTRA_OF_COMMAND = {"export": "export", "calibrate": "calib", "evaluate": "calib", "run": "calib", "serve": "serve"}


def _missing_dependency_message(name: str, exc: ModuleNotFoundError) -> str | None:
    top = (exc.name or "").split(".")[0]
    candidates = [extra for extra, modules in _EXTRAS.items() if top in modules]
    if not candidates:
        return None
    preferred = _EXTRA_OF_COMMAND.get(name)
    extra = preferred if preferred in candidates else candidates[0]
    return (
        f"'quantpipe {name}' needs the optional dependency '{top}', which is not installed. "
        f"Install it with: pip install 'quantpipe[{extra}]'"
    )


def _missing_dependency(name: str, exc: ModuleNotFoundError) -> int:
    """Print the 'install quantpipe[extra]' line for an optional dependency; re-raise anything else."""
    message = _missing_dependency_message(name, exc)
    if message is None:
        raise exc
    print(f"quantpipe {name}: error: {message}", file=sys.stderr)
    return 1


def _top_level_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<10} {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="quantpipe",
        description="Deploy a vision transformer as a pipeline across edge devices with adaptive "
        "boundary quantization (QuantPipe).",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun 'quantpipe COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"quantpipe {__version__}")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    group.add_argument("-q", "--quiet", action="count", default=0, help="less logging (repeatable)")


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(
        level=max(logging.DEBUG, min(logging.CRITICAL, level)),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_level_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # handles --help / --version and exits
        top.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        top.error(f"unknown command '{name}' (choose from {', '.join(SUBCOMMANDS)})")
    sub = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(sub.module)
    except ModuleNotFoundError as exc:
        return _missing_dependency(name, exc)
    parser = argparse.ArgumentParser(prog=f"quantpipe {name}", description=module.__doc__ and module.__doc__.strip().splitlines()[0])
    module.add_arguments(parser)
    _add_common(parser)
    args = parser.parse_args(rest)
    _setup_logging(args.verbose, args.quiet)
    try:
        code = module.run(args)
    except ModuleNotFoundError as exc:
        # Heavy dependencies are imported inside the functions that need them.
        return _missing_dependency(name, exc)
    except QuantpipeError as exc:
        print(f"quantpipe {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"quantpipe {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `quantpipe bench codec | head`: the reader went away; not an error of ours.
        sys.stderr.close()
        return 0
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
