"""`cbe make-stages`: cutting the raw News and Geminon downloads into stages. Expected stages are written by hand
from the issue's rules (weeks Sep 1-7, 8-14, 15-21, 22-30 in UTC; an article's date, else its crawl date; a
question with its earliest supporting article in train, dropped without one) and the raw records' published
fields, not produced by our code."""

import hashlib
import json

import pytest
import yaml

from cbe import cli
from cbe.data.format_news import DATE_FORMAT, render_date
from cbe.data.stages import make_stages, parse_moment
from cbe.errors import UserError
from tests.conftest import ROOT

WEEKS = ("w1", "w2", "w3", "w4")
FILLER_DAYS = {"w1": 3, "w2": 10, "w3": 17, "w4": 24}  # one plain article per week, so that no stage is empty


def article(idx, date, crawl_date="2025-09-29T10:00:00Z", title="Headline", **fields):
    """A raw news record with the published fields."""
    return {
        "url": f"https://news.example/{idx}",
        "hostname": "news.example",
        "title": title,
        "date": date,
        "crawl_date": crawl_date,
        "language": "en",
        "text": f"Body of article {idx}.",
        "article_idx": idx,
        **fields,
    }


def question(text, supports):
    return {"question": text, "answer": "an answer", "supports": supports}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def news_track(data, train=(), val=(), valqa=(), testqa=()):
    """data/news/ as `cbe download` leaves it, with one filler article and question per week besides those given."""
    fill = {week: 900 + i for i, week in enumerate(WEEKS)}
    write_jsonl(
        data / "news" / "train.jsonl", [*train, *(article(fill[w], f"2025-09-{FILLER_DAYS[w]:02d}") for w in WEEKS)]
    )
    write_jsonl(
        data / "news" / "val.jsonl",
        [*val, *(article(950 + i, f"2025-09-{FILLER_DAYS[w]:02d}") for i, w in enumerate(WEEKS))],
    )
    for name, extra in (("valqa", valqa), ("testqa", testqa)):
        write_jsonl(data / "news" / f"{name}.jsonl", [*extra, *(question(f"filler {w}", [fill[w]]) for w in WEEKS)])


def cut(tmp_path, *options):
    """Run the command as a user does (in-process); return the stage folder."""
    cli.main(["make-stages", *options, "--data-dir", str(tmp_path / "data"), "--task-dir", str(tmp_path / "task")])
    return tmp_path / "data"


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stage_ids(folder, split, stages=WEEKS):
    """Stage -> the article_idx of its articles in `split`, the filler left out."""
    return {
        s: [r["article_idx"] for r in records(folder / s / f"{split}.jsonl") if r["article_idx"] < 900] for s in stages
    }


def stage_questions(folder, name, stages=WEEKS):
    return {
        s: [r["question"] for r in records(folder / s / f"{name}.jsonl") if "filler" not in r["question"]]
        for s in stages
    }


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize(
    "date,week",
    [
        ("2025-09-01T00:00:00", "w1"),
        ("2025-09-07T23:59:59", "w1"),
        ("2025-09-08T00:00:00", "w2"),
        ("2025-09-14T23:59", "w2"),
        ("2025-09-15T00:00", "w3"),
        ("2025-09-21T23:59:59.999999", "w3"),
        ("2025-09-22T00:00:00Z", "w4"),
        ("2025-09-30T23:59:59", "w4"),
        ("2025-09-08", "w2"),  # a day alone is its midnight
        ("2025-09-08T01:30:00+02:00", "w1"),  # 23:30 UTC on the 7th
        ("2025-09-07T23:30:00-01:00", "w2"),  # 00:30 UTC on the 8th
        ("2025-09-22 00:00:00+00:00", "w4"),
    ],
)
def test_an_article_goes_to_the_week_of_its_date_in_utc(tmp_path, date, week):
    news_track(tmp_path / "data", train=[article(1, date)], val=[article(2, date)])
    folder = cut(tmp_path, "--track", "news", "--by", "week") / "news_weekly"
    expected = {w: [1] if w == week else [] for w in WEEKS}
    assert stage_ids(folder, "train") == expected
    assert stage_ids(folder, "val") == {w: [2] if ids else [] for w, ids in expected.items()}


@pytest.mark.parametrize(
    "date",
    [
        "2025-09-08T01:30:00+02:00",
        " 2025-09-07\t23:59 ",
        "20250908",
        "2025-W37-1",
        "Sept 8",
        "",
        "0001-01-01T00:30+01:00",
    ],
)
def test_dates_are_read_as_format_news_reads_them(date):
    moment, shown = parse_moment(date), render_date(date)
    if moment is None:  # format-news shows a date that is not ISO as it is, a blank one as N/A
        assert shown in ("N/A", " ".join(date.split()))
    else:  # and an ISO one as its moment in UTC
        assert moment.strftime(DATE_FORMAT) == shown


def test_a_missing_or_unparseable_date_falls_back_to_the_crawl_date(tmp_path):
    train = [
        article(1, None, crawl_date="2025-09-08T00:00:00Z"),
        article(2, "", crawl_date="2025-09-21T23:59:59Z"),
        article(3, "last Tuesday", crawl_date="2025-09-22T01:00:00+02:00"),  # 23:00 UTC on the 21st
        {k: v for k, v in article(4, "x", crawl_date="2025-09-30T12:00:00Z").items() if k != "date"},
        article(5, "2025-09-02", crawl_date="2025-09-29T00:00:00Z"),  # a date wins over the crawl date
    ]
    news_track(tmp_path / "data", train=train)
    folder = cut(tmp_path, "--track", "news") / "news_weekly"  # by week unless told
    assert stage_ids(folder, "train") == {"w1": [5], "w2": [1], "w3": [2, 3], "w4": [4]}
    assert manifest(folder)["articles"]["train"] == {"by_crawl_date": 4, "outside_month": 0, "undated": 0}


def test_a_date_outside_the_month_falls_back_to_the_crawl_date_and_undated_articles_are_dropped(tmp_path):
    train = [
        article(1, "2019-03-02", crawl_date="2025-09-16T08:00:00Z"),  # an old article, crawled in week 3
        article(2, "2025-08-31", crawl_date=None),  # nothing in September: the nearest day, Sep 1
        article(3, "2025-10-02", crawl_date="bad"),  # the last day, Sep 30
        article(4, None, crawl_date=None),  # no time at all: dropped
    ]
    news_track(tmp_path / "data", train=train)
    folder = cut(tmp_path, "--track", "news") / "news_weekly"
    assert stage_ids(folder, "train") == {"w1": [2], "w2": [], "w3": [1], "w4": [3]}
    assert manifest(folder)["articles"]["train"] == {"by_crawl_date": 1, "outside_month": 2, "undated": 1}


def test_a_question_goes_to_the_stage_of_its_earliest_supporting_article_in_train(tmp_path):
    train = [article(1, "2025-09-16"), article(2, "2025-09-09"), article(3, "2025-09-25")]
    valqa = [
        question("supported in w3 and w2", [1, 2]),
        question("supported in w4 and by an article in no corpus", [3, 12345]),
        question("supported in w4 and in val", [3, 50]),
    ]
    news_track(tmp_path / "data", train=train, val=[article(50, "2025-09-02")], valqa=valqa)
    folder = cut(tmp_path, "--track", "news") / "news_weekly"
    assert stage_questions(folder, "valqa") == {
        "w1": [],
        "w2": ["supported in w3 and w2"],
        "w3": [],
        "w4": ["supported in w4 and by an article in no corpus", "supported in w4 and in val"],
    }


def test_questions_without_a_supporting_article_in_train_are_dropped_and_counted(tmp_path, capsys):
    valqa = [question("only in val", [50]), question("no supports", []), question("unknown article", [777])]
    testqa = [question("in val and unknown", [50, 777]), question("in train", [1])]
    train = [article(1, "2025-09-01")]
    news_track(tmp_path / "data", train=train, val=[article(50, "2025-09-02")], valqa=valqa, testqa=testqa)
    folder = cut(tmp_path, "--track", "news") / "news_weekly"
    assert manifest(folder)["dropped_questions"] == {"valqa": 3, "testqa": 1}
    assert stage_questions(folder, "valqa") == {w: [] for w in WEEKS}
    assert stage_questions(folder, "testqa") == {"w1": ["in train"], "w2": [], "w3": [], "w4": []}
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "dropped 4 questions with no supporting article in train (valqa 3, testqa 1)" in out[0]


def test_stage_files_keep_the_records_and_the_corpora_are_formatted_as_the_benchmark_renders_them(tmp_path):
    qa = question("When?", [1]) | {"closedbook_prompt": "Q: When?\nA:", "answer": 7}
    news_track(tmp_path / "data", train=[article(1, "2025-09-07T23:59:59", title="A  vote")], valqa=[qa])
    folder = cut(tmp_path, "--track", "news") / "news_weekly"
    assert records(folder / "w1" / "train.jsonl")[0] == {
        "text": "Title: A vote\nDate: Sep 07 (2025-09-07 23:59:59 UTC)\nArticle: Body of article 1.\n",
        "article_idx": 1,
    }
    assert records(folder / "w1" / "valqa.jsonl")[0] == qa  # QA records as they were, every field kept


def test_by_month_makes_one_stage_and_its_task(tmp_path):
    news_track(tmp_path / "data", train=[article(1, "2025-09-30T23:59:59")])
    folder = cut(tmp_path, "--track", "news", "--by", "month") / "news_monthly"
    assert [(s["name"], s["first_day"], s["last_day"], s["train"]) for s in manifest(folder)["stages"]] == [
        ("m1", "2025-09-01", "2025-09-30", 5)
    ]
    task = yaml.safe_load((tmp_path / "task" / "news_monthly.yaml").read_text())
    assert [s["name"] for s in task["data"]["stages"]] == ["m1"]


def test_the_task_config_lists_every_stage_as_the_contract_says(tmp_path):
    news_track(tmp_path / "data")
    folder = cut(tmp_path, "--track", "news", "--by", "week") / "news_weekly"
    task = yaml.safe_load((tmp_path / "task" / "news_weekly.yaml").read_text())
    assert task["defaults"] == ["news", "_self_"]  # the news task's prompts, parser and sequence length
    assert task["task"] == {"name": "news_weekly"}
    stages = task["data"]["stages"]
    assert [s["name"] for s in stages] == list(WEEKS)
    for stage in stages:
        assert set(stage) == {"name", "train_path", "val_path", "valqa_path", "testqa_path", "steps"}
        assert stage["steps"] is None
        for name in ("train", "val", "valqa", "testqa"):
            assert stage[f"{name}_path"] == str(folder / stage["name"] / f"{name}.jsonl")
            assert records(folder / stage["name"] / f"{name}.jsonl")


def test_the_committed_news_weekly_task_is_what_the_command_writes(tmp_path, monkeypatch):
    news_track(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # the usual relative --data-dir, data
    make_stages("news", "data", by="week", task_dir=tmp_path / "task")
    assert (tmp_path / "task" / "news_weekly.yaml").read_bytes() == (ROOT / "conf/task/news_weekly.yaml").read_bytes()


def tree(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_reruns_are_byte_identical_and_replace_the_whole_folder(tmp_path):
    news_track(tmp_path / "data", train=[article(1, "2025-09-09"), article(2, None, crawl_date="2025-09-20")])
    source = tree(tmp_path / "data" / "news")
    cut(tmp_path, "--track", "news")
    first = tree(tmp_path)
    (tmp_path / "data" / "news_weekly" / "w2" / "stale.jsonl").write_text("{}\n")
    cut(tmp_path, "--track", "news")
    assert tree(tmp_path) == first  # the stale file is gone, every byte is the same
    assert tree(tmp_path / "data" / "news") == source  # the raw download is left as it was
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def geminon_track(data, questions, train, val):
    write_jsonl(data / "geminon" / "train.jsonl", train)
    write_jsonl(data / "geminon" / "val.jsonl", val)
    for name, rows in questions.items():
        write_jsonl(data / "geminon" / f"{name}.jsonl", rows)


def creature_article(idx):
    return {"text": f"The creature of article {idx} lives in the hollow.", "tag": f"z{idx}", "article_idx": idx}


def creature_question(text, creature, supports):
    return {
        "question": text,
        "answer": "moss",
        "geminon_idx": creature,
        "geminon_name": f"Z{creature}",
        "supports": supports,
    }


def test_geminon_stages_are_disjoint_groups_of_creatures(tmp_path, capsys):
    questions = {  # creatures 0..4 in 2 stages: {0, 1, 2} and {3, 4}
        "valqa": [
            creature_question("q0", 0, [10]),
            creature_question("q3", 3, [13, 10]),
            creature_question("q4", 4, [14]),
        ],
        "testqa": [
            creature_question("t1", 1, [11]),
            creature_question("t4", 4, [14]),
            creature_question("tv", 2, [60]),
        ],
        "sensitive_valqa": [creature_question("s2", 2, [12])],
        "sensitive_testqa": [creature_question("s3", 3, [13])],
    }
    train = [creature_article(i) for i in (10, 11, 12, 13, 14, 20, 21, 22)]  # 20-22 are cited by no question
    val = [creature_article(i) for i in (60, 61, 62)]
    geminon_track(tmp_path / "data", questions, train, val)
    folder = cut(tmp_path, "--track", "geminon", "--stages", "2") / "geminon_2stages"

    def ids(stage, split):
        return [r["article_idx"] for r in records(folder / stage / f"{split}.jsonl")]

    # Article 10 is cited by creatures 0 and 3: the earlier stage has it. Uncited ones go s1, s2, s1, ...
    assert (ids("s1", "train"), ids("s2", "train")) == ([10, 11, 12, 20, 22], [13, 14, 21])
    assert (ids("s1", "val"), ids("s2", "val")) == ([60, 61], [62])  # 60 is cited by creature 2, of s1

    def asked(stage, name):
        return [r["question"] for r in records(folder / stage / f"{name}.jsonl")]

    assert (asked("s1", "valqa"), asked("s2", "valqa")) == (["q0"], ["q3", "q4"])  # q3 stays with creature 3
    assert (asked("s1", "testqa"), asked("s2", "testqa")) == (["t1"], ["t4"])  # tv: supported only in val
    assert (asked("s1", "sensitive_valqa"), asked("s2", "sensitive_testqa")) == (["s2"], ["s3"])
    m = manifest(folder)
    assert [(s["name"], s["first_geminon_idx"], s["last_geminon_idx"], s["creatures"]) for s in m["stages"]] == [
        ("s1", 0, 2, 3),
        ("s2", 3, 4, 2),
    ]
    assert m["dropped_questions"]["testqa"] == 1 and m["articles"]["train"] == {"uncited": 3}
    task = yaml.safe_load((tmp_path / "task" / "geminon_2stages.yaml").read_text())
    assert task["defaults"] == ["geminon", "_self_"] and [s["name"] for s in task["data"]["stages"]] == ["s1", "s2"]
    assert "dropped 1 questions" in capsys.readouterr().out


def user_error(capsys, tmp_path, *options):
    with pytest.raises(SystemExit) as exit_info:
        cut(tmp_path, *options)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("cbe: error: ") and err.count("\n") == 1, err
    return err


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    err = user_error(capsys, tmp_path, "--track", "news")
    assert "news/train.jsonl: no such file; download the track first: make download TRACK=news" in err
    news_track(tmp_path / "data")
    assert "pass --by week or --by month" in user_error(capsys, tmp_path, "--track", "news", "--stages", "2")
    assert "YYYY-MM" in user_error(capsys, tmp_path, "--track", "news", "--month", "Sept")
    assert "needs --stages N" in user_error(capsys, tmp_path, "--track", "geminon")
    assert "not --by or --month" in user_error(capsys, tmp_path, "--track", "geminon", "--by", "week")
    with (tmp_path / "data" / "news" / "valqa.jsonl").open("a") as f:
        f.write('{"question": "q", "answer": "a", "supports": 3}\n')  # a count, not article ids
    assert "valqa.jsonl:5: field 'supports' should be a list" in user_error(capsys, tmp_path, "--track", "news")


def test_formatted_input_is_refused_as_its_dates_are_gone(tmp_path, capsys):
    news_track(tmp_path / "data")
    formatted = {"text": "Title: T\nDate: Sep 03 (2025-09-03 00:00:00 UTC)\nArticle: Body.", "article_idx": 1}
    write_jsonl(tmp_path / "data" / "news" / "train.jsonl", [formatted])
    err = user_error(capsys, tmp_path, "--track", "news")
    assert "train.jsonl:1: already formatted" in err and "make download TRACK=news" in err


def test_an_empty_stage_is_refused_and_the_earlier_cut_is_kept(tmp_path, capsys):
    news_track(tmp_path / "data")
    cut(tmp_path, "--track", "news")
    before = tree(tmp_path / "data" / "news_weekly")
    records_w3 = [r for r in records(tmp_path / "data" / "news" / "train.jsonl") if r["date"] != "2025-09-17"]
    write_jsonl(tmp_path / "data" / "news" / "train.jsonl", records_w3)
    err = user_error(capsys, tmp_path, "--track", "news")
    assert "stage w3 (2025-09-15 to 2025-09-21) gets nothing from" in err and "--by month" in err
    assert tree(tmp_path / "data" / "news_weekly") == before
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "data").iterdir())


def test_more_stages_than_creatures_is_refused(tmp_path):
    questions = {
        name: [creature_question(name, 0, [1])] for name in ("valqa", "testqa", "sensitive_valqa", "sensitive_testqa")
    }
    geminon_track(tmp_path / "data", questions, [creature_article(1)], [creature_article(2)])
    with pytest.raises(UserError, match="--stages 3, but the QA sets in .* name only 1 creatures"):
        make_stages("geminon", tmp_path / "data", stages=3, task_dir=tmp_path / "task")
