"""Turn the raw news corpus into training text: one `{"text", "article_idx"}` line per article.

Input records are `{url, hostname, title, date, crawl_date, language, text, article_idx}`; `text` is
required and non-empty, `title` and `date` may be missing, null or empty. Each becomes

    {"text": "Title: <title>\\nDate: <date>\\nArticle: <text>", "article_idx": <article_idx>}

with `article_idx` kept as is (the key is left out only when the input lacks it). A missing, null or blank
title or date drops its whole line (see MISSING_HEADER): "Date: 2024-05-01\\nArticle: ..." for an untitled
article, so the model never trains on placeholder text such as "Title: None" or "Title: (untitled)".

The file is streamed line by line (constant memory) into a temp file next to the output that replaces it
only when every line went through (cbe.run.open_atomic), so formatting in place is safe: on a bad line,
an exception or Ctrl-C the input stays byte for byte as it was. Input whose first record is already
formatted (no url/title/date fields, text laid out as above) is left alone and nothing is written, so
running the step twice never produces "Title: Title: ...".

normalize=True also cleans the scraped title, date and text (normalize_text); it is idempotent and leaves
clean text exactly as it is.
"""
from __future__ import annotations

import html
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from tqdm.auto import tqdm

from cbe.data.jsonl import parse_record
from cbe.errors import UserError
from cbe.run import open_atomic

# The header lines, in order, and the field each one shows.
HEADERS = {"title": "Title", "date": "Date"}
# What a missing, null or blank title/date renders as: None drops its line entirely (a placeholder string
# here, e.g. "(untitled)", would be rendered instead).
MISSING_HEADER: str | None = None
# Fields only a raw record has: a record without any of them whose text follows the template is formatted.
RAW_ONLY_FIELDS = ("url", "title", "date")
SHOWN_BAD_LINES = 5  # how many bad line numbers the report keeps
_to_json = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(ensure_ascii=False) builds one per call


@dataclass
class FormatReport:
    """What format_news did, for the one line the CLI prints."""

    input_path: Path
    output_path: Path
    articles: int = 0  # articles written
    bad_lines: int = 0  # malformed lines skipped (skip_bad=True)
    first_bad_lines: list[int] = field(default_factory=list)  # the first few of their line numbers
    first_error: str = ""  # why the first of them was bad
    already_formatted: bool = False  # the input was left alone and nothing was written

    def summary(self) -> str:
        if self.already_formatted:
            return f"{self.input_path} is already formatted; nothing written"
        text = f"formatted {self.articles} articles into {self.output_path}"
        if self.bad_lines:
            more = ", ..." if self.bad_lines > len(self.first_bad_lines) else ""
            lines = ", ".join(map(str, self.first_bad_lines)) + more
            text += f"; skipped {self.bad_lines} bad lines ({lines}; first: {self.first_error})"
        return text


def format_news(input_path: str | Path, output_path: str | Path, overwrite: bool = False,
                normalize: bool = False, skip_bad: bool = False) -> FormatReport:
    """Format the raw news corpus at `input_path` into `output_path` (which may be the same file).

    Raises UserError, naming file:line, on a malformed line unless `skip_bad`, which skips and counts it;
    refuses to replace an existing output unless `overwrite`.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise UserError(f"{input_path}: no such file")
    if output_path.is_dir():
        raise UserError(f"{output_path} is a folder; name the output file")
    if output_path.exists() and not overwrite:
        raise UserError(f"{output_path} exists; pass --overwrite to replace it")
    report = FormatReport(input_path, output_path)
    with input_path.open("rb") as lines:
        articles = _articles(lines, input_path, normalize, skip_bad, report)
        # Read ahead one article before opening the output: formatted or empty input must not touch it.
        first = next(articles, None)
        if report.already_formatted:
            return report
        if first is None:
            skipped = f" ({report.bad_lines} bad lines skipped; first: {report.first_error})"
            raise UserError(f"{input_path}: no articles to format" + (skipped if report.bad_lines else ""))
        with open_atomic(output_path, "w", encoding="utf-8", buffering=1 << 20) as out, \
                tqdm(desc=f"formatting {input_path.name}", unit="article", disable=None) as bar:
            for article in itertools.chain([first], articles):
                out.write(_to_json(article) + "\n")
                report.articles += 1
                bar.update()
    return report


def _articles(lines: BinaryIO, path: Path, normalize: bool, skip_bad: bool,
              report: FormatReport) -> Iterator[dict[str, Any]]:
    """The formatted articles of an open raw corpus, line by line. Stops at once, setting
    report.already_formatted, when the first record is formatted; a bad line raises or, with skip_bad,
    is counted in the report and skipped."""
    first = True
    for line_number, line in enumerate(lines, 1):
        if line.isspace():
            continue
        where = f"{path}:{line_number}"
        try:
            record = parse(line, where)
            if looks_formatted(record):
                if first:
                    report.already_formatted = True
                    return
                # Formatting it again would bury a header inside the article text.
                raise UserError(f"{where}: already formatted while earlier lines are raw; the file mixes both")
            first = False
            article = render(record, normalize, where)
        except UserError as e:
            if not skip_bad:
                raise
            report.bad_lines += 1
            if len(report.first_bad_lines) < SHOWN_BAD_LINES:
                report.first_bad_lines.append(line_number)
            report.first_error = report.first_error or str(e)
            continue
        yield article


def parse(line: bytes, where: str) -> dict[str, Any]:
    """One raw line as a record with a non-empty str `text` and a str or null title/date; UserError if not."""
    try:
        decoded = line.decode("utf-8").removeprefix("\ufeff")  # a BOM some editors put at the start
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not valid UTF-8 (byte {e.start}); fix or remove the line") from None
    record = parse_record(decoded, where, {"text": (str,)})
    for name in HEADERS:  # parse_record checks only required fields, and these may be missing or null
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} should be str or null, got {type(value).__name__} {value!r:.40}")
    return record


def looks_formatted(record: dict[str, Any]) -> bool:
    """A record this module wrote: none of the raw-only fields, and text laid out as the template."""
    text = record["text"]
    return (not any(name in record for name in RAW_ONLY_FIELDS)
            and text.startswith(("Title: ", "Date: ", "Article: "))
            and (text.startswith("Article: ") or "\nArticle: " in text))


def render(record: dict[str, Any], normalize: bool, where: str) -> dict[str, Any]:
    """The output line of one raw record."""
    clean = normalize_text if normalize else str  # str() of a str is the str itself
    lines = []
    for name, label in HEADERS.items():
        value = clean(record.get(name) or "")
        if value.strip():
            lines.append(f"{label}: {value}")
        elif MISSING_HEADER is not None:
            lines.append(f"{label}: {MISSING_HEADER}")
    text = clean(record["text"])
    if not text.strip():
        raise UserError(f"{where}: field 'text' is empty once normalized")
    lines.append(f"Article: {text}")
    article = {"text": "\n".join(lines)}
    if "article_idx" in record:
        article["article_idx"] = record["article_idx"]
    return article


# Only ";"-terminated references: html.unescape alone also decodes legacy names without one
# ("Barnes&notice" would become "Barnes¬ice").
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but \t and \n
_SPACE_RUNS = re.compile(r"  +")  # (patterns that start with a literal are the fast ones)
_BLANK_LINES = re.compile(r"\n\n\n+")


def _clean_once(text: str) -> str:
    text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    # Tabs and no-break spaces (&nbsp;) are plain spaces to a reader.
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ").replace("\xa0", " ")
    text = _CONTROL.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = _SPACE_RUNS.sub(" ", text).replace(" \n", "\n")  # one space left per run, so this strips line ends
    return _BLANK_LINES.sub("\n\n", text).strip()


def normalize_text(text: str) -> str:
    """Clean scraped text: HTML entities decoded, Unicode NFC, control characters removed, CRLF/CR as LF,
    runs of spaces/tabs as one space, no spaces at line ends, at most one blank line in a row, no
    leading/trailing whitespace. Clean text comes back unchanged, and normalizing twice changes nothing."""
    while True:
        cleaned = _clean_once(text)
        # A pass can leave only an entity to clean: decoding "&amp;amp;" gives "&amp;", and removing a control
        # char or NFC can complete one. So repeat while an "&" is left; it ends, as each pass that changes
        # anything then decodes an entity, which shortens the text.
        if cleaned == text or "&" not in cleaned:
            return cleaned
        text = cleaned
