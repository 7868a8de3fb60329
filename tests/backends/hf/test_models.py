"""Model names resolve like the recipes say, and hub failures reach the user as one line."""
import http.server
import threading

import pytest

from cbe.backends.hf.models import _from_pretrained, hub_id
from cbe.errors import UserError


def test_short_names_map_to_google_repos():
    assert hub_id("gemma3-1b-pt") == "google/gemma-3-1b-pt"
    assert hub_id("gemma3-12b-it") == "google/gemma-3-12b-it"
    assert hub_id("gemma3-4b") == "google/gemma-3-4b-pt"
    assert hub_id("my-org/my-model") == "my-org/my-model"


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request like the hub answers a user who has not accepted a gated model's license."""

    def _refuse(self):
        body = b'{"error": "Access to model google/gemma-3-1b-pt is restricted."}'
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model google/gemma-3-1b-pt is restricted.")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def gated_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_gated_model_says_accept_the_license_in_one_line(run_main, gated_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", gated_hub)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    proc = run_main("model=gemma3_1b", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("cbe: error: google/gemma-3-1b-pt is gated: accept its license"), lines[-3:]
    assert "hf auth login" in lines[-1] and "Traceback" not in proc.stderr


def test_a_name_that_is_neither_repo_nor_dir_is_one_line(tmp_path):
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match=r"cannot load model '/no/such/dir/model': .*Check model.name"):
        _from_pretrained(AutoTokenizer, "/no/such/dir/model")
