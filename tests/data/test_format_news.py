"""Formatting the raw news corpus: the template, missing headers, idempotence, atomic in-place rewrites,
normalization and bad lines."""
import json
import os
import unicodedata

import pytest

from cbe.data import format_news as fn
from cbe.data.format_news import format_news, normalize_text
from cbe.errors import UserError


def raw(idx, title="A headline", date="2024-05-01", text="Body of the article.", **fields):
    record = {"url": f"https://news.example/{idx}", "hostname": "news.example", "title": title, "date": date,
              "crawl_date": "2024-05-02", "language": "en", "text": text, "article_idx": idx, **fields}
    return json.dumps(record, ensure_ascii=False)


def write(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_articles_follow_the_template_and_keep_article_idx(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(7, title="Zürich votes", text="Line one.\nLine two."), "",
                   json.dumps({"title": "No index", "date": "2024-01-02", "text": "Body."}))
    report = format_news(source, tmp_path / "out.jsonl")
    assert read(tmp_path / "out.jsonl") == [
        {"text": "Title: Zürich votes\nDate: 2024-05-01\nArticle: Line one.\nLine two.", "article_idx": 7},
        {"text": "Title: No index\nDate: 2024-01-02\nArticle: Body."},  # no article_idx in, none out
    ]
    assert (report.articles, report.bad_lines, report.already_formatted) == (2, 0, False)
    assert report.summary() == f"formatted 2 articles into {tmp_path / 'out.jsonl'}"


@pytest.mark.parametrize("missing", ["absent", None, "", "   "])
def test_a_missing_null_or_blank_title_or_date_drops_its_line(tmp_path, missing):
    def record(idx, **headers):
        fields = {"text": "Body.", "article_idx": idx, **headers}
        return json.dumps({k: v for k, v in fields.items() if v != "absent"})

    source = write(tmp_path / "raw.jsonl", record(0, title=missing, date="2024-05-01"),
                   record(1, title="Headline", date=missing), record(2, title=missing, date=missing))
    format_news(source, tmp_path / "out.jsonl")
    assert [r["text"] for r in read(tmp_path / "out.jsonl")] == [
        "Date: 2024-05-01\nArticle: Body.", "Title: Headline\nArticle: Body.", "Article: Body."]
    assert "None" not in (tmp_path / "out.jsonl").read_text() and fn.MISSING_HEADER is None


def test_formatted_output_is_left_alone(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0), raw(1, title=None))
    output = tmp_path / "out.jsonl"
    format_news(source, output)
    before = output.read_bytes()
    for target in (output, tmp_path / "again.jsonl"):  # in place, or into a new file
        report = format_news(output, target, overwrite=True)
        assert report.already_formatted and report.articles == 0
        assert report.summary() == f"{output} is already formatted; nothing written"
    assert output.read_bytes() == before and "Title: Title:" not in before.decode()
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "raw.jsonl"]


def test_a_formatted_line_in_a_raw_file_is_refused(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0), json.dumps({"text": "Title: T\nArticle: x", "article_idx": 1}))
    with pytest.raises(UserError, match=r"raw.jsonl:2: already formatted while earlier lines are raw"):
        format_news(source, tmp_path / "out.jsonl")


def test_in_place_rewrite_replaces_the_file(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0), raw(1))
    report = format_news(source, source, overwrite=True)
    assert report.articles == 2 and read(source)[1]["text"].startswith("Title: A headline\n")
    assert os.listdir(tmp_path) == ["raw.jsonl"] and source.stat().st_mode & 0o777 != 0o600


def test_in_place_rewrite_keeps_the_input_on_a_bad_line(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0), raw(1), '{"title": "no text"}', raw(3))
    before = source.read_bytes()
    with pytest.raises(UserError, match=r"raw.jsonl:3: missing field 'text'"):
        format_news(source, source, overwrite=True)
    assert source.read_bytes() == before and os.listdir(tmp_path) == ["raw.jsonl"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_in_place_rewrite_keeps_the_input_when_interrupted_mid_stream(tmp_path, monkeypatch, error):
    source = write(tmp_path / "raw.jsonl", *(raw(i) for i in range(5)))
    before = source.read_bytes()
    real_render, calls = fn.render, []

    def render_then_fail(*args):
        calls.append(1)
        if len(calls) == 3:
            raise error("stop")
        return real_render(*args)
    monkeypatch.setattr(fn, "render", render_then_fail)
    with pytest.raises(error):
        format_news(source, source, overwrite=True)
    assert len(calls) == 3 and source.read_bytes() == before and os.listdir(tmp_path) == ["raw.jsonl"]


def test_an_existing_output_needs_overwrite(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0))
    output = write(tmp_path / "out.jsonl", "keep me")
    for target in (output, source):
        before = target.read_bytes()
        with pytest.raises(UserError, match=rf"{target.name} exists; pass --overwrite"):
            format_news(source, target)
        assert target.read_bytes() == before
    format_news(source, output, overwrite=True)
    assert read(output)[0]["article_idx"] == 0


@pytest.mark.parametrize("dirty,clean", [
    ("Cafe\u0301 de\u0301ja\u0300", "Café déjà"),  # NFD -> NFC
    ("Tom &amp; Jerry &quot;live&quot; &#39;today&#39;&nbsp;now &#x263A; &amp;amp;",
     "Tom & Jerry \"live\" 'today' now ☺ &"),  # double-escaped entities are decoded all the way
    ("AT&T and R&D; Barnes&notice &bogus;", "AT&T and R&D; Barnes&notice &bogus;"),  # not entities: kept
    ("bell\x07 null\x00 esc\x1b c1\x85 del\x7f", "bell null esc c1 del"),
    ("one\r\ntwo\rthree", "one\ntwo\nthree"),
    ("  a \t\t b   c  \n d \t\n", "a b c\n d"),
    ("p1\n\n\n\n\np2\n \n\t\n \np3\n\np4", "p1\n\np2\n\np3\n\np4"),
])
def test_normalize_cleans_scraped_text(dirty, clean):
    assert normalize_text(dirty) == clean
    assert normalize_text(clean) == clean


@pytest.mark.parametrize("text", ["&am\x00p;lt;", "&amp\u037e", "&#38;#38;#38;", "x &#13;&#10;&#10;&#10; y &#9;\t z",
                                  " \u00a0\n\r\n\r\n e\u0301 ", "&amp;nbsp; &#x0;", "\u212b &#x37e;"])
def test_normalize_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once and unicodedata.is_normalized("NFC", once)


def test_normalize_applies_to_title_date_and_text(tmp_path):
    source = write(tmp_path / "raw.jsonl",
                   raw(0, title=" Ta&amp;lk\t\tshow ", date="&nbsp;", text="Hi&nbsp;there\r\n\r\n\r\nbye "))
    format_news(source, tmp_path / "out.jsonl", normalize=True)
    assert read(tmp_path / "out.jsonl")[0]["text"] == "Title: Ta&lk show\nArticle: Hi there\n\nbye"
    with pytest.raises(UserError, match=r"raw.jsonl:1: field 'text' is empty once normalized"):
        format_news(write(source, raw(0, text="&nbsp;\x00")), tmp_path / "out.jsonl", overwrite=True, normalize=True)


def test_normalize_leaves_clean_data_unchanged(tmp_path):
    source = write(tmp_path / "raw.jsonl",
                   raw(0, title="Café & co", text="Première ligne.\n\nSecond paragraph — 東京."),
                   raw(1, title=None, date="", text="AT&T's \"quarter\" results;\nnext line"))
    format_news(source, tmp_path / "plain.jsonl")
    format_news(source, tmp_path / "normalized.jsonl", normalize=True)
    assert (tmp_path / "plain.jsonl").read_bytes() == (tmp_path / "normalized.jsonl").read_bytes()


def test_skip_bad_counts_bad_lines_and_names_the_first_five(tmp_path):
    bad = ["{not json", '{"text": 5}', '{"text": ""}', '{"url": "u"}', '{"text": "x", "title": 3}', "[1]", '"text"']
    lines = [raw(0)] + [line for pair in zip(bad, (raw(i) for i in range(1, 8))) for line in pair]
    source = write(tmp_path / "raw.jsonl", *lines)
    report = format_news(source, tmp_path / "out.jsonl", skip_bad=True)
    assert (report.articles, report.bad_lines, report.first_bad_lines) == (8, 7, [2, 4, 6, 8, 10])
    assert len(read(tmp_path / "out.jsonl")) == 8
    assert "skipped 7 bad lines (2, 4, 6, 8, 10, ...; first: " in report.summary()
    assert "raw.jsonl:2: malformed JSON" in report.summary()


@pytest.mark.parametrize("bad,message", [
    (b"{not json", r"raw.jsonl:2: malformed JSON"),
    (b'{"title": "t", "date": "d"}', r"raw.jsonl:2: missing field 'text' \(has date, title\)"),
    (b'{"text": ["a"]}', r"raw.jsonl:2: field 'text' should be str, got list"),
    (b'{"text": " "}', r"raw.jsonl:2: field 'text' is empty"),
    (b'{"text": "x", "date": 20240501}', r"raw.jsonl:2: field 'date' should be str or null, got int"),
    (b'{"text": "caf\xe9"}', r"raw.jsonl:2: not valid UTF-8"),
])
def test_a_malformed_line_names_file_and_line(tmp_path, bad, message):
    source = tmp_path / "raw.jsonl"
    source.write_bytes(raw(0).encode() + b"\n" + bad + b"\n")
    with pytest.raises(UserError, match=message):
        format_news(source, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_or_empty_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"missing.jsonl: no such file"):
        format_news(tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    with pytest.raises(UserError, match=r"raw.jsonl: no articles to format \(1 bad lines skipped; first: .*:2: "):
        format_news(write(tmp_path / "raw.jsonl", "", "{}"), tmp_path / "out.jsonl", skip_bad=True)
    assert not (tmp_path / "out.jsonl").exists()
