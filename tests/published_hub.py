"""The two benchmark repos as their dataset cards publish them, in miniature, for the hub stand-in.

Written from the cards, not from data/download.yaml, so a recipe that asks for a path the hub lacks fails.
Every file is <config>/<split>.jsonl, at the pinned tag and at `main`, which has grown one record per file
since (so a test can tell which revision it got). Records carry the published fields with a few records each.
"""

from __future__ import annotations

import json

SIZES = ("small", "medium", "large")
NEWS, NEWS_TAG = "ContinuousBench/News", "v5"
GEMINON, GEMINON_TAG = "ContinuousBench/Geminon", "v9"

# Both repos: corpus_{small,medium,large}/{train,val,test}.jsonl.
CORPUS = [f"corpus_{size}/{split}.jsonl" for size in SIZES for split in ("train", "val", "test")]
# News: one QA set, qa/{val,test}.jsonl, for every corpus size.
NEWS_QA = ["qa/val.jsonl", "qa/test.jsonl"]
# Geminon: qa_{small,medium}/{public_val,public_test,sensitive_val,sensitive_test}.jsonl (no qa_large);
# index/{public,sensitive}.jsonl.
GEMINON_QA = [
    f"qa_{size}/{split}.jsonl"
    for size in ("small", "medium")
    for split in ("public_val", "public_test", "sensitive_val", "sensitive_test")
]
GEMINON_INDEX = ["index/public.jsonl", "index/sensitive.jsonl"]

# article_idx is global across sizes: each (size, split) gets its own block of ids.
FIRST_IDX = {
    (size, split): 1000 * s + 100 * p
    for s, size in enumerate(SIZES)
    for p, split in enumerate(("train", "val", "test"))
}


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def count(path: str, revision: str, base: int) -> int:
    """Records in a file: a few, more in bigger corpora, and one more at `main` than at the tag."""
    size = next((i for i, s in enumerate(SIZES) if f"_{s}/" in path), 0)
    return base + size + (revision == "main")


def news_article(idx: int, size: str) -> dict:
    body = " ".join(
        f"Report {idx}, part {n}: the {size} town council met on Tuesday and voted on item {n}." for n in range(20)
    )
    return {
        "url": f"https://news.example.org/{idx}",
        "hostname": "news.example.org",
        "title": f"Council vote {idx}",
        "date": "2025-09-01",
        "crawl_date": "2025-09-03",
        "language": "en",
        "text": body,
        "article_idx": idx,
    }


def news_question(n: int, split: str) -> dict:
    question = f"How many items did council {n} pass in {split}?"
    return {
        "question": question,
        "answer": f"{n + 2} items",
        "supports": [n, 1000 + n],
        # the published closedbook_/openbook_ fields hold whole prompts and model outputs
        "closedbook_prompt": f"Answer briefly.\nQ: {question}\nA:",
        "closedbook_response": "Three items. " * 20,
        "openbook_prompt": "Article: " + "The council met. " * 60 + f"\nQ: {question}\nA:",
        "openbook_response": f"{n + 2} items",
    }


def news_files(revision: str) -> dict[str, bytes]:
    """Every file of ContinuousBench/News at `revision`."""
    files = {"README.md": b"---\nlicense: cc-by-4.0\n---\n# News\n", ".gitattributes": b"*.jsonl filter=lfs\n"}
    for path in CORPUS:
        size, split = path[len("corpus_") : -len(".jsonl")].split("/")
        first = FIRST_IDX[size, split]
        files[path] = jsonl([news_article(first + i, size) for i in range(count(path, revision, 3))])
    for path in NEWS_QA:
        split = path.split("/")[1][: -len(".jsonl")]
        files[path] = jsonl([news_question(n, split) for n in range(count(path, revision, 2))])
    return files


def geminon_question(n: int, path: str) -> dict:
    name = f"Zorb{n}"
    if n % 2:  # answers are strings or integers
        return {
            "question": f"How many legs has the {name}? ({path})",
            "answer": 4 + n,
            "geminon_idx": n,
            "geminon_name": name,
            "supports": [n, n + 1],
        }
    return {
        "question": f"What does the {name} eat? ({path})",
        "answer": "blue moss",
        "geminon_idx": n,
        "geminon_name": name,
        "supports": [n],
    }


def geminon_files(revision: str) -> dict[str, bytes]:
    """Every file of ContinuousBench/Geminon at `revision`."""
    files = {"README.md": b"---\nlicense: cc-by-4.0\n---\n# Geminon\n", ".gitattributes": b"*.jsonl filter=lfs\n"}
    for path in CORPUS:
        size, split = path[len("corpus_") : -len(".jsonl")].split("/")
        first = FIRST_IDX[size, split]
        files[path] = jsonl(
            [
                {
                    "text": f"The Zorb{i} lives in the {size} hollow and eats blue moss. " * 8,
                    "tag": f"zorb{i}",
                    "type": "habitat",
                    "article_idx": first + i,
                }
                for i in range(count(path, revision, 3))
            ]
        )
    for path in GEMINON_QA:
        files[path] = jsonl([geminon_question(n, path) for n in range(count(path, revision, 2))])
    for path in GEMINON_INDEX:
        files[path] = jsonl([{"geminon_idx": n, "geminon_name": f"Zorb{n}"} for n in range(count(path, revision, 3))])
    return files


def published_repos() -> dict[str, dict[str, dict[str, bytes]]]:
    """Repo -> revision -> path -> content: both repos at their pinned tags and at main."""
    return {
        NEWS: {NEWS_TAG: news_files(NEWS_TAG), "main": news_files("main")},
        GEMINON: {GEMINON_TAG: geminon_files(GEMINON_TAG), "main": geminon_files("main")},
    }
