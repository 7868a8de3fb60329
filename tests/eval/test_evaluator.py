"""The evaluator: few-shot prompts in the benchmark's format, small details lines, printed sample predictions."""

import json
import re

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

import cbe.eval.evaluator
from cbe import cli
from cbe.backends.sampling import GREEDY, Sampling
from cbe.config import EvalConfig, validate
from cbe.data.jsonl import load_qa
from cbe.data.packing import document_rows
from cbe.eval.evaluator import QAEvaluator, unescape
from cbe.eval.parse import DEFAULT_MARKERS, question_markers
from cbe.run import RunDir, read_jsonl
from tests.conftest import ROOT
from tests.test_config import compose_config

# The benchmark's few-shot files: one instruction line, a blank line, then `Q: ...\nA: ...` examples separated by
# blank lines; 3 examples for news, 7 for geminon.
PREFIX = re.compile(r"[^\n]+\n\n(Q: [^\n]+\nA: [^\n]+)(\n\nQ: [^\n]+\nA: [^\n]+)*\n?")


@pytest.mark.parametrize("task,examples", [("news", 3), ("geminon", 7)])
def test_task_prefixes_have_the_published_format_and_count(task, examples):
    path = OmegaConf.load(ROOT / "conf" / "task" / f"{task}.yaml").eval.prompt_prefix_file
    text = (ROOT / path).read_text()
    assert PREFIX.fullmatch(text), text
    assert text.count("\nQ: ") == text.count("\nA: ") == examples


class ScriptedModel:
    """Answers each prompt from a table keyed by the question, and records the prompts it was given: the evaluator,
    not a model, is under test."""

    tokenizer = "the model's tokenizer"

    def __init__(self, answers):
        self.answers, self.prompts, self.stop_strings, self.sampling = answers, [], None, None

    def generate(self, prompts, max_new_tokens, batch_size, stop_strings, sampling=GREEDY):
        self.prompts += prompts
        self.stop_strings, self.sampling = stop_strings, sampling
        return [self.answer(p) for p in prompts]

    def answer(self, prompt):
        """The answer to the table's question asked last in the prompt (after the few-shot examples); "" if none."""
        asked = [question for question in self.answers if question in prompt]
        return self.answers[max(asked, key=prompt.rfind)] if asked else ""

    def loss_sums(self, rows, batches):
        return np.array([[3.0, 2.0, 1.0]] * len(batches))  # a token mean of 1.5 in every batch


# The validation rows an evaluation measures eval_loss on: 3 documents, one batch of eval.loss_batch_size.
VAL_ROWS = document_rows([np.array([2, 10, 11, 1]), np.array([2, 12, 1]), np.array([2, 1])], 8, 0)


@pytest.fixture(autouse=True)
def packed(monkeypatch):
    """data.val_path packs as VAL_ROWS; the list of what the evaluator packed, with which tokenizer."""
    packed = []

    def corpus_rows(path, tokenizer, length, cache_dir, packing):
        packed.append((path, tokenizer))
        return VAL_ROWS

    monkeypatch.setattr(cbe.eval.evaluator, "corpus_rows", corpus_rows)
    return packed


@pytest.fixture
def news_like(tmp_path):
    """A QA file shaped like News's (large closedbook_/openbook_ fields) and a geminon-like one."""
    records = [
        {
            "question": "Who won?",
            "answer": "Ada Lovelace",
            "supports": [3, 9],
            "question_id": "n1",
            "closedbook_gemini": "x" * 10_000,
            "openbook_context": ["y" * 10_000],
        },
        {
            "question": "Which year?",
            "answer": 1843,
            "supports": [4],
            "question_id": "n2",
            "closedbook_gemini": "x" * 10_000,
            "openbook_context": ["y" * 10_000],
        },
    ]
    (tmp_path / "valqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    geminon = [
        {
            "question": "What types of moves?",
            "answer": "Fire and Ice",
            "geminon_idx": 7,
            "geminon_name": "Orbisca",
            "supports": 2,
        }
    ]
    (tmp_path / "testqa.jsonl").write_text(json.dumps(geminon[0]) + "\n")
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("Answer briefly.\n\nQ: Capital of Atlantis?\nA: Poseidonia\n")
    return tmp_path, prefix


def evaluator(tmp_path, prefix, **overrides):
    data = OmegaConf.create(
        {
            "val_path": "val.jsonl",
            "valqa_path": str(tmp_path / "valqa.jsonl"),
            "testqa_path": str(tmp_path / "testqa.jsonl"),
            "extra_qa_paths": {},
            "sequence_length": 8,
            "cache_dir": str(tmp_path / "cache"),
            "packing": False,
        }
    )
    options = dict(
        prompt_template="Q: {question}\nA:",
        prompt_prefix_file=str(prefix),
        max_new_tokens=32,
        batch_size=8,
        parser="finegrained_geminon",
        support_thresholds=[2],
        num_examples=1,
        max_questions=None,
        loss_batch_size=8,
    )
    return QAEvaluator(data, RunDir(tmp_path / "run"), **{**options, **overrides})


def test_prompts_put_the_prefix_before_the_question_with_a_blank_line(news_like):
    tmp_path, prefix = news_like
    model = ScriptedModel(
        {"Who won?": " Ada Lovelace\n", "Which year?": "\n1843\n", "What types of moves?": " Ice and Fire"}
    )
    metrics = evaluator(tmp_path, prefix).evaluate(model, 0)
    assert model.prompts[0] == "Answer briefly.\n\nQ: Capital of Atlantis?\nA: Poseidonia\n\nQ: Who won?\nA:"
    assert metrics["valqa_exact_match"] == 1.0 and metrics["testqa_fuzzy_match"] == 1.0
    zero_shot = ScriptedModel(model.answers)
    evaluator(tmp_path, None, prompt_prefix_file=None).evaluate(zero_shot, 0)
    assert zero_shot.prompts[0] == "Q: Who won?\nA:"


def test_details_keep_what_scoring_needs_and_not_the_whole_record(news_like):
    tmp_path, prefix = news_like
    model = ScriptedModel(
        {"Who won?": " Ada Lovelace won\n", "Which year?": "", "What types of moves?": " Ice and Fire"}
    )
    evaluator(tmp_path, prefix).evaluate(model, 5)
    news = read_jsonl(tmp_path / "run" / "eval_details" / "valqa_step_000005.jsonl")
    assert set(news[0]) == {
        "question",
        "ground_truth",
        "supports",
        "question_id",
        "prompt",
        "raw_prediction",
        "parsed_prediction",
        "exact_match",
        "substring_match",
        "fuzzy_match",
        "token_f1",
    }
    assert news[0]["supports"] == [3, 9] and news[0]["fuzzy_match"] and not news[0]["exact_match"]
    assert news[1]["raw_prediction"] == "" and not news[1]["substring_match"]  # an empty generation is wrong
    geminon = read_jsonl(tmp_path / "run" / "eval_details" / "testqa_step_000005.jsonl")[0]
    assert geminon["geminon_idx"] == 7 and geminon["geminon_name"] == "Orbisca" and geminon["fuzzy_match"]
    assert (tmp_path / "run" / "eval_details" / "valqa_step_000005.jsonl").stat().st_size < 2_000


def test_num_examples_prints_that_many_predictions_and_max_questions_limits_the_sets(news_like):
    tmp_path, prefix = news_like
    model = ScriptedModel({"Who won?": " Ada Lovelace\n", "Which year?": "1843", "What types of moves?": "Ice"})
    ev = evaluator(tmp_path, prefix, num_examples=2, max_questions=1)
    report = ev.report(ev.evaluate(model, 0))
    assert ev.qa_sets["valqa"] == ev.qa_sets["valqa"][:1] and len(model.prompts) == 2
    assert re.findall(r"^\[(\w+)\] (\w+):", report, re.M) == [("exact", "valqa"), ("wrong", "testqa")]
    silent = evaluator(tmp_path, prefix, num_examples=0)
    assert not re.findall(r"^\[", silent.report(silent.evaluate(model, 0)), re.M)


def test_eval_loss_batches_are_loss_batch_size_rows_in_order_capped_at_loss_max_batches(news_like):
    tmp_path, prefix = news_like
    asked = []

    class Recording(ScriptedModel):
        def loss_sums(self, rows, batches):
            asked.append([b.tolist() for b in batches])
            return super().loss_sums(rows, batches)

    model = Recording({})
    evaluator(tmp_path, prefix, loss_batch_size=2).evaluate(model, 0)
    evaluator(tmp_path, prefix, loss_batch_size=1, loss_max_batches=2).evaluate(model, 0)
    assert asked == [[[0, 1], [2]], [[0], [1]]]


def test_eval_loss_names_its_corpus_or_is_skipped(news_like, packed, capsys):
    tmp_path, prefix = news_like
    model = ScriptedModel({"Who won?": "Ada", "Which year?": "1843", "What types of moves?": "Ice"})
    ev = evaluator(tmp_path, prefix)
    measured, _ = ev.evaluate(model, 0), ev.evaluate(model, 10)
    assert packed == [("val.jsonl", model.tokenizer)]  # once, at the first evaluation, with its tokenizer
    assert capsys.readouterr().out.count(VAL_ROWS.describe("val")) == 1
    assert (measured["eval_loss"], measured["eval_loss_data"]) == (1.5, "val.jsonl")
    assert "eval_loss 1.5000 on val.jsonl" in ev.report(measured)
    skipped = evaluator(tmp_path, prefix, loss=False)
    metrics = skipped.evaluate(model, 0)
    assert metrics["eval_loss"] is None and "eval_loss not measured" in skipped.report(metrics)
    assert len(packed) == 1


def evaluator_of(tmp_path, *overrides):
    """The evaluator main.py builds for the sample task with these overrides (the same validate and instantiate)."""
    cfg = validate(compose_config(*overrides))
    return instantiate(cfg.eval, data=cfg.data, run=RunDir(tmp_path / "run"))


def test_the_configs_prompt_prefix_file_starts_every_prompt_of_every_set(tmp_path):
    prefix = tmp_path / "their_prefix.txt"
    prefix.write_text("Answer in a few words.\n\nQ: Capital of Atlantis?\nA: Poseidonia\n")
    asked = [r["question"] for name in ("valqa", "testqa") for r in load_qa(f"data/sample/{name}.jsonl")[:3]]
    model = ScriptedModel({})
    evaluator_of(tmp_path, f"eval.prompt_prefix_file={prefix}", "eval.max_questions=3").evaluate(model, 0)
    # The sample task's template is "{question}"; the file's text, then a blank line, then the question.
    assert model.prompts == [f"Answer in a few words.\n\nQ: Capital of Atlantis?\nA: Poseidonia\n\n{q}" for q in asked]
    zero_shot = ScriptedModel({})
    evaluator_of(tmp_path, "eval.max_questions=3").evaluate(zero_shot, 0)  # the sample task has no prefix
    assert zero_shot.prompts == asked


def test_the_configs_sampling_settings_reach_generate(tmp_path):
    greedy, sampled = ScriptedModel({}), ScriptedModel({})
    evaluator_of(tmp_path, "eval.loss=false", "eval.max_questions=1").evaluate(greedy, 0)
    settings = ["eval.temperature=0.7", "eval.top_k=40", "eval.top_p=0.9", "eval.seed=3"]
    evaluator_of(tmp_path, "eval.loss=false", "eval.max_questions=1", *settings).evaluate(sampled, 0)
    assert greedy.sampling == GREEDY and sampled.sampling == Sampling(0.7, 40, 0.9, 3)


def test_every_extra_qa_set_is_asked_scored_reported_and_written(tmp_path):
    rare = [
        {"question": "The Zorblat hums", "answer": "at dawn", "supports": 0},
        {"question": "The Tazzerine counts to", "answer": 12, "supports": 4},
    ]
    (tmp_path / "rare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rare))
    (tmp_path / "held.jsonl").write_text(json.dumps({"question": "The Snarvel keeps", "answer": "the Hollow Peaks"}))
    model = ScriptedModel(
        {"The Zorblat hums": " at dawn.\n", "The Tazzerine counts to": " 11", "The Snarvel keeps": "the Hollow Peaks"}
    )
    ev = evaluator_of(
        tmp_path,
        f"+data.extra_qa_paths.rare={tmp_path / 'rare.jsonl'}",
        f"+data.extra_qa_paths.held={tmp_path / 'held.jsonl'}",
        "eval.max_questions=2",
    )
    metrics = ev.evaluate(model, 20)
    assert (metrics["rare_n"], metrics["rare_exact_match"], metrics["rare_token_f1"]) == (2, 0.5, 0.5)
    assert (metrics["rare_n_supports_ge_2"], metrics["rare_exact_match_supports_ge_2"]) == (1, 0.0)  # 11, not 12
    assert (metrics["held_n"], metrics["held_exact_match"]) == (1, 1.0)
    assert metrics["valqa_n"] == metrics["testqa_n"] == 2  # the task's own sets are still asked
    assert sum(p in ("The Zorblat hums", "The Tazzerine counts to", "The Snarvel keeps") for p in model.prompts) == 3
    details = tmp_path / "run" / "eval_details"
    written = read_jsonl(details / "rare_step_000020.jsonl")
    assert [(d["question"], d["raw_prediction"], d["parsed_prediction"], d["supports"]) for d in written] == [
        ("The Zorblat hums", " at dawn.\n", "at dawn", 0),
        ("The Tazzerine counts to", " 11", "11", 4),
    ]
    assert read_jsonl(details / "held_step_000020.jsonl")[0]["exact_match"] is True
    assert re.findall(r"^(rare|held) +(\d+) ", ev.report(metrics), re.M) == [("rare", "2"), ("held", "1")]


@pytest.mark.parametrize(
    "template, stops",
    [("Q: {question}\\nA:", ["Q:"]), ("Question: {question}\\nAnswer:", ["Question:"]), ("{question}", [])],
)
def test_the_stop_strings_are_the_templates_question_marker(template, stops):
    """A model that goes on to ask itself the next question writes the template's marker: the answer ends there."""
    assert question_markers(unescape(template)) == stops


def test_the_parsers_default_markers_are_those_of_the_default_template():
    assert question_markers(EvalConfig().prompt_template) == list(DEFAULT_MARKERS) == ["Q:"]


@pytest.mark.parametrize(
    "template, parsed",
    [  # valqa's two answers, then testqa's
        ("Q: {question}\\nA:", ["Ada Lovelace Question: Which year?", "1843", "Fire and Ice"]),  # the default
        ("Question: {question}\\nAnswer:", ["Ada Lovelace", "1843", "Fire and Ice Q: and more"]),
    ],
)
def test_answers_are_cut_at_the_templates_question_marker_also_by_rescore(news_like, capsys, template, parsed):
    """A model that goes on to ask itself the next question writes the template's marker: its answer ends there,
    and `cbe rescore` of the run's details file cuts at the same marker."""
    tmp_path, _ = news_like
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"eval": {"prompt_template": template}}))
    raw = [" Ada Lovelace Question: Which year?", " 1843", " Fire and Ice Q: and more"]
    model = ScriptedModel(dict(zip(["Who won?", "Which year?", "What types of moves?"], raw)))
    ev = evaluator(tmp_path, None, prompt_prefix_file=None, prompt_template=template, loss=False)
    metrics = ev.evaluate(model, 0)
    assert [d["parsed_prediction"] for name in ("valqa", "testqa") for d in ev.last_details[name]] == parsed
    capsys.readouterr()
    cli.main(["rescore", str(run.details_path("valqa", 0))])
    rescored = json.loads(capsys.readouterr().out)["exact_match"]
    assert rescored == metrics["valqa_exact_match"] == (1.0 if "Ada Lovelace" in parsed else 0.5)
