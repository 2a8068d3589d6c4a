"""``quantpipe keys``: generate CURVE key pairs for encrypted links (ZeroMQ's zmq.auth certificates).

Writes ``NAME.key`` (public, share it: goes into the peers' allow-list directory) and
``NAME.key_secret`` (secret, stays on the device, mode 0600) in ZeroMQ's certificate format, readable with
``zmq.auth.load_certificate``. Encrypted links (a ROUTER that accepts only allow-listed public keys,
enforced by ``zmq.auth``) use these files; this command only makes them.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import zmq
import zmq.auth

from quantpipe.errors import ConfigError, QuantpipeError

__all__ = ["add_arguments", "run", "generate"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def generate(directory: str | os.PathLike[str], name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``name.key`` and ``name.key_secret`` in ``directory``; returns (public, secret) paths."""
    if not zmq.has("curve"):
        raise QuantpipeError("this libzmq was built without CURVE support; install a pyzmq wheel (it bundles one)")
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (e.g. stage0)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not overwrite and (public.exists() or secret.exists()):
        raise QuantpipeError(f"{public} or {secret} already exists; pass --force to replace the key pair")
    made_public, made_secret = zmq.auth.create_certificates(str(out), name)
    os.chmod(made_secret, 0o600)  # the secret key never leaves this device
    return Path(made_public), Path(made_secret)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", help="one key pair per name, e.g. stage0 stage1 sink")
    parser.add_argument("--out", default="keys", help="directory to write the key files (default: keys)")
    parser.add_argument("--force", action="store_true", help="replace existing key pairs")


def run(args: argparse.Namespace) -> int:
    for name in args.names:
        public, secret = generate(args.out, name, overwrite=args.force)
        print(f"{name}: public {public}  secret {secret}")
    return 0
