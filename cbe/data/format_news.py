"""Turn the raw news corpus into training text: one `{"text", "article_idx"}` line per article, rendered exactly as
the benchmark renders it, so a model trained through cbe sees the benchmark's text.

Input records are `{url, hostname, title, date, crawl_date, language, text, article_idx}`; `text` is required and
non-empty, `title` and `date` may be missing, null or empty. Each becomes

    {"text": "Title: <title>\\nDate: <date>\\nArticle: <text>\\n", "article_idx": <article_idx>}

with `article_idx` kept as is (the key is left out only when the input lacks it). As the benchmark does:
- the article's text is stripped of leading and trailing whitespace, and every article ends with a newline;
- runs of whitespace in the title and date (spaces, tabs, newlines) become one space, and both are stripped;
- an untitled article (title missing, null or blank) is dropped and counted in the report; with keep_untitled it is
  kept without a Title line ("Date: ...\\nArticle: ..."), never as "Title: None";
- an ISO date (what datetime.fromisoformat accepts: `2025-09-01`, `20250901`, `2025-W36-1`, a time after `T` or a
  space, with `Z` or an offset such as `+02:00`) is shown in UTC, a naive time taken as UTC, as
  `Sep 01 (2025-09-01 00:00:00 UTC)` (no fractions of a second). Any other date is kept as it is (whitespace
  collapsed), and a missing, null or blank one becomes `N/A`.

The file is streamed line by line (constant memory) into a temp file next to the output that replaces it only when
every line went through (cbe.run.open_atomic), so formatting in place is safe: on a bad line, an exception or Ctrl-C
the input stays byte for byte as it was. Input whose first record is already formatted (no url/title/date fields,
text laid out as above) is left alone and nothing is written, so running the step twice never produces
"Title: Title: ..."; a file formatted by an older cbe, whose headers are not rendered as above, is refused, so it is
not silently trained on. normalize=True first cleans the scraped title, date and text (normalize_text).
"""

from __future__ import annotations

import html
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from tqdm.auto import tqdm

from cbe.data.jsonl import CORPUS_FIELDS, parse_record
from cbe.errors import UserError
from cbe.run import open_atomic

DATE_FORMAT = "%b %d (%Y-%m-%d %H:%M:%S UTC)"  # %b is English: Python leaves LC_TIME at "C" unless told
MISSING_DATE = "N/A"
RAW_ONLY_FIELDS = ("url", "title", "date")
SHOWN_BAD_LINES = 5  # how many bad line numbers the report keeps
_to_json = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(ensure_ascii=False) builds one per call


@dataclass
class FormatReport:
    """What format_news did, for the one line the CLI prints."""

    input_path: Path
    output_path: Path
    articles: int = 0  # articles written
    untitled: int = 0  # untitled articles dropped (keep_untitled=False)
    bad_lines: int = 0  # malformed lines skipped (skip_bad=True)
    first_bad_lines: list[int] = field(default_factory=list)  # the first few of their line numbers
    first_error: str = ""  # why the first of them was bad
    already_formatted: bool = False  # the input was left alone and nothing was written

    def summary(self) -> str:
        if self.already_formatted:
            return f"{self.input_path} is already formatted; nothing written"
        text = f"formatted {self.articles} articles into {self.output_path}"
        if self.untitled:
            text += f"; dropped {self.untitled} untitled"
        if self.bad_lines:
            more = ", ..." if self.bad_lines > len(self.first_bad_lines) else ""
            lines = ", ".join(map(str, self.first_bad_lines)) + more
            text += f"; skipped {self.bad_lines} bad lines ({lines}; first: {self.first_error})"
        return text


def format_news(
    input_path: str | Path,
    output_path: str | Path,
    overwrite: bool = False,
    normalize: bool = False,
    skip_bad: bool = False,
    keep_untitled: bool = False,
) -> FormatReport:
    """Format the raw news corpus at `input_path` into `output_path` (which may be the same file). A malformed line
    raises UserError (file:line) unless `skip_bad` skips and counts it; an existing output needs `overwrite`."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise UserError(f"{input_path}: no such file")
    if output_path.is_dir():
        raise UserError(f"{output_path} is a folder; name the output file")
    if output_path.exists() and not overwrite:
        raise UserError(f"{output_path} exists; pass --overwrite to replace it")
    report = FormatReport(input_path, output_path)
    with input_path.open("rb") as lines:
        articles = _articles(lines, input_path, normalize, skip_bad, keep_untitled, report)
        # Read ahead one article before opening the output: formatted or empty input must not touch it.
        first = next(articles, None)
        if report.already_formatted:
            return report
        if first is None:
            why = [f"{report.untitled} untitled dropped; pass --keep-untitled to keep them"] if report.untitled else []
            why += [f"{report.bad_lines} bad lines skipped; first: {report.first_error}"] if report.bad_lines else []
            raise UserError(f"{input_path}: no articles to format" + (f" ({'; '.join(why)})" if why else ""))
        with (
            open_atomic(output_path, "w", encoding="utf-8", buffering=1 << 20) as out,
            tqdm(desc=f"formatting {input_path.name}", unit="article", disable=None) as bar,
        ):
            for article in itertools.chain([first], articles):
                out.write(_to_json(article) + "\n")
                report.articles += 1
                bar.update()
    return report


def _articles(
    lines: BinaryIO, path: Path, normalize: bool, skip_bad: bool, keep_untitled: bool, report: FormatReport
) -> Iterator[dict[str, Any]]:
    """The formatted articles of an open raw corpus; stops at once, setting report.already_formatted, if the first
    record is formatted. A bad line raises or, with skip_bad, is skipped; both it and untitled ones are counted."""
    first = True
    for line_number, line in enumerate(lines, 1):
        if line.isspace():
            continue
        where = f"{path}:{line_number}"
        try:
            record = parse(line, where)
            if looks_formatted(record):
                if not first:  # formatting it again would bury a header inside the article text
                    raise UserError(f"{where}: already formatted while earlier lines are raw; the file mixes both")
                if not rendered_as_benchmark(record["text"]):
                    raise UserError(
                        f"{where}: formatted by an older cbe, not as the benchmark renders news "
                        "(dates as 'Sep 01 (2025-09-01 00:00:00 UTC)' or 'N/A'); format the raw "
                        "file again (make download TRACK=news, then make format TRACK=news)"
                    )
                report.already_formatted = True
                return
            first = False
            article = render(record, normalize, where, keep_untitled)
        except UserError as e:
            if not skip_bad:
                raise
            report.bad_lines += 1
            if len(report.first_bad_lines) < SHOWN_BAD_LINES:
                report.first_bad_lines.append(line_number)
            report.first_error = report.first_error or str(e)
            continue
        if article is None:
            report.untitled += 1
            continue
        yield article


def parse(line: bytes, where: str) -> dict[str, Any]:
    """One raw line as a record with a non-empty str `text` and a str or null title/date; UserError if not."""
    record = parse_record(line, where, CORPUS_FIELDS)
    for name in ("title", "date"):  # parse_record checks only required fields, and these may be missing or null
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} should be str or null, got {type(value).__name__} {value!r:.40}")
    return record


def looks_formatted(record: dict[str, Any]) -> bool:
    """A record this module wrote: none of the raw-only fields, and text laid out as the template."""
    text = record["text"]
    return (
        not any(name in record for name in RAW_ONLY_FIELDS)
        and text.startswith(("Title: ", "Date: ", "Article: "))
        and (text.startswith("Article: ") or "\nArticle: " in text)
    )


def rendered_as_benchmark(text: str) -> bool:
    """Whether formatted text has the headers render writes: a collapsed title, if any, a Date line that render_date
    leaves as it is, and a final newline (an older cbe's has no Date line, a date such as 2024-05-01, or no newline)."""
    head = text.split("\n", 2)
    if head[0].startswith("Title: "):
        title = head.pop(0).removeprefix("Title: ")
        if not title or title != collapse_whitespace(title):
            return False
    date = head[0].removeprefix("Date: ")
    return (
        head[0].startswith("Date: ")
        and len(head) > 1
        and head[1].startswith("Article: ")
        and render_date(date) == date
        and text.endswith("\n")
    )


def render(record: dict[str, Any], normalize: bool, where: str, keep_untitled: bool = False) -> dict[str, Any] | None:
    """The output line of one raw record; None for an untitled one, which is dropped unless keep_untitled."""
    clean = normalize_text if normalize else str  # str() of a str is the str itself
    text = clean(record["text"]).strip()
    if not text:
        raise UserError(f"{where}: field 'text' is empty once normalized")
    title = collapse_whitespace(clean(record.get("title") or ""))
    if not title and not keep_untitled:
        return None
    lines = [f"Title: {title}"] if title else []  # a kept untitled article has no Title line
    lines += [f"Date: {render_date(clean(record.get('date') or ''))}", f"Article: {text}"]
    article = {"text": "\n".join(lines) + "\n"}
    if "article_idx" in record:
        article["article_idx"] = record["article_idx"]
    return article


def render_date(date: str) -> str:
    """A date as the benchmark shows it (see the module docstring); rendering a rendered date changes nothing."""
    moment = parse_moment(date)
    return moment.strftime(DATE_FORMAT) if moment else collapse_whitespace(date) or MISSING_DATE


def parse_moment(value: Any) -> datetime | None:
    """An ISO date or time in UTC, whitespace collapsed; None if not a str or not ISO."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(collapse_whitespace(value))
        # A naive time is taken as UTC; an aware one is converted (which can overflow at year 1 or 9999).
        return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None


def collapse_whitespace(text: str) -> str:
    """Runs of whitespace (spaces, tabs, newlines, other Unicode spaces) as one space, stripped."""
    return " ".join(text.split())


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
    """Clean scraped text: entities decoded, NFC, controls removed, LF line ends, runs of spaces as one, at most one
    blank line in a row, stripped. Clean text comes back unchanged, and normalizing twice changes nothing."""
    while True:
        cleaned = _clean_once(text)
        # A pass can leave only an entity to clean: decoding "&amp;amp;" gives "&amp;", and removing a control
        # char or NFC can complete one. So repeat while an "&" is left; it ends, as each pass that changes
        # anything then decodes an entity, which shortens the text.
        if cleaned == text or "&" not in cleaned:
            return cleaned
        text = cleaned
