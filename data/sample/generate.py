"""Generate the tiny fictional-world sample track (deterministic, stdlib only).

Run `python data/sample/generate.py`; it rewrites train.jsonl, val.jsonl,
valqa.jsonl and testqa.jsonl next to this file.

Every fact is one corpus sentence "<question> <answer>." and its QA row asks
for the answer given the exact sentence prefix, so a model that memorized the
corpus can answer by plain continuation (prompt template "{question}").
"""

import json
import os
import random
import tempfile
from collections import Counter

SEED = 1234
HERE = os.path.dirname(os.path.abspath(__file__))

# Invented, pronounceable, mutually distinct creature names (none is an English
# word, so the model cannot lean on prior knowledge).
CREATURES = [
    "Zorblat",
    "Quillimane",
    "Drovik",
    "Pellithorn",
    "Snarvel",
    "Glimmerhock",
    "Tazzerine",
    "Umbrovane",
    "Krellig",
    "Wobbleth",
    "Fennimar",
    "Oskaloop",
    "Brastique",
    "Yurnip",
    "Clavendrell",
    "Moxilight",
    "Thrennit",
    "Azzuvar",
    "Gorpentine",
    "Lirrawell",
    "Pockalune",
    "Snivrig",
    "Halvadon",
    "Ixtrelle",
]

# Attribute -> (sentence prefix after the name, small value vocabulary).
# Vocabularies are small and shared across creatures, so each answer is only
# recoverable by memorizing the creature-value association.
ATTRIBUTES = [
    (
        "lives in",
        [
            "the Crystal Caves",
            "the Whispering Fen",
            "the Ashen Dunes",
            "the Glass Marsh",
            "the Hollow Peaks",
            "the Drowned Forest",
        ],
    ),
    ("eats", ["ember moss", "frost beetles", "salt lilies", "copper snails", "moon figs", "thistle bark"]),
    ("is colored", ["teal", "amber", "violet", "crimson", "silver", "ochre"]),
    ("sleeps during", ["the winter", "the summer", "the day", "the night", "thunderstorms", "the full moon"]),
    ("fears", ["loud bells", "running water", "owls", "sunlight", "its own reflection"]),
    # The integer attribute: the answer is written to the QA files as a JSON int.
    ("was first seen in", None),
]

SUPPORT_WEIGHTS = {1: 0.8, 2: 0.12, 3: 0.08}  # target support-count mix
N_VAL = 24  # training notes copied verbatim to val.jsonl

rng = random.Random(SEED)

# 1. Draw the facts: (question, answer) per creature and attribute.
facts = []  # list of (creature, question, answer)
for name in CREATURES:
    for prefix, vocab in ATTRIBUTES:
        answer = rng.randint(1700, 1999) if vocab is None else rng.choice(vocab)
        facts.append((name, f"The {name} {prefix}", answer))


def sentence(question, answer):
    return f"{question} {answer}."


# 2. One short note per fact: a corpus document is a single sentence, so the question (the sentence's
#    prefix right after the document start) is asked exactly where the model met the fact. A tiny model
#    memorizes that on a CPU in a minute; multi-sentence articles need a bigger model and longer training.
articles = [sentence(q, a) + "\n" for _, q, a in facts]

# 3. Repeats: each fact gets a target support s and appears in s-1 more notes, so supports of 1, 2
#    and 3 all occur; the notes are shuffled so repeats are not neighbours.
support_values, weights = zip(*SUPPORT_WEIGHTS.items())
for _, q, a in facts:
    for _ in range(rng.choices(support_values, weights)[0] - 1):
        articles.append(sentence(q, a) + "\n")
rng.shuffle(articles)


# 4. Support = number of corpus articles that contain the sentence as a line
#    (counted from the final corpus, not from the targets above).
def support(q, a):
    s = sentence(q, a)
    return sum(s in art.splitlines() for art in articles)


qa = [{"question": q, "answer": a, "supports": support(q, a)} for _, q, a in facts]
assert all(r["supports"] >= 1 for r in qa)

# 5. Split facts ~half/half into valqa and testqa, stratified by support so both
#    splits see every support level.
rng.shuffle(qa)
qa.sort(key=lambda r: r["supports"])  # stable: shuffled order within a level
valqa, testqa = qa[0::2], qa[1::2]

# 6. val.jsonl: a few training articles verbatim (in a memorization benchmark the
#    eval loss is measured on the corpus itself).
train = [{"text": t, "article_idx": i} for i, t in enumerate(articles)]
val = [train[i] for i in sorted(rng.sample(range(len(train)), N_VAL))]


def write_jsonl(filename, rows):
    """Write atomically: temp file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=HERE, prefix=f".{filename}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; make the data world-readable
    os.replace(tmp, os.path.join(HERE, filename))


write_jsonl("train.jsonl", train)
write_jsonl("val.jsonl", val)
write_jsonl("valqa.jsonl", valqa)
write_jsonl("testqa.jsonl", testqa)

print(f"train: {len(train)} articles, {sum(len(t) for t in articles)} chars")
print(f"val: {len(val)} articles; valqa: {len(valqa)}; testqa: {len(testqa)}")
print("supports:", dict(sorted(Counter(r["supports"] for r in qa).items())))
