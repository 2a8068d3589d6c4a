"""Run a benchmark: ``quantpipe bench NAME [options]``; ``quantpipe bench`` lists them.

Benchmarks are registered in :data:`BENCHMARKS` and imported only when run, so a benchmark that needs
an optional dependency (pyzmq for a transport benchmark, say) cannot break the others.

Adding a benchmark:

1. Write a module ``quantpipe/benchmarks/<name>.py`` that exposes, like a subcommand,
   ``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args) -> int | None``, with a
   module docstring whose first line describes it (that line becomes its ``--help`` description).
2. Add one line to :data:`BENCHMARKS`::

       "transport": Benchmark("quantpipe.benchmarks.transport", "frames per second over loopback links"),

3. Add a thin ``bench/<name>.py`` that reproduces the figure quoted in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass

from quantpipe.errors import ConfigError

__all__ = ["Benchmark", "BENCHMARKS", "add_arguments", "run"]


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: the module that implements it and one line saying what it measures."""

    module: str
    summary: str


BENCHMARKS: dict[str, Benchmark] = {
    "codec": Benchmark(
        "quantpipe.benchmarks.codec",
        "encode/decode throughput versus np.copyto, and bytes per frame, per bitwidth",
    ),
    "pipeline": Benchmark(
        "quantpipe.benchmarks.pipeline",
        "the whole data path: output rate per bitwidth and table kind, per-hop CPU by part",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``NAME`` and pass everything after it to the benchmark's own parser."""
    parser.add_argument("benchmark", nargs="?", metavar="NAME", help="benchmark to run; omit to list them")
    # Everything after NAME (including --help) belongs to the benchmark: parsed in run().
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.epilog = "benchmarks:\n" + _listing()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _listing() -> str:
    return "\n".join(f"  {name:<12} {b.summary}" for name, b in BENCHMARKS.items())


def run(args: argparse.Namespace) -> int:
    """List the benchmarks, or parse the named one's options and run it."""
    if args.benchmark is None:
        print("available benchmarks (run 'quantpipe bench NAME --help' for options):")
        print(_listing())
        return 0
    if args.benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {args.benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[args.benchmark]
    module = importlib.import_module(bench.module)
    doc = (module.__doc__ or bench.summary).strip().splitlines()[0]
    parser = argparse.ArgumentParser(prog=f"quantpipe bench {args.benchmark}", description=doc)
    module.add_arguments(parser)
    # -v/-q given after NAME land here, not in the top-level parser: honour them the same way.
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging (repeatable)")
    sub_args = parser.parse_args(args.options)
    if sub_args.verbose or sub_args.quiet:
        root = logging.getLogger()
        level = root.level - 10 * sub_args.verbose + 10 * sub_args.quiet
        root.setLevel(max(logging.DEBUG, min(logging.CRITICAL, level)))
    return int(module.run(sub_args) or 0)
