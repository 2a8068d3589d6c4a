"""Built-in numpy engines for tests and the transport benchmark. Not models.

A stage whose ``engine`` is ``builtin:NAME`` runs one of these instead of an exported graph, so the
runtime (links, flow control, policy, metrics) can be tested and benchmarked without an export and
without spending the CPU on a transformer:

* ``builtin:identity``: returns its input (the transport benchmark: every byte moved is framing).
* ``builtin:linear``: ``x @ W`` with a fixed orthogonal ``W`` (seed 0) over the last axis; same shape.
  Cheap, but not the identity, so a test can tell that a stage really ran.
* ``builtin:head:K``: mean over the token axis, then a fixed linear map to K classes (seed 1): gives
  the sink logits to rank, like the last stage of a ViT.
* ``builtin:sleep:MS``: returns its input after sleeping MS milliseconds per microbatch: a slow device
  (compute-bound stage) without spending the CPU, for tests of backpressure and bandwidth measurement.

The per-image input shape comes from ``pipeline.input_shape`` (stage 0) and each engine's output.
"""

from __future__ import annotations

import time

import numpy as np

from quantpipe.engines.base import Engine, TensorSpec
from quantpipe.errors import ConfigError

__all__ = ["BuiltinEngine", "make_builtin"]


class BuiltinEngine(Engine):
    """A fixed numpy function with a dynamic batch axis."""

    backend = "builtin"

    def __init__(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], weight: np.ndarray | None,
                 mean_tokens: bool, delay_s: float = 0.0) -> None:
        self.name = name
        self._delay_s = delay_s
        self._input = TensorSpec("input", (None, *in_shape))
        self._output = TensorSpec("output", (None, *out_shape))
        self._weight = weight
        self._mean_tokens = mean_tokens

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1:] != self._input.shape[1:]:
            raise ConfigError(f"builtin:{self.name} expects [B, {', '.join(map(str, self._input.shape[1:]))}], "
                              f"got {list(x.shape)}: check pipeline.input_shape")
        if self._delay_s:
            time.sleep(self._delay_s)  # releases the GIL, like a real engine running on its device
        if self._mean_tokens:
            x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
        if self._weight is None:
            return x
        return np.ascontiguousarray(x @ self._weight, dtype=np.float32)

    def describe(self) -> str:
        return f"builtin:{self.name} {list(self._input.shape)} -> {list(self._output.shape)} (test/benchmark engine)"


def make_builtin(spec: str, in_shape: tuple[int, ...]) -> BuiltinEngine:
    """Build ``builtin:identity``, ``builtin:linear`` or ``builtin:head:K`` for per-image ``in_shape``."""
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    in_shape = tuple(int(d) for d in in_shape)
    if not in_shape:
        raise ConfigError(f"{spec} needs pipeline.input_shape (per image, e.g. [197, 192])")
    c = in_shape[-1]
    if name == "identity" and len(parts) == 2:
        return BuiltinEngine(name, in_shape, in_shape, None, False)
    if name == "sleep" and len(parts) == 3 and parts[2].isdigit():
        return BuiltinEngine(f"sleep:{parts[2]}", in_shape, in_shape, None, False, delay_s=int(parts[2]) / 1000)
    if name == "linear" and len(parts) == 2:
        q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((c, c)))
        return BuiltinEngine(name, in_shape, in_shape, q.astype(np.float32), False)
    if name == "head" and len(parts) == 3 and parts[2].isdigit() and int(parts[2]) > 0:
        k = int(parts[2])
        w = np.random.default_rng(1).standard_normal((c, k)).astype(np.float32) / np.float32(np.sqrt(c))
        return BuiltinEngine(f"head:{k}", in_shape, (k,), w, True)
    raise ConfigError(f"unknown builtin engine '{spec}': use builtin:identity, builtin:linear, builtin:head:K or builtin:sleep:MS")
