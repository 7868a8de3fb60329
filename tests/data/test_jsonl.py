"""The shared loader reports file:line for every kind of malformed record and normalizes answers."""

import pytest

from cbe.data.jsonl import load_corpus, load_qa
from cbe.errors import UserError


def write(tmp_path, *lines):
    path = tmp_path / "f.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"text": "ok"', r"f.jsonl:2: malformed JSON"),
        ('{"title": "no text"}', r"f.jsonl:2: missing field 'text' \(has title\)"),
        ('{"text": 5}', r"f.jsonl:2: field 'text' should be str, got int"),
        ('{"text": "   "}', r"f.jsonl:2: field 'text' is empty"),
        ("[1, 2]", r"f.jsonl:2: expected a JSON object"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        load_corpus(write(tmp_path, '{"text": "fine"}', bad))


def test_qa_answers_become_strings_and_supports_must_be_int(tmp_path):
    rows = load_qa(
        write(tmp_path, '{"question": "q", "answer": 1843, "supports": 2}', "", '{"question": "r", "answer": "x"}')
    )
    assert [r["answer"] for r in rows] == ["1843", "x"] and rows[0]["supports"] == 2
    assert load_qa(write(tmp_path, '{"question": "q", "answer": "a", "supports": [4, 9]}'))[0]["supports"] == [4, 9]
    with pytest.raises(UserError, match=r"f.jsonl:1: field 'supports' should be int or list, got str"):
        load_qa(write(tmp_path, '{"question": "q", "answer": "a", "supports": "many"}'))
    with pytest.raises(UserError, match=r"no such file"):
        load_qa(tmp_path / "missing.jsonl")


def test_sample_track_loads():
    assert len(load_corpus("data/sample/train.jsonl")) > 20
    assert all(r["answer"] for r in load_qa("data/sample/valqa.jsonl"))
