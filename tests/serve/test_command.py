"""`quantpipe serve` as users start it: the subcommand serves, answers curl-style requests, logs no
token, and exits 0 on SIGTERM; bad flags are one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import numpy as np

from quantpipe.runtime.config import load_config
from quantpipe.serve.model import BUILTIN_MODEL_NAME as MODEL
from tests.serve.conftest import free_port, serve_cli, stages_in_threads, wait_http_ready, write_config


def test_serve_subcommand_answers_json_infer_and_stops_on_sigterm(tmp_path):
    path = write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])
    cfg = load_config(path)
    token = tmp_path / "token"
    token.write_text("t0ps3cret\n")
    port = free_port()
    with stages_in_threads(cfg):
        p = subprocess.Popen([sys.executable, "-m", "quantpipe.cli", "serve", "--config", str(path),
                              "--http", f"127.0.0.1:{port}", "--token-file", str(token)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http_ready(f"127.0.0.1:{port}", 30, p)
            x = np.zeros((1, 3, 32, 32), np.float32)
            body = json.dumps({"id": "curl-1", "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                          "data": x.reshape(-1).tolist()}]}).encode()
            req = urllib.request.Request(f"{url}/v2/models/{MODEL}/infer", data=body, method="POST",
                                         headers={"Authorization": "Bearer t0ps3cret", "Content-Type": "application/json"})
            doc = json.loads(urllib.request.urlopen(req, timeout=10).read())
            assert doc["id"] == "curl-1" and doc["outputs"][0]["shape"] == [1, 1000]
            assert len(doc["outputs"][0]["data"]) == 1000
        finally:
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=20)
        assert p.returncode == 0, out
        assert "t0ps3cret" not in out and "bearer token required" in out


def test_bad_listen_address_is_a_one_line_error(tmp_path):
    path = write_config(tmp_path, ["builtin:identity"])
    r = serve_cli(path, "--http", "localhost")
    assert r.returncode == 1 and "write HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_links_behind_the_server_keep_curve(tmp_path):
    import tritonclient.http as th

    from quantpipe.runtime import keys
    from tests.serve.conftest import ServerThread
    from tests.serve.test_http import _images, _input, chained

    keydir = tmp_path / "keys"
    for name in ("source", "stage0", "stage1", "sink"):
        keys.generate(keydir, name)
    cfg = load_config(write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])).replace(keys_dir=str(keydir))
    with stages_in_threads(cfg), ServerThread(cfg) as srv:
        srv.wait_ready()  # stage 0 accepted the server's 'source' key, the last stage trusts its 'sink' key
        x = _images(3, seed=2)
        r = th.InferenceServerClient(srv.http_url).infer(MODEL, [_input("input", x, "FP32")])
        np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
