"""Sampled evaluation (eval.temperature, top_k, top_p, seed) on both backends from the same tiny weights: the same
answers on HF and KD for the same seed, the same again for it, and other answers for another seed."""

import dataclasses

import pytest

from cbe.backends.sampling import GREEDY, Sampling
from cbe.loop import build
from cbe.run import RunDir
from tests.test_config import compose_config

pytestmark = pytest.mark.slow

SAMPLED = ["eval.temperature=1.2", "eval.top_k=50", "eval.top_p=0.95", "eval.seed=11"]
COMMON = ["mode=eval", "checkpoint=base", "logging=none", "eval.loss=false", "eval.max_questions=12"]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """Each backend and its evaluator, built as main.py builds them (the tiny model's seeded weights), by name."""
    built = {}
    for name in ("hf", "kd"):
        cfg = compose_config(f"backend={name}", *COMMON, "eval.batch_size=8", *SAMPLED)
        backend, evaluator = build(cfg, RunDir(tmp_path_factory.mktemp(name)))
        backend.load("base")
        built[name] = backend, evaluator
    return built


def raw_answers(backend, evaluator) -> dict[str, list[str]]:
    evaluator.evaluate(backend, 0)
    return {name: [d["raw_prediction"] for d in details] for name, details in evaluator.last_details.items()}


def test_a_sampled_evaluation_answers_alike_on_both_backends(backends):
    """The config's settings reach both decoders through the evaluator; the untrained model's sampled answers are
    noise, a different one to every question and none the greedy one, so equal lists mean equal draws."""
    hf, kd = raw_answers(*backends["hf"]), raw_answers(*backends["kd"])
    assert backends["hf"][1].sampling == backends["kd"][1].sampling == Sampling(1.2, 50, 0.95, 11)
    assert hf.keys() == {"valqa", "testqa"} and hf == kd
    assert all(len(set(answers)) == len(answers) == 12 for answers in hf.values())
    backend, evaluator = backends["hf"]
    prompts = [evaluator.prompt(record) for record in evaluator.qa_sets["valqa"]]
    greedy = backend.generate(prompts, evaluator.max_new_tokens, 8, evaluator.stop_strings, sampling=GREEDY)
    assert all(a != g for a, g in zip(hf["valqa"], greedy))


def test_top_p_alone_draws_alike_on_both_backends(backends):
    _, evaluator = backends["hf"]
    prompts = [evaluator.prompt(record) for record in evaluator.qa_sets["testqa"]]
    sampling = Sampling(0.9, top_p=0.8, seed=3)
    answers = {
        name: backend.generate(prompts, 16, 8, evaluator.stop_strings, sampling=sampling)
        for name, (backend, _) in backends.items()
    }
    assert answers["hf"] == answers["kd"] and len(set(answers["hf"])) >= 10


def test_kd_sampled_answers_repeat_with_their_seed_and_change_with_another(backends):
    backend, evaluator = backends["kd"]
    prompts = [evaluator.prompt(record) for record in evaluator.qa_sets["valqa"]]
    sampling = evaluator.sampling
    first = backend.generate(prompts, 16, 8, evaluator.stop_strings, sampling=sampling)
    assert backend.generate(prompts, 16, 8, evaluator.stop_strings, sampling=sampling) == first
    other = backend.generate(prompts, 16, 8, evaluator.stop_strings, sampling=dataclasses.replace(sampling, seed=12))
    assert sum(a != b for a, b in zip(first, other)) >= 10
