"""The config schema (one dataclass per section, registered in Hydra's ConfigStore) and its validation: Hydra checks
key names and types against these dataclasses while composing, `validate` adds the rules that span keys, and both
report a mistake as one line naming the key."""

from __future__ import annotations

import copy
import functools
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

from cbe.checkpoints import check_checkpoint, eval_run_dir
from cbe.errors import UserError
from cbe.eval.parse import PARSERS
from cbe.paths import PROJECT_ROOT, resolve_path
from cbe.plan import stages_of
from cbe.specs import SPECS


@dataclass
class TaskConfig:
    name: str = MISSING  # news | geminon | sample


@dataclass
class StageConfig:
    """One stage of a continual run: its corpus and QA sets (cbe.loop trains the stages in turn)."""

    name: str = MISSING  # letters and digits: its QA sets are <name>_valqa, <name>_testqa
    train_path: str = MISSING
    val_path: str = MISSING
    valqa_path: str = MISSING
    testqa_path: str = MISSING
    steps: Optional[int] = None  # optimizer steps; null: continual.steps_per_stage


@dataclass
class DataConfig:
    train_path: str = MISSING
    val_path: str = MISSING
    valqa_path: str = MISSING
    testqa_path: str = MISSING
    extra_qa_paths: dict[str, str] = field(default_factory=dict)  # name -> path, e.g. {sensitive: ...}
    stages: list[StageConfig] = field(default_factory=list)  # a continual run: these corpora in turn (see continual)
    sequence_length: int = 1024
    # true: documents packed into full rows (more tokens a step); false: the benchmark's layout, one document per
    # example cut to sequence_length, effective_batch_size documents a step (cbe/data/packing.py)
    packing: bool = False
    cache_dir: str = "${oc.env:CBE_CACHE_DIR,${oc.env:HOME}/.cache/cbe}"  # tokenized corpora, converted models


@dataclass
class EvalConfig:
    _target_: str = "cbe.eval.evaluator.QAEvaluator"
    prompt_template: str = "Q: {question}\nA:"  # \n and \t typed on a command line become a newline and a tab
    prompt_prefix_file: Optional[str] = None  # few-shot examples put before every prompt; null = zero-shot
    max_new_tokens: int = 32
    # Decoding: temperature 0 is greedy (the benchmark's); above 0 each answer token is drawn (cbe.backends.sampling)
    # from the top_k most likely tokens (0: all) within top_p of the probability (1: all), reproducibly per seed.
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # the sampling seed: question i's draws come from numpy's default_rng([seed, i])
    batch_size: int = 256  # questions per generate call; large batches keep a GPU busy
    parser: str = "default"  # default | news | geminon | finegrained_geminon
    support_thresholds: list[int] = field(default_factory=list)
    num_examples: int = 3  # sample predictions printed per QA set at each evaluation (as in the benchmark)
    loss: bool = True  # also measure eval_loss on data.val_path (false: skip it, e.g. with qa_data)
    max_questions: Optional[int] = None  # evaluate only the first N questions of each set
    qa_data: Optional[str] = None  # evaluate this QA file instead of the task's sets (named after its stem)
    save_details: Optional[str] = None  # also write every scored question (with its qa_set) to this file
    loss_batch_size: int = 8  # rows (documents, data.packing=false) per eval-loss batch; the benchmark's eval batch
    loss_max_batches: Optional[int] = None  # measure eval_loss on the first N batches of data.val_path only


@dataclass
class ModelConfig:
    name: str = MISSING  # a short name (gemma3-1b-pt -> google/gemma-3-1b-pt), any hub id or a local dir
    source: str = "hub"  # hub: from_pretrained(name) | gguf: the offline Gemma 3 270M package | init: random init
    tokenizer: Optional[str] = None  # defaults to the model's own
    architecture: dict[str, Any] = field(default_factory=dict)  # source=init: the Gemma 3 text config to build


@dataclass
class AdapterConfig:
    name: str = MISSING  # full | lora128
    rank: int = 0  # 0 = full fine-tune
    alpha: float = 0.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    # The adapter's weights where the model computes in bf16 (training.precision): bf16 as the benchmark (PEFT's
    # autocast_adapter_dtype=False), or fp32 (PEFT's default upcast). Under fp32 precision everything is fp32.
    dtype: str = "bf16"  # bf16 | fp32


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    end_lr_fraction: float = 0.0  # final lr as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.995
    max_grad_norm: Optional[float] = None  # clip the gradients' global norm to this; null: none (the benchmark's)


@dataclass
class TrainingConfig:
    effective_batch_size: int = 32  # sequences per optimizer step, all devices together
    per_device_batch_size: int = 8  # memory knob; gradient accumulation = effective / (per_device x devices)
    num_train_steps: Optional[int] = 10_000  # optimizer steps; null in a staged run: its stages' sum
    eval_every: int = 1_000
    save_every: int = 1_000
    max_checkpoints: int = 5
    seed: int = 42
    precision: str = "auto"  # auto (bf16 on a GPU or TPU, fp32 on the CPU) | bf16 (pure bf16, the benchmark's) | fp32


@dataclass
class ContinualConfig:
    """How a run with data.stages goes through them."""

    steps_per_stage: int = 100  # optimizer steps of a stage whose `steps` is null
    schedule: str = "per_stage"  # per_stage: warm up and decay in every stage | global: over the whole run
    reset_optimizer: bool = False  # a fresh optimizer state at the start of every stage after the first
    replay_fraction: float = 0.0  # in stage k > 1, this fraction of every batch's rows comes from earlier stages
    retention_qa_path: Optional[str] = None  # a general-knowledge QA set evaluated at every eval (cbe retention-set)
    # lm-evaluation-harness tasks scored after every stage (and on the base model): general ability beside the stages'
    # own, e.g. [cbe_general_mc] (bundled) or [arc_easy, hellaswag]; lm_eval_limit: at most this many items per task
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None


@dataclass
class LoggingConfig:
    project_name: str = "cbe"
    run_name: str = "${task.name}/${model.name}-${adapter.name}-${backend.name}"
    log_every_n_steps: int = 100
    loggers: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ...}


@dataclass
class BackendConfig:
    name: str = MISSING  # hf | kd
    trainer: dict[str, Any] = field(default_factory=dict)  # {_target_: ..., the backend's options below}


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    output_root: str = "outputs"
    mode: str = "train"  # train | eval (set by the mode group: `mode=eval checkpoint=PATH`)
    checkpoint: Optional[str] = None  # mode=eval: a checkpoint dir (full model or LoRA adapter) or `base`


# conf/hydra/launcher/ ships our defaults under the plugin's own option names, which Hydra warns about. Filtered at
# import, so that submitit's job processes (which import this module before composing their config) stay quiet too.
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What a backend is built from: the run's typed sections, never the whole config (cbe.loop.build)."""

    model: ModelConfig
    adapter: AdapterConfig
    optimizer: OptimizerConfig
    training: TrainingConfig  # batch sizes, seed, precision
    total_steps: int  # the run's optimizer steps (a staged run's: its stages' sum)
    sequence_length: int
    cache_dir: str  # tokenized corpora, converted models


def settings_of(cfg: DictConfig) -> Settings:
    """The sections of a (validated) config that a backend is built from."""
    return Settings(
        **{k: OmegaConf.to_object(cfg[k]) for k in ("model", "adapter", "optimizer", "training")},
        total_steps=stages_of(cfg)[-1].last_step,
        sequence_length=cfg.data.sequence_length,
        cache_dir=cfg.data.cache_dir,
    )


def register_configs() -> None:
    """Make the schema the base that conf/config.yaml composes onto."""
    ConfigStore.instance().store(name="cbe_schema", node=Config)


# Keys whose value must be one of a few names (a backend's options: its spec, cbe.specs).
CHOICES = {
    "mode": ("train", "eval"),
    "eval.parser": tuple(PARSERS),
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "training.precision": ("auto", "bf16", "fp32"),
    "adapter.dtype": ("bf16", "fp32"),
    "continual.schedule": ("per_stage", "global"),
    "model.source": ("hub", "gguf", "init"),
}

# Keys that must be positive (None: not set, where that is allowed), and those in a range.
POSITIVE = (
    "training.effective_batch_size",
    "training.per_device_batch_size",
    "training.eval_every",
    "training.save_every",
    "training.max_checkpoints",
    "data.sequence_length",
    "eval.max_new_tokens",
    "eval.batch_size",
    "continual.lm_eval_limit",
    "eval.loss_batch_size",
    "optimizer.lr",
    "optimizer.max_grad_norm",  # null turns clipping off
    "eval.max_questions",
    "eval.loss_max_batches",
)
RANGES = {  # key -> (0 allowed, 1 allowed, what the range means): values between 0 and 1
    "optimizer.warmup_fraction": (True, False, ""),
    "optimizer.end_lr_fraction": (True, True, ""),
    "continual.replay_fraction": (True, False, ""),
    "eval.top_p": (False, True, " (1: every token)"),
}
AT_LEAST_ZERO = {
    "eval.num_examples": "0 or more (sample predictions printed)",
    "eval.temperature": "0 (greedy) or more",
    "eval.top_k": "0 (every token) or more",
    "eval.seed": "0 or more",
}

# Sections whose keys are free: names of QA sets, a model's shape, logger specs.
FREE_FORM = ("data.extra_qa_paths", "model.architecture", "logging.loggers")


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    """A key no section has (`+training.bogus=1`, `+eval.foo=1`, `backend.trainer.torch_compile` of backend=kd)
    stops the run, naming the valid keys: Hydra's `+` adds keys even to the schema's sections."""
    allowed = {"": [f.name for f in fields(Config)]}
    for section in fields(Config):
        if callable(section.default_factory):  # a section's dataclass
            allowed[section.name] = [f.name for f in fields(section.default_factory)]
    if cfg.backend.name in SPECS:
        allowed["backend.trainer"] = [f.name for f in fields(SPECS[cfg.backend.name].options)]
    for where, known in allowed.items():
        node = OmegaConf.select(cfg, where) if where else cfg
        unknown = sorted(set(node) - set(known)) if where not in FREE_FORM else []
        if unknown:
            key = f"{where}.{unknown[0]}" if where else unknown[0]
            raise UserError(f"unknown config key {key!r}; {where or 'the top level'} has {', '.join(known)}")


def backend_options(cfg: DictConfig) -> dict[str, Any]:
    """backend.trainer with each value of its option's type (`true` given to a str option is "True")."""
    spec = SPECS.get(cfg.backend.name)
    if spec is None:
        raise UserError(f"backend.name={cfg.backend.name!r} is not one of {', '.join(SPECS)}")
    try:
        options = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(spec.options), cfg.backend.trainer))
    except ValidationError as e:
        raise UserError(f"backend.trainer.{e.key}: {str(e).splitlines()[0]}")
    for key, allowed in spec.choices.items():
        if options[key] not in allowed:
            raise UserError(f"backend.trainer.{key}={options[key]!r} is not one of {', '.join(allowed)}")
    return options


def _check_values(cfg: DictConfig, world_size: int) -> None:
    """Every value set and resolvable, each key's own rule, and the batch that the devices must divide."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise UserError(f"config value {e.full_key} is not set; set it on the command line, e.g. {e.full_key}=...")
    except InterpolationResolutionError as e:
        raise UserError(f"config value {e.full_key} cannot be resolved: {str(e).splitlines()[0]}")
    for key, allowed in CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise UserError(f"{key}={OmegaConf.select(cfg, key)!r} is not one of {', '.join(allowed)}")
    value = functools.partial(OmegaConf.select, cfg)
    for key in POSITIVE:
        if value(key) is not None and value(key) <= 0:
            raise UserError(f"{key} must be positive, got {value(key)}")
    for key, (zero, one, meaning) in RANGES.items():
        v = value(key)
        if not ((0 <= v if zero else 0 < v) and (v <= 1 if one else v < 1)):
            raise UserError(f"{key}={v} must be in {'[' if zero else '('}0, 1{']' if one else ')'}{meaning}")
    for key, allowed in AT_LEAST_ZERO.items():
        if value(key) < 0:
            raise UserError(f"{key}={value(key)} must be {allowed}")
    t, per_step = cfg.training, cfg.training.per_device_batch_size * world_size
    if cfg.mode == "train" and t.effective_batch_size % per_step:
        raise UserError(
            f"training.effective_batch_size={t.effective_batch_size} is not divisible by "
            f"training.per_device_batch_size x devices = {t.per_device_batch_size} x {world_size}; "
            f"pick a multiple of {per_step}"
        )
    if "{question}" not in cfg.eval.prompt_template:
        raise UserError(f"eval.prompt_template={cfg.eval.prompt_template!r} must contain {{question}}")
    if cfg.continual.lm_eval_tasks and world_size > 1:
        raise UserError(
            "continual.lm_eval_tasks scores the model in one process, and this run has several; leave it out and "
            "score the stages' checkpoints after the run with `cbe lm-eval CHECKPOINT --tasks ...`"
        )


def _check_steps(cfg: DictConfig) -> None:
    """A continual run's stages have distinct plain names and positive steps, and training.num_train_steps, where
    set, is their sum; a run without stages sets it, to 0 (evaluate the start only) or more."""
    stages, steps = cfg.data.stages, cfg.training.num_train_steps
    if not stages:
        if steps is None or steps < 0:
            raise UserError(f"training.num_train_steps must be 0 (evaluate the start only) or more, got {steps}")
        if cfg.continual.lm_eval_tasks:
            raise UserError(
                "continual.lm_eval_tasks scores the model after each of data.stages, and this task has none; score "
                "a checkpoint with `cbe lm-eval CHECKPOINT --tasks ...`"
            )
        return
    if cfg.continual.steps_per_stage <= 0:
        raise UserError(f"continual.steps_per_stage must be positive, got {cfg.continual.steps_per_stage}")
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        if not re.fullmatch(r"[A-Za-z0-9]+", stage.name) or names.count(stage.name) > 1:
            raise UserError(
                f"data.stages[{i}].name={stage.name!r}: a stage needs a name of its own made of letters and digits "
                "(its QA sets are <name>_valqa and <name>_testqa)"
            )
        if stage.steps is not None and stage.steps <= 0:
            raise UserError(
                f"data.stages[{i}].steps must be positive, got {stage.steps} (null: continual.steps_per_stage)"
            )
    total = stages_of(cfg)[-1].last_step  # the plan's own count (cbe.plan)
    if steps is not None and steps != total:
        raise UserError(
            f"training.num_train_steps={steps} differs from the {total} steps of data.stages; leave it null (a staged "
            "run trains its stages' steps) or change the stages' steps"
        )


def input_files(cfg: DictConfig) -> dict[str, str]:
    """Config key -> path of every input file a run reads (data, QA sets, prompt prefix, retention set)."""
    data = cfg.data
    files = {f"data.{k}": data[k] for k in ("train_path", "val_path", "valqa_path", "testqa_path")}
    files |= {f"data.extra_qa_paths.{k}": v for k, v in data.extra_qa_paths.items()}
    for i, stage in enumerate(data.stages):
        files |= {f"data.stages[{i}].{k}": stage[k] for k in ("train_path", "val_path", "valqa_path", "testqa_path")}
    files |= {f"eval.{key}": cfg.eval[key] for key in ("prompt_prefix_file", "qa_data") if cfg.eval[key]}
    if cfg.continual.retention_qa_path:
        files["continual.retention_qa_path"] = cfg.continual.retention_qa_path
    return files


def _check_input_files(cfg: DictConfig) -> None:
    for key, path in input_files(cfg).items():
        if not Path(resolve_path(path)).is_file():  # a file that ships with cbe is found from any directory
            hint = f"run `make download TRACK={cfg.task.name}`" if key.startswith("data.") else "check the path"
            if key.startswith("data.stages"):
                hint = "run `make download TRACK=<track>`, then `make stages TRACK=<track> ...` (README)"
            raise UserError(f"{key}: file {path} does not exist; {hint}")


def validate(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Check the config, one line naming the key where a rule fails; return the config to run: a copy whose input
    files (and tokenizer dir) are the ones found by cbe.paths.resolve_path, the given config left as it is."""
    _refuse_unknown_keys(cfg)
    backend_options(cfg)
    _check_values(cfg, world_size)
    for problem in SPECS[cfg.backend.name].problems(cfg, world_size):
        raise UserError(problem)
    _check_steps(cfg)
    if cfg.mode == "eval":
        check_checkpoint(cfg)
    _check_input_files(cfg)
    found = copy.deepcopy(cfg)
    for key, path in input_files(cfg).items():
        OmegaConf.update(found, key, resolve_path(path), merge=False)  # every reader opens the file found here
    if cfg.model.tokenizer:  # a dir (cbe/assets/tiny_tokenizer, the user's) or a hub id, left as typed
        found.model.tokenizer = resolve_path(cfg.model.tokenizer)
    return found


def quoted(value: str) -> str:
    """A value for a Hydra override, quoted so that any path stays one string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_config(overrides: list[str]) -> DictConfig:
    """The config main.py composes for these overrides, outside a Hydra app (cbe export, eval_dir_override)."""
    register_configs()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def eval_dir_override(argv: list[str]) -> list[str]:
    """The argv pre-pass's `hydra.run.dir=...` of a single `mode=eval` (its eval_run_dir), named here from the
    composed config, before Hydra composes it for the run: composing imports no evaluator. Nothing for a training
    run, a multirun (its sweep dir) or a run dir given on the command line."""
    overrides = [a for a in argv if not a.startswith("-")]
    if "mode=eval" not in overrides or len(overrides) < len(argv) or any("hydra.run.dir=" in o for o in overrides):
        return []
    try:
        where = eval_run_dir(compose_config(overrides))
    except Exception:  # a mistake in the command line: the run's own composition reports it in one line
        return []
    return [f"hydra.run.dir={quoted(where)}"]
