"""``quantpipe keys``: CURVE key pairs for encrypted, authenticated links.

``quantpipe keys generate --out DIR --name NAME`` writes two files in ZeroMQ's certificate format (the
one ``zmq.auth.load_certificate`` reads and czmq writes):

* ``NAME.key``: the public key. Copy it to the peers that must accept (or connect to) this process.
* ``NAME.key_secret``: the public *and* secret key, mode 0600 from the moment it exists (it is created
  with ``O_EXCL`` and that mode, never written first and chmod-ed after). Keep it on this device.

``DIR`` is created with mode 0700. Existing files are never overwritten unless ``--force`` (a stage
that silently got a new key would lock itself out of every peer that allow-listed the old one).

Loading refuses a secret file that group or others can read, like ssh does, and never puts a key in
an exception message or a log line: paths identify keys, not their contents.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from quantpipe.errors import QuantpipeError

__all__ = ["KeyFileError", "KeyPair", "KeyFiles", "generate", "load_public_key", "load_keypair", "add_arguments", "run"]

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85_KEY_LEN = 40  # a 32-byte Curve25519 key is 40 Z85 characters


class KeyFileError(QuantpipeError):
    """A key file is missing, malformed or unsafe, or would be overwritten."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 bytes. The secret half never appears in ``repr``."""

    public: bytes
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class KeyFiles:
    """Where :func:`generate` wrote a key pair."""

    public: Path
    secret: Path


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise KeyFileError(f"key name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (e.g. 'stage1', 'sink')")


def _document(kind: str, public: bytes, secret: bytes | None) -> bytes:
    """A certificate in ZeroMQ's ZPL layout (what ``zmq.auth.load_certificate`` parses)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"#   ****  Generated on {when} by quantpipe keys  ****",
             f"#   ZeroMQ CURVE {kind} Certificate",
             "#   Exchange public certificates securely; never copy a secret certificate off its device.",
             "", "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return ("\n".join(lines) + "\n").encode("ascii")


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` from its first byte; with ``force``, atomically replace it."""
    target = path.with_name(path.name + ".tmp") if force else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    if force:
        target.unlink(missing_ok=True)
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} exists: pass --force to replace it (peers that allow-listed the old "
                           "public key will then refuse this process)") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened, but be exact
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd >= 0:
            os.close(fd)
    if force:
        os.replace(target, path)


def generate(out_dir: str | os.PathLike, name: str, *, force: bool = False) -> KeyFiles:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) into ``out_dir`` (made 0700).

    Raises:
        KeyFileError: bad name, or a file exists and ``force`` is False.
    """
    _check_name(name)
    if not zmq.has("curve"):
        raise KeyFileError("this libzmq was built without CURVE: install pyzmq's wheels (they bundle libsodium)")
    out = Path(out_dir)
    if not out.exists():
        out.mkdir(parents=True, mode=0o700)
        os.chmod(out, 0o700)  # mkdir's mode is filtered by the umask
    elif not out.is_dir():
        raise KeyFileError(f"{out} is not a directory: choose another --out")
    public_path, secret_path = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    if not force:
        for p in (public_path, secret_path):
            if p.exists() or p.is_symlink():
                raise KeyFileError(f"{p} exists: pass --force to replace it (peers that allow-listed the old "
                                   "public key will then refuse this process)")
    public, secret = zmq.curve_keypair()
    # Secret first: a crash in between leaves a usable pair's private half, never a public key
    # whose secret is lost.
    _write_new(secret_path, _document("Secret", public, secret), 0o600, force)
    _write_new(public_path, _document("Public", public, None), 0o644, force)
    return KeyFiles(public_path, secret_path)


def _valid_key(key: bytes | None) -> bool:
    if key is None or len(key) != _Z85_KEY_LEN:
        return False
    try:
        return len(zmq.utils.z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def _read(path: Path) -> tuple[bytes | None, bytes | None]:
    if not path.is_file():
        raise KeyFileError(f"key file {path} does not exist: create it with 'quantpipe keys generate'")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        # The parser's message may quote file content; say only where and what to do.
        raise KeyFileError(f"{path} is not a ZeroMQ certificate: regenerate it with 'quantpipe keys generate'") from None


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key in a ``.key`` (or ``.key_secret``) file."""
    path = Path(path)
    public, _ = _read(path)
    if not _valid_key(public):
        raise KeyFileError(f"{path} holds no valid CURVE public key: regenerate it with 'quantpipe keys generate'")
    return public  # type: ignore[return-value]


def load_keypair(path: str | os.PathLike) -> KeyPair:
    """This process's key pair from its ``.key_secret`` file (refused if group/others can read it)."""
    path = Path(path)
    public, secret = _read(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key: pass the NAME{SECRET_SUFFIX} file, not NAME{PUBLIC_SUFFIX}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by group or others (mode {mode:04o}): run 'chmod 600 {path}'")
    if not (_valid_key(public) and _valid_key(secret)):
        raise KeyFileError(f"{path} holds a malformed key pair: regenerate it with 'quantpipe keys generate'")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: the public key does not belong to the secret key; regenerate the pair")
    return KeyPair(public, secret)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = sub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (0600) into --out")
    gen.add_argument("--out", required=True, help="key directory (created with mode 0700)")
    gen.add_argument("--name", required=True, help="process name, e.g. stage1 or sink")
    gen.add_argument("--force", action="store_true", help="replace an existing key pair")


def run(args: argparse.Namespace) -> int:
    if args.action == "generate":
        files = generate(args.out, args.name, force=args.force)
        # Paths only: a key, even a public one, has no business in terminal scrollback or CI logs.
        print(f"public key: {files.public}  (give this file to peers that must accept '{args.name}')")
        print(f"secret key: {files.secret}  (mode 0600; keep it on this device)")
        return 0
    raise QuantpipeError(f"unknown action {args.action!r}: use 'quantpipe keys generate'")
