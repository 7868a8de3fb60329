"""Cut a downloaded track into stages for continual learning (`cbe make-stages`), on the raw download.

News is cut by time. An article's time is its `date`, or its `crawl_date` where the date is missing, unparseable or
outside the month being cut (the track is what was crawled in September 2025, so an old article entered it when it was
crawled), both read by format_news.parse_moment (ISO, in UTC); a time still outside the month counts as its first or
last day. Weeks are days 1-7, 8-14, 15-21 and 22 to the month's end (w1..w4); `--by month` makes one stage, m1. Train
and val articles each go to their own time's stage; one with neither date nor crawl date is dropped and counted.

Geminon has no dates: its creatures (the QA records' geminon_idx) are sorted and cut into N contiguous groups of
near-equal size, s1..sN, and each article goes to the earliest stage whose questions cite it (`supports`). An article
no question cites holds no tested fact, so it only sets a stage's size: the uncited articles of a file are dealt out
in turn (the k-th to stage k mod N + 1), keeping stages alike.

A question belongs to the stage of its earliest supporting article in train (Geminon: its creature's stage, so the
stages' questions are disjoint groups of creatures). A question with no supporting article in train, none at all or
only in val, is dropped and counted.

Writes data/<task>/<stage>/<file>.jsonl, the source lines as they were (News train and val then formatted as
`cbe format-news` does, ready to train on), data/<task>/manifest.json (stages, their days or creatures, counts,
dropped questions) and conf/task/<task>.yaml, the track's task with data.stages; <task> is news_weekly, news_monthly
or geminon_<N>stages. The folder is replaced as a whole, and only when every stage has train and val articles and
valqa and testqa questions. Reruns write the same bytes.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from cbe.data.download import CORPUS_NAMES, load_recipe
from cbe.data.format_news import format_news, looks_formatted, parse_moment
from cbe.data.format_news import parse as parse_article
from cbe.data.jsonl import QA_FIELDS, parse_record
from cbe.errors import UserError
from cbe.run import atomic_dir, write_atomic

TASK_DIR = Path(__file__).resolve().parents[2] / "conf" / "task"
NEWS_MONTH = "2025-09"  # when the News track was crawled ("News (2025_09)" on its card)
WEEK_STARTS = (1, 8, 15, 22)  # weeks are days 1-7, 8-14, 15-21 and 22 to the month's end
REQUIRED = ("train", "val", "valqa", "testqa")  # the files data.stages names per stage; none may be empty
MANIFEST = "manifest.json"

Place = Callable[[dict[str, Any]], "int | None"]  # a record's stage index, None to drop it
_parse_qa = functools.partial(parse_record, required=QA_FIELDS)


@dataclass
class Cut:
    """What make_stages wrote, for the one line the CLI prints."""

    manifest: dict[str, Any]
    folder: Path
    task_config: Path

    def summary(self) -> str:
        stages = ", ".join(
            f"{s['name']} {s['train']}/{s['val']} articles {s['valqa']}/{s['testqa']} questions"
            for s in self.manifest["stages"]
        )
        dropped = self.manifest["dropped_questions"]
        counts = ", ".join(f"{name} {n}" for name, n in dropped.items())
        return (
            f"{self.manifest['task']}: {stages} (train/val, valqa/testqa); dropped {sum(dropped.values())} "
            f"questions with no supporting article in train ({counts}); wrote {self.folder / MANIFEST} "
            f"and {self.task_config}"
        )


def make_stages(
    track: str,
    data_dir: str | Path = "data",
    by: str | None = None,
    stages: int | None = None,
    month: str | None = None,
    task_dir: str | Path = TASK_DIR,
) -> Cut:
    """Cut data/<track>/ into stages: News `by` week or month, Geminon into `stages` groups of creatures."""
    task, options = _task_name(track, by, stages, month)
    source = Path(data_dir) / track
    qa_names = list(load_recipe()[track]["qa"]["small"])  # every size has the same QA sets
    for name in (*CORPUS_NAMES, *qa_names):
        if not (source / f"{name}.jsonl").is_file():
            raise UserError(
                f"{source / name}.jsonl: no such file; download the track first: make download TRACK={track}"
            )
    questions = [q for name in qa_names for q in scan_questions(source / f"{name}.jsonl", track)]
    cited = {s for supports, _ in questions for s in supports}
    if track == "news":
        stage_list = month_stages(options["month"], options["by"])
        placer = functools.partial(news_placer, stage_list)
        creature_stage: dict[int, int] = {}
    else:
        stage_list, creature_stage = creature_stages(questions, stages, source)
        article_stage: dict[int, int] = {}  # each cited article's earliest stage
        for supports, creature in questions:
            for s in supports:
                article_stage[s] = min(article_stage.get(s, len(stage_list)), creature_stage[creature])
        placer = functools.partial(geminon_placer, article_stage, len(stage_list))
    folder = Path(data_dir) / task
    manifest = {"track": track, "task": task, "source": source.as_posix(), **options, "stages": stage_list}
    with atomic_dir(folder) as tmp:
        cut_files(source, tmp, track, qa_names, placer, cited, creature_stage, manifest)
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    task_config = Path(task_dir) / f"{task}.yaml"
    write_atomic(task_config, task_config_text(manifest, folder))
    return Cut(manifest, folder, task_config)


def _task_name(track: str, by: str | None, stages: int | None, month: str | None) -> tuple[str, dict[str, Any]]:
    """The staged task's name and the options that made it; UserError for options the track does not take."""
    if track == "news":
        if stages is not None:
            raise UserError("--stages cuts geminon; news is cut by date: pass --by week or --by month")
        by = by or "week"
        if by not in ("week", "month"):
            raise UserError(f"--by should be week or month, got {by!r}")
        return f"news_{by}ly", {"by": by, "month": month or NEWS_MONTH}
    if track != "geminon":
        raise UserError(f"make-stages cuts news or geminon, not {track!r}")
    if by is not None or month is not None:
        raise UserError("geminon has no dates: cut it into groups of creatures with --stages N, not --by or --month")
    if stages is None or stages < 1:
        raise UserError(f"geminon needs --stages N, the number of groups of creatures (1 or more), got {stages}")
    return f"geminon_{stages}stages", {"stages": stages}


def month_stages(month: str, by: str) -> list[dict[str, Any]]:
    """The stages of one month: its weeks w1..w4 or the whole month m1, each with its first and last day."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", month)
    if not match or not 1 <= int(match[2]) <= 12:
        raise UserError(f"--month should be YYYY-MM, e.g. {NEWS_MONTH}; got {month!r}")
    year, number = int(match[1]), int(match[2])
    starts = WEEK_STARTS if by == "week" else (1,)
    ends = [start - 1 for start in starts[1:]] + [calendar.monthrange(year, number)[1]]
    return [
        {
            "name": f"{by[0]}{i}",
            "first_day": date(year, number, a).isoformat(),
            "last_day": date(year, number, b).isoformat(),
        }
        for i, (a, b) in enumerate(zip(starts, ends), 1)
    ]


def news_placer(stage_list: list[dict[str, Any]], counts: Counter) -> Place:
    """Place a news article by its time (see the module's docstring), counting the fallbacks in `counts`."""
    last_days = [date.fromisoformat(s["last_day"]) for s in stage_list]
    first, last = date.fromisoformat(stage_list[0]["first_day"]), last_days[-1]
    counts.update(dict.fromkeys(("undated", "by_crawl_date", "outside_month"), 0))  # every key, also at 0

    def place(article: dict[str, Any]) -> int | None:
        published, crawled = parse_moment(article.get("date")), parse_moment(article.get("crawl_date"))
        moment = published if published and first <= published.date() <= last else crawled or published
        if moment is None:
            counts["undated"] += 1
            return None
        counts["by_crawl_date"] += moment is crawled
        if not first <= moment.date() <= last:
            counts["outside_month"] += 1
        day = min(max(moment.date(), first), last)
        return next(i for i, end in enumerate(last_days) if day <= end)

    return place


def creature_stages(
    questions: list[tuple[list[int], int | None]], n: int, source: Path
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The stages s1..sN of sorted creatures in contiguous groups of near-equal size, and each creature's."""
    creatures = sorted({creature for _, creature in questions})
    if n > len(creatures):
        raise UserError(f"--stages {n}, but the QA sets in {source} name only {len(creatures)} creatures (geminon_idx)")
    size, extra = divmod(len(creatures), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]  # the first `extra` groups are one larger
    groups = [creatures[a:b] for a, b in zip(bounds, bounds[1:])]
    stage_list = [
        {"name": f"s{i}", "creatures": len(group), "first_geminon_idx": group[0], "last_geminon_idx": group[-1]}
        for i, group in enumerate(groups, 1)
    ]
    return stage_list, {creature: i for i, group in enumerate(groups) for creature in group}


def geminon_placer(article_stage: dict[int, int], n: int, counts: Counter) -> Place:
    """Place a geminon article at its citing creatures' earliest stage; deal uncited ones out in turn."""
    turn = itertools.count()
    counts.update(uncited=0)

    def place(article: dict[str, Any]) -> int:
        if article.get("article_idx") in article_stage:
            return article_stage[article["article_idx"]]
        counts["uncited"] += 1
        return next(turn) % n

    return place


def cut_files(
    source: Path,
    folder: Path,
    track: str,
    qa_names: list[str],
    placer: Callable[[Counter], Place],
    cited: set[int],
    creature_stage: dict[int, int],
    manifest: dict[str, Any],
) -> None:
    """Write every stage's files into `folder` and their counts into `manifest`."""
    stage_list = manifest["stages"]
    for stage in stage_list:
        (folder / stage["name"]).mkdir()
    in_train: dict[int, int] = {}  # each cited train article's stage
    parse = functools.partial(_parse_article, news=track == "news")
    manifest["articles"] = {}
    for split in CORPUS_NAMES:
        counts: Counter = Counter()
        place = placer(counts)
        if split == "train":
            place = _noting(place, cited, in_train)
        split_file(source / f"{split}.jsonl", folder, stage_list, parse, place)  # its drops are in counts
        manifest["articles"][split] = dict(sorted(counts.items()))
    question_stage = functools.partial(_question_stage, in_train, creature_stage)
    manifest["dropped_questions"] = {
        name: split_file(source / f"{name}.jsonl", folder, stage_list, _parse_qa, question_stage) for name in qa_names
    }
    _refuse_empty_stages(manifest)
    if track == "news":  # ready to train on, as `cbe format-news` renders the benchmark's text
        for stage, split in itertools.product(stage_list, CORPUS_NAMES):
            path = folder / stage["name"] / f"{split}.jsonl"
            report = format_news(path, path, overwrite=True)
            stage[split], stage[f"{split}_untitled_dropped"] = report.articles, report.untitled


def _noting(place: Place, cited: set[int], in_train: dict[int, int]) -> Place:
    """`place`, also noting in `in_train` the earliest stage of each cited article it places."""

    def noted(article: dict[str, Any]) -> int | None:
        stage, idx = place(article), article.get("article_idx")
        if stage is not None and idx in cited:
            in_train[idx] = min(in_train.get(idx, stage), stage)
        return stage

    return noted


def _question_stage(in_train: dict[int, int], creature_stage: dict[int, int], question: dict[str, Any]) -> int | None:
    """A question's stage: its creature's (geminon), else its earliest supporting train article's; None if none."""
    stages = [in_train[s] for s in question.get("supports", []) if s in in_train]
    return creature_stage.get(question.get("geminon_idx"), min(stages)) if stages else None


def _refuse_empty_stages(manifest: dict[str, Any]) -> None:
    """UserError for a stage without one of the files a staged run reads, saying how to cut it otherwise."""
    if manifest["track"] == "geminon":
        fix = "use fewer --stages"
    elif manifest["by"] == "week":
        fix = "cut by month (--by month)"
    else:
        fix = f"check that the track covers {manifest['month']} (--month)"
    for stage in manifest["stages"]:
        for name in REQUIRED:
            if not stage[name]:
                raise UserError(
                    f"stage {stage['name']} ({describe(stage)}) gets nothing from {manifest['source']}/{name}.jsonl; "
                    f"every stage needs train and val articles and valqa and testqa questions: {fix}"
                )


def describe(stage: dict[str, Any]) -> str:
    """What a stage holds, in words: its days or its creatures."""
    if "first_day" in stage:
        return f"{stage['first_day']} to {stage['last_day']}"
    return f"geminon_idx {stage['first_geminon_idx']} to {stage['last_geminon_idx']}, {stage['creatures']} creatures"


def split_file(path: Path, folder: Path, stage_list: list[dict[str, Any]], parse: Callable, place: Place) -> int:
    """Copy each line of `path` as it is to folder/<stage>/<file> of the stage `place` gives it (None: drop it),
    counting each stage's lines in stage[<file's stem>]; return how many were dropped."""
    counts, dropped = [0] * len(stage_list), 0
    with contextlib.ExitStack() as files:
        outs = [files.enter_context((folder / stage["name"] / path.name).open("wb")) for stage in stage_list]
        for _, line, record in _lines(path, parse):
            stage = place(record)
            if stage is None:
                dropped += 1
                continue
            outs[stage].write(line)
            counts[stage] += 1
    for stage, n in zip(stage_list, counts):
        stage[path.stem] = n
    return dropped


def scan_questions(path: Path, track: str) -> list[tuple[list[int], int | None]]:
    """Each question's supporting article ids and (geminon) creature, checked, in file order."""
    questions = []
    for where, _, record in _lines(path, _parse_qa):
        supports = record.get("supports", [])
        if not isinstance(supports, list) or not all(_is_int(s) for s in supports):
            raise UserError(f"{where}: field 'supports' should be a list of article_idx, got {supports!r:.40}")
        creature = record.get("geminon_idx")
        if track == "geminon" and not _is_int(creature):
            raise UserError(f"{where}: field 'geminon_idx' should be an int naming the creature, got {creature!r:.40}")
        questions.append((supports, creature))
    return questions


def _lines(path: Path, parse: Callable[[bytes, str], dict]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Each non-blank line of `path` as file:line, the line (no BOM, ending in one newline) and its record."""
    with (
        path.open("rb") as f,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"cutting {path}", disable=None) as bar,
    ):
        for number, line in enumerate(f, 1):
            bar.update(len(line))
            if line.strip():
                where = f"{path}:{number}"
                yield where, line.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n") + b"\n", parse(line, where)


def _parse_article(line: bytes, where: str, news: bool) -> dict[str, Any]:
    record = parse_article(line, where)
    if news and looks_formatted(record):
        raise UserError(
            f"{where}: already formatted, so its dates and crawl dates are gone; make-stages cuts the raw "
            "download: run `make download TRACK=news` again, then make-stages"
        )
    if "article_idx" in record and not _is_int(record["article_idx"]):
        raise UserError(f"{where}: field 'article_idx' should be int, got {record['article_idx']!r:.40}")
    return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def task_config_text(manifest: dict[str, Any], folder: Path) -> str:
    """The staged task: the track's own task (defaults) with data.stages pointing into `folder`."""
    track, task, n = manifest["track"], manifest["task"], len(manifest["stages"])
    if track == "news":
        how = f"--by {manifest['by']}" + ("" if manifest["month"] == NEWS_MONTH else f" --month {manifest['month']}")
        rule = [
            "# each article in the stage of its date (its crawl date where that is missing or outside",
            f"# {manifest['month']}), in UTC; each question in the stage of its earliest supporting article in train.",
        ]
    else:
        how = f"--stages {n}"
        rule = [
            f"# its creatures (geminon_idx) in {n} contiguous groups, each question with its creature, each article",
            "# with the earliest creatures that cite it (the uncited ones dealt out in turn).",
        ]
    data_dir = folder.parent.as_posix()
    command = f"cbe make-stages --track {track} {how}" + ("" if data_dir == "data" else f" --data-dir {data_dir}")
    lines = [
        "# @package _global_",
        f"# The {track} track in {n} stages, written by `{command}`",
        f"# (rerun it to refresh; {folder.as_posix()}/{MANIFEST} has the counts):",
        *rule,
        "# A staged task has no recipe of its own (conf/recipe/ goes by task name): add its track's to a command,",
        f"# e.g. recipe={track}_gemma3_1b_lora128.",
        "defaults:",
        f"  - {track}",
        "  - _self_",
        "task:",
        f"  name: {task}",
        "data:",
        "  stages:",
    ]
    for stage in manifest["stages"]:
        lines.append(f"    - name: {stage['name']}  # {describe(stage)}")
        for name in REQUIRED:
            lines.append(f"      {name}_path: {_yaml_str((folder / stage['name'] / f'{name}.jsonl').as_posix())}")
        lines.append("      steps: null  # continual.steps_per_stage")
    lines += ["training:", "  num_train_steps: null  # the stages' steps"]
    return "\n".join(lines) + "\n"


def _yaml_str(text: str) -> str:
    """`text` as a YAML scalar: plain when it is a plain path, else quoted (JSON strings are YAML)."""
    return text if re.fullmatch(r"[\w./-]+", text) else json.dumps(text)
