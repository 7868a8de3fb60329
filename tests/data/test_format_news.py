"""Formatting the raw news corpus as the benchmark renders it: the template, dates, untitled articles,
whitespace, idempotence, atomic in-place rewrites, normalization and bad lines. Expected strings are
written by hand from the benchmark's published rules, not produced by our code."""

import json
import os
import unicodedata

import pytest

from cbe import cli
from cbe.data import format_news as fn
from cbe.data.format_news import format_news, normalize_text
from cbe.errors import UserError


def raw(idx, title="A headline", date="2024-05-01", text="Body of the article.", **fields):
    record = {
        "url": f"https://news.example/{idx}",
        "hostname": "news.example",
        "title": title,
        "date": date,
        "crawl_date": "2024-05-02",
        "language": "en",
        "text": text,
        "article_idx": idx,
        **fields,
    }
    return json.dumps(record, ensure_ascii=False)


def write(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


ABSENT = object()  # a header field left out of the record


def rendered(tmp_path, keep_untitled=False, **headers):
    """The text format_news writes for one raw record with these title/date values (ABSENT leaves one out)."""
    fields = {"title": "T", "date": "2025-09-01", "text": "Body.", "article_idx": 0, **headers}
    source = write(tmp_path / "raw.jsonl", json.dumps({k: v for k, v in fields.items() if v is not ABSENT}))
    format_news(source, tmp_path / "out.jsonl", overwrite=True, keep_untitled=keep_untitled)
    return [r["text"] for r in read(tmp_path / "out.jsonl")]


def test_articles_follow_the_template_and_keep_article_idx(tmp_path):
    source = write(
        tmp_path / "raw.jsonl",
        raw(7, title="Zürich votes", text="Line one.\nLine two."),
        "",
        json.dumps({"title": "No index", "date": "2024-01-02", "text": "Body."}),
    )
    report = format_news(source, tmp_path / "out.jsonl")
    assert read(tmp_path / "out.jsonl") == [
        {
            "text": "Title: Zürich votes\nDate: May 01 (2024-05-01 00:00:00 UTC)\nArticle: Line one.\nLine two.\n",
            "article_idx": 7,
        },
        {"text": "Title: No index\nDate: Jan 02 (2024-01-02 00:00:00 UTC)\nArticle: Body.\n"},  # no index in, none out
    ]
    assert (report.articles, report.untitled, report.bad_lines, report.already_formatted) == (2, 0, 0, False)
    assert report.summary() == f"formatted 2 articles into {tmp_path / 'out.jsonl'}"


@pytest.mark.parametrize(
    "date,shown",
    [
        ("2025-09-01", "Sep 01 (2025-09-01 00:00:00 UTC)"),
        ("2024-03-05", "Mar 05 (2024-03-05 00:00:00 UTC)"),  # a single-digit day is zero-padded
        ("2023-12-31", "Dec 31 (2023-12-31 00:00:00 UTC)"),
        ("2025-09-01T12:34:56", "Sep 01 (2025-09-01 12:34:56 UTC)"),  # naive: taken as UTC
        ("2025-09-01 08:05", "Sep 01 (2025-09-01 08:05:00 UTC)"),
        ("2025-09-01T12:34:56Z", "Sep 01 (2025-09-01 12:34:56 UTC)"),
        ("2025-09-01T12:34:56.789Z", "Sep 01 (2025-09-01 12:34:56 UTC)"),  # fractions are not shown
        ("2025-09-01T01:30:00+02:00", "Aug 31 (2025-08-31 23:30:00 UTC)"),  # converted to UTC, across a month
        ("2024-12-31T22:15:00-05:00", "Jan 01 (2025-01-01 03:15:00 UTC)"),  # and across a year
        ("20250901", "Sep 01 (2025-09-01 00:00:00 UTC)"),  # other ISO 8601 forms Python 3.11 reads
        ("2025-W36-1", "Sep 01 (2025-09-01 00:00:00 UTC)"),
    ],
)
def test_an_iso_date_is_rendered_as_the_benchmark_does(tmp_path, date, shown):
    assert rendered(tmp_path, date=date) == [f"Title: T\nDate: {shown}\nArticle: Body.\n"]


@pytest.mark.parametrize(
    "date",
    [
        "September 1, 2025",
        "yesterday",
        "2025-9-1",
        "2025-13-01",
        "01/09/2025",
        "2025-09-01T25:00",
        "0001-01-01T00:00:00+01:00",
        "N/A",
    ],
)
def test_an_unparseable_date_is_kept_as_it_is(tmp_path, date):
    assert rendered(tmp_path, date=date) == [f"Title: T\nDate: {date}\nArticle: Body.\n"]


@pytest.mark.parametrize("date", [ABSENT, None, "", " \t\n "])
def test_a_missing_null_or_blank_date_is_shown_as_na(tmp_path, date):
    assert rendered(tmp_path, date=date) == ["Title: T\nDate: N/A\nArticle: Body.\n"]


@pytest.mark.parametrize(
    "title,date,shown_title,shown_date",
    [
        ("  Markets\trally\n\nagain  ", "2025-09-01", "Markets rally again", "Sep 01 (2025-09-01 00:00:00 UTC)"),
        ("Two  spaces\r\nand\t\ttabs", " 2025-09-01\t", "Two spaces and tabs", "Sep 01 (2025-09-01 00:00:00 UTC)"),
        ("T", "Sep\t 1,\n\n2025 ", "T", "Sep 1, 2025"),  # an unparseable date is kept, collapsed
    ],
)
def test_whitespace_in_title_and_date_is_collapsed(tmp_path, title, date, shown_title, shown_date):
    assert rendered(tmp_path, title=title, date=date) == [f"Title: {shown_title}\nDate: {shown_date}\nArticle: Body.\n"]


@pytest.mark.parametrize(
    "text,shown",
    [
        ("  Body.  ", "Body."),
        ("\n\n\tBody.\n\n", "Body."),
        (" \r\n Para one.\n\n  Para  two,\tindented. \n\n\n", "Para one.\n\n  Para  two,\tindented."),
        ("Body.\n", "Body."),  # the benchmark's own trailing newline is not doubled
    ],
)
def test_the_article_text_is_stripped_and_its_inner_text_kept(tmp_path, text, shown):
    assert rendered(tmp_path, text=text) == [f"Title: T\nDate: Sep 01 (2025-09-01 00:00:00 UTC)\nArticle: {shown}\n"]


def test_every_article_ends_with_exactly_one_newline(tmp_path):
    texts = ["Body.", "Body.\n", "Body.\n\n\n", "Line one.\nLine two.\n \n", " \t x \t", "\r\nCRLF.\r\n"]
    lines = [raw(i, text=text) for i, text in enumerate(texts)] + [raw(len(texts), title=None, text="Untitled.\n\n")]
    source = write(tmp_path / "raw.jsonl", *lines)
    for normalize in (False, True):
        output = tmp_path / f"out_{normalize}.jsonl"
        report = format_news(source, output, normalize=normalize, keep_untitled=True)
        articles = [r["text"] for r in read(output)]
        assert report.articles == len(articles) == len(texts) + 1
        assert all(a.endswith("\n") and not a.endswith("\n\n") and not a.endswith(" \n") for a in articles)
        assert all(a.count("\nArticle: ") + a.startswith("Article: ") == 1 for a in articles)
        assert output.read_text(encoding="utf-8").count("\n") == len(articles)  # one JSON line per article


def test_untitled_articles_are_dropped_and_counted(tmp_path):
    untitled = [{"title": None}, {"title": ""}, {"title": " \t\n "}, {}]  # the last has no title field
    lines = (
        [raw(0)]
        + [
            json.dumps({"text": "Body.", "date": "2025-09-01", "article_idx": i, **fields})
            for i, fields in enumerate(untitled, 1)
        ]
        + [raw(5)]
    )
    source = write(tmp_path / "raw.jsonl", *lines)
    report = format_news(source, tmp_path / "out.jsonl")
    assert [r["article_idx"] for r in read(tmp_path / "out.jsonl")] == [0, 5]
    assert (report.articles, report.untitled) == (2, 4)
    assert report.summary() == f"formatted 2 articles into {tmp_path / 'out.jsonl'}; dropped 4 untitled"


def test_keep_untitled_renders_them_without_a_title_line(tmp_path):
    assert rendered(tmp_path, keep_untitled=True, title=None, date="2025-09-01") == [
        "Date: Sep 01 (2025-09-01 00:00:00 UTC)\nArticle: Body.\n"
    ]
    assert rendered(tmp_path, keep_untitled=True, title=" \t ", date=ABSENT) == ["Date: N/A\nArticle: Body.\n"]
    assert rendered(tmp_path, keep_untitled=True, title="Kept\ttoo") == [
        "Title: Kept too\nDate: Sep 01 (2025-09-01 00:00:00 UTC)\nArticle: Body.\n"
    ]


def test_only_untitled_articles_is_a_user_error_that_names_the_flag(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0, title=None), raw(1, title=""))
    with pytest.raises(UserError, match=r"raw.jsonl: no articles to format \(2 untitled dropped; pass --keep-untitled"):
        format_news(source, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_formats_and_keeps_untitled_on_request(tmp_path, capsys):
    source = write(tmp_path / "raw.jsonl", raw(0, date=None), raw(1, title=None, date="2025-09-01T12:00:00+02:00"))
    output = tmp_path / "out.jsonl"
    cli.main(["format-news", "--input", str(source), "--output", str(output)])
    assert capsys.readouterr().out == f"formatted 1 articles into {output}; dropped 1 untitled\n"
    cli.main(["format-news", "--input", str(source), "--output", str(output), "--overwrite", "--keep-untitled"])
    assert capsys.readouterr().out == f"formatted 2 articles into {output}\n"
    assert [r["text"] for r in read(output)] == [
        "Title: A headline\nDate: N/A\nArticle: Body of the article.\n",
        "Date: Sep 01 (2025-09-01 10:00:00 UTC)\nArticle: Body of the article.\n",
    ]


def test_cli_reports_a_user_error_in_one_line(tmp_path, capsys):
    source = write(tmp_path / "raw.jsonl", raw(0, title=None))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["format-news", "--input", str(source), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cbe: error: ") and "1 untitled dropped; pass --keep-untitled" in err


@pytest.mark.parametrize("keep_untitled", [False, True])
def test_formatted_output_is_left_alone(tmp_path, keep_untitled):
    # With keep_untitled the first line is "Date: N/A\nArticle: ...", the form with the fewest headers.
    source = write(tmp_path / "raw.jsonl", raw(0, title=None, date=None), raw(1), raw(2, title=" ", date="x  y"))
    output = tmp_path / "out.jsonl"
    format_news(source, output, keep_untitled=keep_untitled)
    before = output.read_bytes()
    assert before.decode().startswith('{"text": "Date: N/A\\nArticle: ' if keep_untitled else '{"text": "Title: ')
    for target in (output, tmp_path / "again.jsonl"):  # in place, or into a new file
        report = format_news(output, target, overwrite=True, keep_untitled=keep_untitled)
        assert report.already_formatted and report.articles == 0
        assert report.summary() == f"{output} is already formatted; nothing written"
    assert output.read_bytes() == before and "Title: Title:" not in before.decode()
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "raw.jsonl"]


@pytest.mark.parametrize(
    "text",
    [
        "Title: T\nDate: 2024-05-01\nArticle: x\n",  # an older cbe kept ISO dates as they were
        "Title: T\nArticle: x\n",  # and left out a missing date's line
        "Article: x\n",
        "Title: Two  spaces\nDate: N/A\nArticle: x\n",  # and kept the title's whitespace
        "Title: T\nDate: N/A\nArticle: x",  # and ended an article without a newline
        "Date: N/A\nArticle: x",
    ],
)
def test_a_file_formatted_by_an_older_cbe_is_refused(tmp_path, text):
    source = write(tmp_path / "old.jsonl", json.dumps({"text": text, "article_idx": 0}))
    before = source.read_bytes()
    with pytest.raises(UserError, match=r"old.jsonl:1: formatted by an older cbe, not as the benchmark renders news"):
        format_news(source, source, overwrite=True)
    assert source.read_bytes() == before and os.listdir(tmp_path) == ["old.jsonl"]


def test_a_file_in_the_previous_format_is_refused_in_one_line(tmp_path, capsys):
    # The format before final newlines: the same file but for the "\n" that ends each article's text.
    source = write(tmp_path / "raw.jsonl", raw(0), raw(1, title=None), raw(2, date="2025-09-01T12:00:00Z"))
    current = tmp_path / "current.jsonl"
    format_news(source, current, keep_untitled=True)
    previous = [{**r, "text": r["text"].removesuffix("\n")} for r in read(current)]
    assert all(not r["text"].endswith("\n") for r in previous)
    old = write(tmp_path / "old.jsonl", *(json.dumps(r, ensure_ascii=False) for r in previous))
    before = old.read_bytes()
    with pytest.raises(UserError, match=r"old.jsonl:1: formatted by an older cbe, not as the benchmark renders news"):
        format_news(old, old, overwrite=True)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["format-news", "--input", str(old), "--output", str(old), "--overwrite"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cbe: error: ") and "old.jsonl:1: formatted by an older cbe" in err
    assert old.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["current.jsonl", "old.jsonl", "raw.jsonl"]
    # Only the final newline tells them apart: the current file is left alone.
    assert fn.rendered_as_benchmark(read(current)[0]["text"]) and not fn.rendered_as_benchmark(previous[0]["text"])
    assert format_news(current, current, overwrite=True).already_formatted


@pytest.mark.parametrize("keep_untitled", [False, True])
def test_formatting_a_formatted_file_twice_changes_nothing(tmp_path, keep_untitled):
    source = write(tmp_path / "raw.jsonl", raw(0, title=None, text="\n Untitled.\n"), raw(1, text="  Body.\n\n"))
    format_news(source, source, overwrite=True, keep_untitled=keep_untitled)
    before = source.read_bytes()
    assert all(r["text"].endswith(".\n") for r in read(source))
    for _ in range(2):
        report = format_news(source, source, overwrite=True, keep_untitled=keep_untitled)
        assert report.already_formatted and report.articles == 0
        assert source.read_bytes() == before and os.listdir(tmp_path) == ["raw.jsonl"]


def test_a_formatted_line_in_a_raw_file_is_refused(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0), json.dumps({"text": "Title: T\nArticle: x", "article_idx": 1}))
    with pytest.raises(UserError, match=r"raw.jsonl:2: already formatted while earlier lines are raw"):
        format_news(source, tmp_path / "out.jsonl")


def test_in_place_rewrite_replaces_the_file(tmp_path):
    source = write(tmp_path / "raw.jsonl", raw(0), raw(1))
    report = format_news(source, source, overwrite=True)
    assert report.articles == 2 and read(source)[1]["text"].startswith("Title: A headline\nDate: May 01 ")
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


@pytest.mark.parametrize(
    "dirty,clean",
    [
        ("Cafe\u0301 de\u0301ja\u0300", "Café déjà"),  # NFD -> NFC
        (
            "Tom &amp; Jerry &quot;live&quot; &#39;today&#39;&nbsp;now &#x263A; &amp;amp;",
            "Tom & Jerry \"live\" 'today' now ☺ &",
        ),  # double-escaped entities are decoded all the way
        ("AT&T and R&D; Barnes&notice &bogus;", "AT&T and R&D; Barnes&notice &bogus;"),  # not entities: kept
        ("bell\x07 null\x00 esc\x1b c1\x85 del\x7f", "bell null esc c1 del"),
        ("one\r\ntwo\rthree", "one\ntwo\nthree"),
        ("  a \t\t b   c  \n d \t\n", "a b c\n d"),
        ("p1\n\n\n\n\np2\n \n\t\n \np3\n\np4", "p1\n\np2\n\np3\n\np4"),
    ],
)
def test_normalize_cleans_scraped_text(dirty, clean):
    assert normalize_text(dirty) == clean
    assert normalize_text(clean) == clean


@pytest.mark.parametrize(
    "text",
    [
        "&am\x00p;lt;",
        "&amp\u037e",
        "&#38;#38;#38;",
        "x &#13;&#10;&#10;&#10; y &#9;\t z",
        " \u00a0\n\r\n\r\n e\u0301 ",
        "&amp;nbsp; &#x0;",
        "\u212b &#x37e;",
    ],
)
def test_normalize_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once and unicodedata.is_normalized("NFC", once)


def test_normalize_applies_to_title_date_and_text(tmp_path):
    source = write(
        tmp_path / "raw.jsonl", raw(0, title=" Ta&amp;lk\t\tshow ", date="&nbsp;", text="Hi&nbsp;there\r\n\r\n\r\nbye ")
    )
    format_news(source, tmp_path / "out.jsonl", normalize=True)
    assert read(tmp_path / "out.jsonl")[0]["text"] == "Title: Ta&lk show\nDate: N/A\nArticle: Hi there\n\nbye\n"
    with pytest.raises(UserError, match=r"raw.jsonl:1: field 'text' is empty once normalized"):
        format_news(write(source, raw(0, text="&nbsp;\x00")), tmp_path / "out.jsonl", overwrite=True, normalize=True)


def test_normalize_leaves_clean_data_unchanged(tmp_path):
    source = write(
        tmp_path / "raw.jsonl",
        raw(0, title="Café & co", text="Première ligne.\n\nSecond paragraph — 東京."),
        raw(1, title=None, date="", text='AT&T\'s "quarter" results;\nnext line'),
    )
    format_news(source, tmp_path / "plain.jsonl", keep_untitled=True)
    format_news(source, tmp_path / "normalized.jsonl", normalize=True, keep_untitled=True)
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


@pytest.mark.parametrize(
    "bad,message",
    [
        (b"{not json", r"raw.jsonl:2: malformed JSON"),
        (b'{"title": "t", "date": "d"}', r"raw.jsonl:2: missing field 'text' \(has date, title\)"),
        (b'{"text": ["a"]}', r"raw.jsonl:2: field 'text' should be str, got list"),
        (b'{"text": " "}', r"raw.jsonl:2: field 'text' is empty"),
        (b'{"text": "x", "date": 20240501}', r"raw.jsonl:2: field 'date' should be str or null, got int"),
        (b'{"text": "caf\xe9"}', r"raw.jsonl:2: not valid UTF-8"),
    ],
)
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
