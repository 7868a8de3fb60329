"""Every option of every group composes and validates; bad overrides fail with one line naming the problem."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbe.config import backend_options, register_configs, validate
from cbe.errors import UserError
from cbe.plan import stages_of

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    for group in ("task", "model", "adapter", "backend", "logging")
}


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


def test_groups_hold_the_options_researchers_use():
    assert GROUPS == {
        "task": ["geminon", "news", "news_weekly", "sample", "sample_stages"],
        "model": ["gemma3_12b", "gemma3_1b", "gemma3_270m", "gemma3_4b", "tiny", "tiny_gemma2"],
        "adapter": ["full", "lora128"],
        "backend": ["hf", "kd"],
        "logging": ["none", "tensorboard", "tensorboard_wandb", "wandb"],
    }


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes_and_validates(group, option, monkeypatch):
    cfg = compose_config(f"{group}={option}", *(["backend=kd"] if option == "tiny_gemma2" else []))  # KD's only
    # The downloaded tracks are not here; their files are checked in the test below.
    monkeypatch.setattr(Path, "is_file", lambda self: True)
    validate(cfg)
    assert cfg.training.effective_batch_size % cfg.training.per_device_batch_size == 0


def test_experiment_and_launcher_configs_compose():
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        sweep = compose("config", overrides=["experiment=lr_bs_sweep"], return_hydra_config=True)
        slurm = compose(
            "config",
            overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
        local = compose("config", overrides=["hydra/launcher=submitit_local"], return_hydra_config=True)
    assert dict(sweep.hydra.sweeper.params) == {
        "optimizer.lr": "1e-4,3e-4,1e-3",
        "training.effective_batch_size": "32,64",
    }
    assert sweep.logging.run_name == "sample/tiny-full-hf-lr_bs_sweep"
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    for key in (
        "timeout_min",
        "gpus_per_node",
        "tasks_per_node",
        "nodes",
        "mem_gb",
        "cpus_per_task",
        "partition",
        "account",
        "array_parallelism",
        "setup",
    ):
        assert key in launcher, key
    assert launcher.max_num_timeout > 0  # timed-out jobs are requeued and resume
    assert local.hydra.launcher._target_.endswith("LocalLauncher")


# The benchmark's published recipes: (task, model) -> (lr, per-device batch) for the full fine-tune and LoRA-128.
BENCHMARK_RECIPES = {
    ("news", "gemma3_1b"): ((1e-4, 4), (5e-4, 4)),
    ("news", "gemma3_4b"): ((5e-5, 4), (1e-4, 2)),
    ("news", "gemma3_12b"): ((3e-5, 1), (2e-4, 2)),
    ("geminon", "gemma3_1b"): ((1e-4, 16), (2e-4, 8)),
    ("geminon", "gemma3_4b"): ((5e-5, 32), (2e-4, 4)),
    ("geminon", "gemma3_12b"): ((3e-5, 1), (2e-4, 2)),
}
SEQUENCE_LENGTH = {"news": 1024, "geminon": 256}


@pytest.mark.parametrize("task,model,adapter", [(t, m, a) for t, m in BENCHMARK_RECIPES for a in ("full", "lora128")])
def test_the_design_card_command_composes_the_benchmarks_recipe(task, model, adapter):
    cfg = compose_config(f"task={task}", f"model={model}", f"adapter={adapter}", "backend=hf")
    lr, batch = BENCHMARK_RECIPES[task, model][adapter == "lora128"]
    o, t = cfg.optimizer, cfg.training
    assert (o.lr, t.per_device_batch_size, cfg.data.sequence_length) == (lr, batch, SEQUENCE_LENGTH[task])
    assert o.max_grad_norm is None  # no clipping
    assert cfg.backend.trainer.gradient_checkpointing == "auto"  # on where the card needs it (tests/test_memory.py)
    assert (o.weight_decay, o.b1, o.b2, o.warmup_fraction, o.schedule, o.end_lr_fraction) == (
        0.1,
        0.9,
        0.995,
        0.1,
        "cosine",
        0.0,
    )
    assert (t.effective_batch_size, t.num_train_steps, t.eval_every, t.save_every) == (32, 10_000, 1000, 1000)
    assert t.seed == 42
    assert t.max_checkpoints == (3 if model == "gemma3_12b" else 5) and cfg.logging.log_every_n_steps == 100
    if adapter == "lora128":
        assert cfg.adapter.rank == cfg.adapter.alpha == 128
    assert (
        compose_config(
            f"task={task}",
            f"model={model}",
            f"adapter={adapter}",
            "optimizer.lr=7e-6",
            "training.per_device_batch_size=2",
        ).optimizer.lr
        == 7e-6
    )  # every key stays overridable


def test_recipe_defaults():
    cfg = compose_config("task=news", "model=gemma3_1b")
    assert cfg.data.sequence_length == 1024 and list(cfg.eval.support_thresholds) == [200, 400, 600, 800]
    assert cfg.eval.prompt_template == "Q: {question}\nA:" and cfg.eval.max_new_tokens == 32
    # The sample task has no recipe: it keeps its own CPU settings.
    sample = compose_config()
    assert (sample.optimizer.lr, sample.training.per_device_batch_size) == (3e-3, 8)
    assert sample.logging.log_every_n_steps == 10 and sample.optimizer.max_grad_norm == 1.0
    # A staged task takes its track's recipe by name (conf/recipe/ goes by task name), as README says.
    weekly = compose_config("task=news_weekly", "model=gemma3_1b", "adapter=lora128", "recipe=news_gemma3_1b_lora128")
    assert (weekly.optimizer.lr, weekly.training.per_device_batch_size, len(weekly.data.stages)) == (5e-4, 4, 4)
    geminon = compose_config("task=geminon")
    assert geminon.data.sequence_length == 256
    assert set(geminon.data.extra_qa_paths) == {"sensitive_valqa", "sensitive_testqa"}
    # The benchmark evaluates behind a few-shot prefix (3 examples for news, 7 for geminon), 32 new tokens.
    assert cfg.eval.prompt_prefix_file == "conf/prompts/news_3shot.txt"
    assert geminon.eval.prompt_prefix_file == "conf/prompts/geminon_7shot.txt" and geminon.eval.max_new_tokens == 32
    assert compose_config("task=news", "eval.prompt_prefix_file=null").eval.prompt_prefix_file is None


def test_the_tracks_train_as_the_benchmark_and_the_sample_packs():
    """The benchmark's layout (one document per example), its bf16 adapters and its eval batch for every recipe of
    the tracks; the sample task packs."""
    for task, model, adapter, eval_batch in [
        ("news", "gemma3_1b", "lora128", 4),
        ("news", "gemma3_4b", "full", 4),
        ("geminon", "gemma3_4b", "lora128", 4),
        ("geminon", "gemma3_1b", "full", 32),
        ("geminon", "gemma3_1b", "lora128", 32),
    ]:
        cfg = compose_config(f"task={task}", f"model={model}", f"adapter={adapter}")
        assert cfg.data.packing is False and cfg.eval.loss_batch_size == eval_batch, (task, model, adapter)
        assert (cfg.adapter.dtype, cfg.training.precision) == ("bf16", "auto")
    assert compose_config().data.packing is True and compose_config("task=sample_stages").data.packing is True


def test_missing_track_files_say_how_to_get_them():
    with pytest.raises(
        UserError, match=r"data.train_path: file data/news/train.jsonl does not exist; run `make download TRACK=news`"
    ):
        validate(compose_config("task=news"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("eval.temperature=-0.5", "eval.temperature=-0.5 must be 0 (greedy) or more"),
        ("eval.top_k=-1", "eval.top_k=-1 must be 0 (every token) or more"),
        ("eval.top_p=0", "eval.top_p=0.0 must be in (0, 1] (1: every token)"),
        ("eval.top_p=1.5", "eval.top_p=1.5 must be in (0, 1] (1: every token)"),
        ("eval.seed=-2", "eval.seed=-2 must be 0 or more"),
    ],
)
def test_sampling_settings_out_of_range_are_refused_in_one_line(override, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        validate(compose_config(override))


def test_sampling_settings_in_range_validate():
    cfg = validate(compose_config("eval.temperature=0.8", "eval.top_k=40", "eval.top_p=1", "eval.seed=7"))
    assert (cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p, cfg.eval.seed) == (0.8, 40, 1.0, 7)
    defaults = compose_config().eval
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.seed) == (0.0, 0, 1.0, 0)  # greedy


def test_batch_must_divide_across_devices():
    cfg = compose_config("training.effective_batch_size=12", "training.per_device_batch_size=8")
    with pytest.raises(UserError, match="effective_batch_size=12 is not divisible"):
        validate(cfg)
    with pytest.raises(UserError, match=r"8 x 2"):
        validate(compose_config("training.effective_batch_size=24", "training.per_device_batch_size=8"), world_size=2)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+training.bogus=1", "unknown config key 'training.bogus'; training has effective_batch_size, "),
        ("+eval.foo=1", "unknown config key 'eval.foo'; eval has _target_, prompt_template, "),
        (
            "+backend.trainer.foo=2",
            "unknown config key 'backend.trainer.foo'; backend.trainer has _target_, attn_implementation",
        ),
    ],
)
def test_an_unknown_key_inside_a_section_is_refused_naming_the_valid_ones(override, message):
    with pytest.raises(UserError) as refused:
        validate(compose_config(override))
    assert str(refused.value).startswith(message)
    validate(compose_config("+data.extra_qa_paths.more=data/sample/valqa.jsonl"))  # free-form sections stay free


def test_validate_leaves_the_config_as_composed_and_a_staged_run_derives_its_steps():
    """validate checks: it writes neither typed options nor derived numbers into the config it is given. A staged
    run's steps are its stages' sum; a num_train_steps that says otherwise is refused in one line."""
    composed = compose_config("task=sample_stages", "continual.steps_per_stage=5")
    before = OmegaConf.to_yaml(composed)
    checked = validate(composed)
    assert OmegaConf.to_yaml(composed) == before and checked.training.num_train_steps is None
    assert stages_of(checked)[-1].last_step == 15
    validate(compose_config("task=sample_stages", "continual.steps_per_stage=5", "training.num_train_steps=15"))
    with pytest.raises(
        UserError, match=r"^training.num_train_steps=160 differs from the 15 steps of data.stages; leave it null"
    ):
        validate(compose_config("task=sample_stages", "continual.steps_per_stage=5", "training.num_train_steps=160"))


def test_kd_and_hf_take_several_processes():
    """Both backends run as several processes (KD's: tests/backends/kd/test_kd_processes.py)."""
    for backend in ("kd", "hf"):
        validate(compose_config(f"backend={backend}", "training.per_device_batch_size=4"), world_size=2)


def test_gemma2_is_refused_by_the_hf_backend_and_taken_by_kd():
    with pytest.raises(UserError, match=r"^model.architecture.model_type=gemma2 runs on backend=kd only"):
        validate(compose_config("backend=hf", "model=tiny_gemma2"))
    validate(compose_config("backend=kd", "model=tiny_gemma2"))


BAD_OVERRIDES = [
    (["optimizer.lrr=1"], "optimizer.lrr"),  # misspelled key
    (["optimizer.lr=fast"], "optimizer.lr"),  # wrong type
    (["+foo=1"], "foo"),  # unknown new key
    (["model=gemma3_2b"], "gemma3_12b, gemma3_1b, gemma3_270m, gemma3_4b, tiny"),  # unknown option lists the valid ones
    (["data.train_path=???"], "data.train_path"),  # missing value
    (["training.effective_batch_size=12"], "training.effective_batch_size=12"),
    (["eval.parser=fancy"], "eval.parser"),
    (["backend=kd", "model.architecture.num_key_value_heads=4"], "num_key_value_heads must be fewer"),
    (["+eval.foo=1"], "eval.foo"),  # once through main.py: no InstantiationException traceback
]


@pytest.mark.parametrize("overrides,named", BAD_OVERRIDES)
def test_bad_overrides_fail_with_one_line(run_main, overrides, named):
    proc = run_main(*overrides, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cbe: error:") and named in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_composing_imports_no_framework():
    """Frameworks load only inside the backend that needs them: config, data, eval and logging stay light."""
    import subprocess
    import sys

    code = (
        "import sys, cbe.config, cbe.run, cbe.data.packing, cbe.data.download, cbe.data.format_news, "
        "cbe.eval.evaluator, cbe.eval.judge, cbe.logging, cbe.plot, cbe.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'jax', 'tensorflow', 'transformers', 'trl', "
        "'matplotlib', 'wandb'} | {'google.genai'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_backend_options_are_typed_and_a_setting_the_backend_lacks_is_refused():
    """backend.trainer holds the chosen backend's options only, each of its type: an HF setting given to backend=kd
    would be silently ignored, so it stops the run."""
    with pytest.raises(UserError, match=r"^unknown config key 'backend.trainer.torch_compile'; backend.trainer has"):
        validate(compose_config("backend=kd", "+backend.trainer.torch_compile=false"))
    with pytest.raises(UserError, match=r"^backend.trainer.fsdp_min_size_mb: "):
        validate(compose_config("backend=kd", "backend.trainer.fsdp_min_size_mb=big"))
    cfg = validate(compose_config("backend.trainer.torch_compile=false"))
    assert backend_options(cfg)["torch_compile"] == "False"  # what the backend gets
    assert cfg.backend.trainer.torch_compile is False  # the config stays as composed
