"""Model names resolve like the recipes say, and hub failures reach the user as one line."""

import http.server
import threading

import pytest

from cbe.errors import UserError
from cbe.weights.reader import from_pretrained, hub_id


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
        from_pretrained(AutoTokenizer, "/no/such/dir/model")


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cbe.config import register_configs
    from tests.conftest import ROOT

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def test_lora_a_is_drawn_as_the_benchmark_draws_it_and_b_is_zero():
    """The benchmark's A: uniform in +-sqrt(6 / fan_in), so its standard deviation is sqrt(6 / fan_in) / sqrt(3)."""
    import math

    import torch
    from peft.tuners.lora import LoraLayer

    from cbe.backends.hf.models import load_model_and_tokenizer
    from cbe.config import settings_of

    model, _ = load_model_and_tokenizer(settings_of(compose("adapter=lora128")))
    by_fan_in: dict[int, list[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            by_fan_in.setdefault(a.shape[1], []).append(a.detach().flatten())
            assert not b.any()
            bound = math.sqrt(6 / a.shape[1])
            assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound  # uniform up to the bound
    assert sorted(by_fan_in) == [128, 512]  # the tiny model's hidden and intermediate sizes
    for fan_in, values in by_fan_in.items():
        assert torch.cat(values).std().item() == pytest.approx(math.sqrt(6 / fan_in) / math.sqrt(3), rel=0.02)


def test_the_memory_plan_is_said_before_loading_and_a_run_that_cannot_fit_is_one_line(capsys):
    from cbe.backends.hf.trainer import plan_memory
    from cbe.config import settings_of

    assert plan_memory(settings_of(compose("task=news", "model=gemma3_4b")), card=40e9, setting="auto") is True
    said = capsys.readouterr().out
    assert "memory: gradient checkpointing on on this 40 GB GPU; about 33.7 GB per device (estimated" in said
    assert plan_memory(settings_of(compose("task=news", "model=gemma3_1b")), card=None, setting="auto") is False
    assert "gradient checkpointing off on the CPU" in capsys.readouterr().out
    with pytest.raises(
        UserError,
        match=r"^gemma3-12b-pt full: its weights and optimizer state alone take 94 GB "
        r"\(estimated\), more than this 40 GB GPU; use adapter=lora128",
    ):
        plan_memory(settings_of(compose("task=news", "model=gemma3_12b")), card=40e9, setting="auto")
    # A per-device batch too large for the card: a warning with the knob, and the run goes on.
    assert (
        plan_memory(
            settings_of(compose("task=news", "model=gemma3_4b", "training.per_device_batch_size=32")),
            card=40e9,
            setting="False",
        )
        is False
    )
    assert "lower training.per_device_batch_size" in capsys.readouterr().out
