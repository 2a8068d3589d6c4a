"""`quantpipe keys generate`: file layout, permissions, refusal to overwrite, loading and its refusals."""

from __future__ import annotations

import os
import stat

import pytest
import zmq
import zmq.auth

from quantpipe.cli import main
from quantpipe.runtime import keys
from quantpipe.runtime.keys import KeyFileError


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_generate_writes_a_zmq_certificate_pair_with_safe_permissions(tmp_path, capsys):
    out = tmp_path / "keys"
    old = os.umask(0)  # the widest umask: the modes must not depend on it
    try:
        assert main(["keys", "generate", "--out", str(out), "--name", "stage1"]) == 0
    finally:
        os.umask(old)
    public, secret = out / "stage1.key", out / "stage1.key_secret"
    assert _mode(out) == 0o700 and _mode(secret) == 0o600 and _mode(public) == 0o644
    # zmq.auth reads them: the public file has no secret, the secret file has both halves, matching.
    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and pub == pub2 and zmq.curve_public(sec) == pub
    assert zmq.auth.load_certificates(out) == {pub: True}  # an allow-list dir picks up only *.key
    printed = capsys.readouterr()
    assert pub.decode() not in printed.out + printed.err and sec.decode() not in printed.out + printed.err


def test_generate_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    files = keys.generate(tmp_path, "sink")
    before = files.secret.read_bytes()
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "sink"]) == 1
    assert "--force" in capsys.readouterr().err
    assert files.secret.read_bytes() == before
    keys.generate(tmp_path, "sink", force=True)
    assert files.secret.read_bytes() != before and _mode(files.secret) == 0o600
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "-dash", "x" * 65])
def test_generate_refuses_bad_names(tmp_path, name):
    with pytest.raises(KeyFileError, match="key name"):
        keys.generate(tmp_path, name)


def test_load_keypair_and_public_key(tmp_path):
    files = keys.generate(tmp_path, "stage0")
    pair = keys.load_keypair(files.secret)
    assert keys.load_public_key(files.public) == pair.public
    assert pair.secret.decode() not in repr(pair)


def test_loading_refuses_unsafe_or_wrong_files_without_quoting_keys(tmp_path):
    files = keys.generate(tmp_path, "stage0")
    secret_text = files.secret.read_text()
    os.chmod(files.secret, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        keys.load_keypair(files.secret)
    os.chmod(files.secret, 0o600)
    with pytest.raises(KeyFileError, match="no secret key"):
        keys.load_keypair(files.public)
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.load_keypair(tmp_path / "nope.key_secret")
    # A secret that does not match its public half (a hand-edited file) is refused.
    other_pub, _ = zmq.curve_keypair()
    pub, sec = zmq.auth.load_certificate(files.secret)
    files.secret.write_text(secret_text.replace(pub.decode(), other_pub.decode()))
    with pytest.raises(KeyFileError) as exc:
        keys.load_keypair(files.secret)
    assert sec.decode() not in str(exc.value) and other_pub.decode() not in str(exc.value)
    bad = tmp_path / "bad.key"
    bad.write_text('public-key = "tooshort"\n')
    with pytest.raises(KeyFileError, match="no valid CURVE public key"):
        keys.load_public_key(bad)
