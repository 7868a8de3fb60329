"""`cbe export`: every checkpoint kind (HF and KD, full and LoRA, merged or as a PEFT adapter) becomes an HF dir that
transformers (and PEFT) load, computes the logits the backend that trained it computes, and evaluates with
`mode=eval backend=hf` to the training run's own last metrics and answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cbe.cli import main as cbe
from cbe.export import checkpoint_config, export_checkpoint, load_backend
from cbe.lm_eval import BUNDLED
from cbe.run import RunDir, read_jsonl
from tests.conftest import HUB_TOKEN, loop_in_process

# 16 steps at a high learning rate (LoRA's too): the trained weights, an adapter's too, are far from the base model's.
RUN = ("task=sample", "model=tiny", "logging=none", "training.num_train_steps=16", "training.eval_every=16")
RUN += ("training.save_every=16", "eval.max_questions=8", "optimizer.lr=1e-2")
KINDS = {
    "hf-full": ("hf", "full"),
    "hf-lora": ("hf", "lora128"),
    "kd-full": ("kd", "full"),
    "kd-lora": ("kd", "lora128"),
}
PROMPTS = ["Zorblat the river creature lives in", "The council of Geminon meets every"]


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory, cache_dir) -> Path:
    """A finished run of one kind; its .hydra/overrides.yaml as main.py writes it, so its settings are inherited."""
    backend, adapter = KINDS[request.param]
    overrides = [*RUN, f"backend={backend}", f"adapter={adapter}", f"data.cache_dir={cache_dir}"]
    root = tmp_path_factory.mktemp(request.param) / "run"
    loop_in_process(root, *overrides).train()
    (root / ".hydra").mkdir()
    (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return root


def own_logits(backend, ids: list[int]) -> np.ndarray:
    """The logits the backend computes itself on one prompt (its model as mode=eval loads it)."""
    if hasattr(backend, "base"):  # KD: the gemma model, with LoRA where adapted
        tokens = np.array([ids], np.int32)
        out = backend.model.apply({"params": backend.params}, tokens, positions=np.arange(len(ids))[None])
        return np.asarray(out.logits[0], np.float32)
    with torch.no_grad():
        return backend.model(torch.tensor([ids])).logits[0].float().numpy()


def exported_model(out: Path, run: Path):
    """The export as the ecosystem loads it: a whole model, or the base model (the HF backend's) with the adapter."""
    if not (out / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inherited = yaml.safe_load(RunDir(run).overrides.read_text())
    return PeftModel.from_pretrained(load_backend(checkpoint_config("base", [*inherited, "backend=hf"])).model, out)


def lm_eval_directly(model_dir: Path) -> dict:
    """lm-eval's own simple_evaluate of the bundled task on an HF dir, from the task's dir (its data_files are
    relative)."""
    import os

    import lm_eval
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(BUNDLED)
    try:
        return lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=["cbe_general_mc"],
            task_manager=TaskManager(include_path=str(BUNDLED), include_defaults=False),
            device="cpu",
            batch_size=8,
        )["results"]["cbe_general_mc"]
    finally:
        os.chdir(cwd)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def evaluate_export(out: Path, adapter: str, where: Path, cache_dir: Path) -> RunDir:
    """mode=eval backend=hf of an export (outside any run: the settings on the command line)."""
    overrides = (
        *RUN,
        "mode=eval",
        f"checkpoint={out}",
        "backend=hf",
        f"adapter={adapter}",
        f"data.cache_dir={cache_dir}",
    )
    loop_in_process(where, *overrides).evaluate_checkpoint()
    return RunDir(where)


@pytest.mark.slow
@pytest.mark.parametrize("trained", list(KINDS), indirect=True)
def test_an_export_computes_the_backends_logits_and_evaluates_as_its_run(trained, tmp_path, cache_dir, capsys):
    latest = trained / "checkpoints" / "latest"
    backend = load_backend(checkpoint_config(str(latest)))
    lora = "lora" in trained.parent.name
    for merge in (True, False) if lora else (False,):  # LoRA: merged, and as a PEFT adapter
        out = tmp_path / f"export-{merge}"
        cbe(["export", str(latest), "--out", str(out), *(["--merge-lora"] if merge else [])])
        adapter = "lora128" if lora and not merge else "full"
        assert (out / "adapter_config.json").exists() == (adapter == "lora128")

        model = exported_model(out, trained).eval()
        for prompt in PROMPTS:
            ids = backend.tokenizer(prompt)["input_ids"]
            with torch.no_grad():
                theirs = model(torch.tensor([ids])).logits[0].float().numpy()
            assert relative_error(theirs, own_logits(backend, ids)) < 1e-5

        # mode=eval backend=hf of the export: the run's last metrics and the same answers.
        run, evaluation = RunDir(trained), evaluate_export(out, adapter, tmp_path / f"eval-{merge}", cache_dir)
        last, ours = read_jsonl(run.eval_results)[-1], read_jsonl(evaluation.eval_results)[-1]
        assert ours["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-4)
        qa = [k for k in last if k.startswith(("valqa_", "testqa_")) and not k.endswith("ci95")]
        assert {k: ours[k] for k in qa} == {k: last[k] for k in qa}
        answers = []
        for qa_set in ("valqa", "testqa"):
            theirs = [r["raw_prediction"] for r in read_jsonl(run.details_path(qa_set, last["step"]))]
            assert [r["raw_prediction"] for r in read_jsonl(evaluation.details_path(qa_set, 0))] == theirs
            answers += theirs
        first = read_jsonl(run.eval_results)[0]
        assert first["eval_loss"] - last["eval_loss"] > 0.5 and answers != [""] * len(answers)  # the run learned

        if merge and "kd" in trained.parent.name:  # cbe lm-eval of a KD checkpoint = lm-eval of its export
            cbe(["lm-eval", str(latest), "--tasks", "cbe_general_mc"])
            printed = capsys.readouterr().out.splitlines()[-1].removeprefix("results: ")
            ours = json.loads(Path(printed).read_text())["results"]["cbe_general_mc"]
            direct = lm_eval_directly(out)
            assert 0 < ours["acc,none"] < 1 and ours["acc,none"] == direct["acc,none"]
            assert ours["acc_norm,none"] == direct["acc_norm,none"]


def test_bf16_is_the_weights_rounded_to_nearest_even_and_an_existing_out_needs_overwrite(tmp_path, cache_dir):
    base = ["model=tiny", f"data.cache_dir={cache_dir}"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    cbe(["export", "base", "--out", str(fp32), *base])
    export_checkpoint("base", bf16, dtype="bf16", overrides=base)
    full, rounded = load_file(fp32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert rounded.keys() == full.keys() and all(rounded[k].dtype == torch.bfloat16 for k in rounded)
    assert all(torch.equal(rounded[k], full[k].to(torch.bfloat16)) for k in full)
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16
    # The base model is the one the config names, the HF backend's draw.
    model = load_backend(checkpoint_config("base", base)).model
    assert all(torch.equal(full[k], model.state_dict()[k]) for k in full)

    with pytest.raises(SystemExit) as refused:
        cbe(["export", "base", "--out", str(bf16), *base])
    assert (
        refused.value.code == 2 and load_file(bf16 / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    )
    cbe(["export", "base", "--out", str(bf16), "--overwrite", *base])
    assert all(torch.equal(t, full[k]) for k, t in load_file(bf16 / "model.safetensors").items())


def test_the_kd_writers_bf16_rounds_as_torch_does(tmp_path):
    """cbe.weights.writer's bf16 (numpy has none), ties and extremes, against torch's rounding."""
    from cbe.weights.writer import write_safetensors

    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5e-3, 3.0e38, 1e-40], np.float32)
    write_safetensors(tmp_path / "x.safetensors", {"x": values}, "bf16")
    assert torch.equal(load_file(tmp_path / "x.safetensors")["x"], torch.from_numpy(values).to(torch.bfloat16))


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        cbe(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cbe: error: checkpoint=") and "\n" not in err and not (tmp_path / "out").exists()


def test_export_pushes_to_the_hub_and_the_token_goes_only_to_the_hub(hub, tmp_path, cache_dir):
    from huggingface_hub import hf_hub_download

    out = tmp_path / "base"
    cbe(["export", "base", "--out", str(out), "--push-to-hub", "me/tiny", "--private", "model=tiny"])
    assert hub.private["me/tiny"] is True
    for file in out.iterdir():
        assert Path(hf_hub_download("me/tiny", file.name, cache_dir=tmp_path / "hub")).read_bytes() == file.read_bytes()
    hosts = {server for server, _, _, headers in hub.received if HUB_TOKEN in headers.get("authorization", "")}
    assert hosts == {hub.url} and len({server for server, *_ in hub.received}) == 2  # the storage got the weights
