"""LLM judge: re-score a saved eval_details file (of cbe or of the benchmark's harness) with Gemini, which also
credits paraphrases and more specific answers that exact, substring and fuzzy match miss.

Each record is judged by its index in the input. Verdicts are appended to `<name>_llm_judged.jsonl` as they
arrive (completion order, one flushed line each, so a kill loses only the records in flight); at the end the
file is rewritten in input order and `<name>_summary.jsonl` (summarize_judged) is written, both atomically.
`resume` keeps the records already judged and asks again for the rest, errors included. A record the judge
could not score is kept with `llm_judge_error`, never counted as a 0.

What is judged: the parsed answer (the default) or the raw generation, asked with the built-in RUBRIC or the
user's --prompt-file. A file in a run's eval_details/ takes its QA file (for supports and ids) and its support
thresholds from the run's config.yaml unless they are given.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from cbe.data.jsonl import support_count
from cbe.errors import UserError
from cbe.eval.details import join_qa, load_details, support_thresholds_for
from cbe.eval.metrics import MATCHES, METRICS, bootstrap_ci95
from cbe.run import RunDir, write_jsonl_atomic

DEFAULT_KEYS_FILE = "secrets/gemini_keys.txt"
KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")

RUBRIC = """You grade answers to quiz questions about a text corpus.
Reply 1 if the predicted answer means the gold answer: a paraphrase counts, a more specific answer that \
contains the gold answer counts, and a number counts if it is within 0.01% relative error of the gold number.
Reply 0 otherwise: a wrong, vaguer, partial or empty answer.
Reply with the single character 1 or 0 and nothing else.

Question: {question}
Gold answer: {ground_truth}
Predicted answer: {prediction}"""
# The placeholders of a judge prompt (RUBRIC's, and those a --prompt-file may use): each is replaced by the
# record's field on one line (whitespace runs become one space).
PLACEHOLDERS = ("question", "ground_truth", "prediction")
BUILT_IN_PROMPT = "built-in"
# Which details field is judged: the parsed answer (what the metrics scored) or the raw generation.
RESPONSE_FIELDS = {"parsed": "parsed_prediction", "raw": "raw_prediction"}

_VERDICT = re.compile(r"\W*([01])\W*")
_RETRYABLE_STATUS = {408, 429}  # and every 5xx


class JudgeError(Exception):
    """The judge gave no usable verdict for one record (after retries, or an unparseable answer)."""


def load_keys(keys_file: str | None) -> list[str]:
    """API keys: one per line of `keys_file` (or of DEFAULT_KEYS_FILE, if present), else from KEY_VARIABLES."""
    path = Path(keys_file or DEFAULT_KEYS_FILE)
    if keys_file and not path.is_file():
        raise UserError(f"{path}: no such keys file; put one Gemini API key per line in it")
    if path.is_file():
        keys = [line.strip() for line in path.read_text().splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
        if not keys:
            raise UserError(f"{path}: no keys in it; put one Gemini API key per line")
        return keys
    for variable in KEY_VARIABLES:
        if os.environ.get(variable, "").strip():
            return [os.environ[variable].strip()]
    raise UserError(
        f"no Gemini API key: put keys one per line in {DEFAULT_KEYS_FILE} (see "
        f"{DEFAULT_KEYS_FILE}.example), pass --keys-file, or set GEMINI_API_KEY"
    )


def prediction_of(record: dict[str, Any]) -> str:
    """What the metrics scored: the parsed prediction, or the raw one for files without it."""
    return record.get("parsed_prediction", record.get("raw_prediction"))


def judge_prompt(record: dict[str, Any], template: str = RUBRIC, response_field: str = "parsed") -> str:
    """The prompt that asks the judge about one record: `template` with the record's fields on one line each."""
    response = record["raw_prediction"] if response_field == "raw" else prediction_of(record)
    fields = {"question": record["question"], "ground_truth": record["ground_truth"], "prediction": response}
    return template.format(**{name: " ".join(str(value).split()) for name, value in fields.items()})


def _fields(template: str) -> list[str]:
    """The placeholder names of a str.format template, nested specs' included; ValueError for a lone brace."""
    names = []
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            names.append(name)
        if spec:
            names += _fields(spec)
    return names


def load_prompt_template(path: str | Path) -> tuple[str, str]:
    """A judge prompt template file and its id for the judged records (`sha256:<12 hex digits>` of its text);
    UserError, one line, if it is missing, unreadable or malformed, or has an unknown placeholder or no {prediction}."""
    path = Path(path)
    where = f"--prompt-file {path}"
    usage = "the placeholders are {question}, {ground_truth} and {prediction}; write {{ and }} for a literal brace"
    if not path.is_file():
        raise UserError(f"{where}: no such file; write a judge prompt there ({usage})")
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read it as UTF-8 text ({e})") from None
    try:
        names = _fields(template)
    except ValueError as e:
        raise UserError(f"{where}: not a valid template ({e}); {usage}") from None
    unknown = [name for name in names if name not in PLACEHOLDERS]
    if unknown:
        raise UserError(f"{where}: unknown placeholder {{{unknown[0]}}}; {usage}")
    if "prediction" not in names:
        raise UserError(f"{where}: no {{prediction}} placeholder, so the judge would never see the answer; {usage}")
    return template, f"sha256:{hashlib.sha256(template.encode()).hexdigest()[:12]}"


def parse_verdict(text: str | None) -> bool:
    """The judge's "1" or "0" (markdown or a trailing period tolerated); JudgeError for anything else."""
    match = _VERDICT.fullmatch(text or "")
    if not match:
        raise JudgeError(f"unparseable judge answer {text!r:.80}")
    return match.group(1) == "1"


def _transport_errors() -> tuple[type[Exception], ...]:
    """Timeouts and connection failures of the HTTP library google-genai sends with (httpx2 in 3.x, httpx before)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(found)


class GeminiJudge:
    """Asks Gemini for one verdict at a time (thread-safe): temperature 0, keys used round-robin, and 429, 5xx,
    timeouts and dropped connections retried with exponential backoff and jitter on the next key."""

    def __init__(
        self,
        keys: Sequence[str],
        model: str,
        base_url: str | None = None,
        timeout_seconds: float = 60,
        max_attempts: int = 6,
        retry_base_seconds: float = 1.0,
    ):
        from google import genai
        from google.genai import types

        # attempts=1 turns the SDK's own retry off, so that ours (which rotates keys) is the only one.
        options = types.HttpOptions(
            base_url=base_url, timeout=int(timeout_seconds * 1000), retry_options=types.HttpRetryOptions(attempts=1)
        )
        self._clients = [genai.Client(api_key=key, http_options=options) for key in keys]
        self._keys = list(keys)
        self._next_client = itertools.cycle(self._clients)
        self._lock = threading.Lock()
        self._config = types.GenerateContentConfig(temperature=0.0)
        self.model, self.max_attempts, self.retry_base_seconds = model, max_attempts, retry_base_seconds

    def redact(self, text: str) -> str:
        """An error message with every API key blanked out (they must never reach a log or a file)."""
        for key in self._keys:
            text = text.replace(key, "<key>")
        return text

    def verdict(self, prompt: str) -> tuple[bool, str]:
        """(match, the judge's raw answer) for one prompt, or JudgeError."""
        from google.genai import errors

        for attempt in range(self.max_attempts):
            with self._lock:
                client = next(self._next_client)
            try:
                response = client.models.generate_content(model=self.model, contents=prompt, config=self._config)
                return parse_verdict(response.text), response.text
            except errors.APIError as e:
                problem = f"HTTP {e.code} {e.status or ''}: {e.message or ''}".strip()
                if e.code not in _RETRYABLE_STATUS and e.code < 500:
                    raise JudgeError(self.redact(problem)) from None
            except (*_transport_errors(), errors.UnknownApiResponseError) as e:  # timeouts, resets, a torn body
                problem = f"{type(e).__name__}: {e}"
            if attempt + 1 < self.max_attempts:
                time.sleep(min(60.0, self.retry_base_seconds * 2**attempt) * random.uniform(0.5, 1.5))
        raise JudgeError(self.redact(f"gave up after {self.max_attempts} attempts: {problem}"))

    def close(self) -> None:
        """Close every key's client."""
        for client in self._clients:
            client.close()


# -- files --------------------------------------------------------------------------------------------
def output_paths(input_path: Path, output_dir: str | Path | None) -> tuple[Path, Path]:
    """`<name>_llm_judged.jsonl` and `<name>_summary.jsonl`, beside the input unless `output_dir` is given."""
    folder = Path(output_dir) if output_dir else input_path.parent
    return folder / f"{input_path.stem}_llm_judged.jsonl", folder / f"{input_path.stem}_summary.jsonl"


def load_judge_input(
    path: Path, qa: str | Path | None = None, stratify: Sequence[str] = (), response_field: str = "parsed"
) -> tuple[list[dict[str, Any]], list[str]]:
    """The records to judge (question, ground_truth, and a raw_prediction string or, unless response_field is "raw",
    a parsed_prediction one), with the supports and ids of the QA file `qa` when given, and notes for the user."""
    predictions = ("raw_prediction",) if response_field == "raw" else ("parsed_prediction", "raw_prediction")
    required = {"question": (str,), "ground_truth": (str, int, float)}
    records = load_details(path, "judge", predictions=predictions, required=required)
    notes = []
    if qa:
        records, note = join_qa(records, qa, path)
        notes.append(note)
    for name in stratify:
        if not any(name in r for r in records):
            raise UserError(
                f"--stratify {name}: no record of {path} has this field (fields: {', '.join(sorted(records[0]))})"
            )
    return records, notes


def read_judged(path: Path, records: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The records a previous run judged (the latest line per index; a torn last line from a kill is ignored)."""
    judged: dict[int, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: malformed JSON; delete the file to judge from scratch")
        index = record.get("index")
        known = isinstance(index, int) and 0 <= index < len(records)
        if not known or record.get("question") != records[index]["question"]:
            raise UserError(
                f"{path}:{number}: does not match the input record {index}; it was judged from "
                f"another file: delete it or pick another --output-dir"
            )
        judged[index] = record
    return judged


# -- the run's settings -------------------------------------------------------------------------------
def _started_in(run: RunDir) -> Path | None:
    """The dir the run started in (Hydra's .hydra/hydra.yaml, else None), which its config's paths resolve against."""
    try:
        return Path(yaml.safe_load(run.hydra_config.read_text())["hydra"]["runtime"]["cwd"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _configured_qa(run: RunDir, config: dict[str, Any], input_path: Path) -> tuple[Path | None, str]:
    """The QA file the run evaluated as the details file's set (from `<set>_step_<N>.jsonl`), looked for in the dir
    the run started in, then here; else None. With the set's name, or why there is no file."""
    from omegaconf import OmegaConf

    from cbe.eval.evaluator import qa_paths

    qa_set = RunDir.details_set(input_path)
    if qa_set is None:
        return None, f"{input_path.name} is not named <set>_step_<N>.jsonl, so its QA set is not known"
    try:
        retention = (config.get("continual") or {}).get("retention_qa_path")
        paths = qa_paths(OmegaConf.create(config["data"]), (config.get("eval") or {}).get("qa_data"), retention)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None, "it has no data section naming the QA files"
    if qa_set not in paths:
        return None, f"it names no QA file for set {qa_set} (its sets: {', '.join(paths)})"
    path, started = Path(paths[qa_set]), _started_in(run)
    candidates = [path] if path.is_absolute() or started is None else [started / path, path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = f"in {started}, where the run started, nor here" if started and not path.is_absolute() else "here"
        return None, f"its QA file of set {qa_set}, {path}, is not {where}"
    return found, qa_set


def judge_settings(
    input_path: str | Path, qa: str | Path | None, support_thresholds: Sequence[int] | None
) -> tuple[dict[str, Any], str | None]:
    """The QA file and support thresholds to judge with and where each came from: the flag where given (None: not
    given), else the run's config.yaml for a details file of a run, else none; as the summary records them (qa,
    qa_from, support_thresholds, support_thresholds_from), with a note on them for a file of a run."""
    used: dict[str, Any] = {
        "qa": str(qa) if qa else None,
        "qa_from": "--qa" if qa else None,
        "support_thresholds": list(support_thresholds or []),
        "support_thresholds_from": None if support_thresholds is None else "--support-thresholds",
    }
    run = RunDir.of_details(input_path)
    if run is None:
        return used, None
    config_path = run.config
    problems = []
    if not qa or support_thresholds is None:
        try:
            config = yaml.safe_load(config_path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(
                f"{config_path}: not readable as YAML ({type(e).__name__}); pass --qa and --support-thresholds"
            ) from None
        config = config if isinstance(config, dict) else {}
        if not qa:
            found, why = _configured_qa(run, config, Path(input_path))
            if found is None:
                problems.append(f"no QA file from {config_path}: {why}; pass --qa QA_FILE to join supports")
            else:
                used |= {"qa": str(found), "qa_from": str(config_path)}
        if support_thresholds is None:
            configured = (config.get("eval") or {}).get("support_thresholds") or []
            if not isinstance(configured, list) or not all(isinstance(k, int) for k in configured):
                raise UserError(
                    f"{config_path}: eval.support_thresholds is {configured!r}, not a list of integers; "
                    "pass --support-thresholds"
                )
            used |= {"support_thresholds": configured, "support_thresholds_from": str(config_path)}
    thresholds = " ".join(map(str, used["support_thresholds"])) or "none"
    said = f"QA file {used['qa']} from {used['qa_from']}" if used["qa"] else "no QA file"
    said += f"; support thresholds {thresholds} from {used['support_thresholds_from']}"
    return used, "; ".join([said, *problems])


# -- summary ------------------------------------------------------------------------------------------
def _match(record: dict[str, Any], name: str) -> bool:
    """A yes/no metric as the details file has it, computed where it lacks it (e.g. substring_match in older files)."""
    if name in record:
        return bool(record[name])
    return METRICS[name](prediction_of(record), str(record["ground_truth"]))


def _stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in records if r.get("llm_match") is not None]
    out: dict[str, Any] = {"n": len(records), "judged": len(scored), "errors": len(records) - len(scored)}
    llm = [float(r["llm_match"]) for r in scored]
    out["llm_match"] = sum(llm) / len(llm) if llm else None
    out["llm_match_ci95"] = bootstrap_ci95(llm)
    matches = {name: [_match(r, name) for r in scored] for name in MATCHES}  # exact, substring, fuzzy
    out |= {name: sum(values) / len(values) if values else None for name, values in matches.items()}
    # Flips: records whose verdict the judge changes, relative to each string metric (over judged records).
    for name, values in matches.items():
        short = name.removesuffix("_match")
        out[f"judge_yes_{short}_no"] = sum(1 for j, m in zip(llm, values) if j and not m)
        out[f"judge_no_{short}_yes"] = sum(1 for j, m in zip(llm, values) if m and not j)
    return out


def _hashable(value: Any) -> Any:
    """A field value usable as a group key (a list or dict of ids becomes its JSON text)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _value_order(value: Any) -> tuple:
    """Numbers in numeric order, then text, then a missing value."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (value is None, not number, value if number else str(value))


def summarize_judged(
    records: Sequence[dict[str, Any]], stratify: Sequence[str] = (), support_thresholds: Sequence[int] = ()
) -> list[dict[str, Any]]:
    """One line for all records, one per support threshold k (group supports_ge, value k: records with
    supports >= k) and one per value of each `stratify` field."""
    lines = [{"group": "all", "value": None, **_stats(records)}]
    for k in support_thresholds:
        lines.append({"group": "supports_ge", "value": k, **_stats([r for r in records if support_count(r) >= k])})
    for name in stratify:
        for value in sorted({_hashable(r.get(name)) for r in records}, key=_value_order):
            group = [r for r in records if _hashable(r.get(name)) == value]
            lines.append({"group": name, "value": value, **_stats(group)})
    return lines


# -- the run ------------------------------------------------------------------------------------------
# What a verdict was asked with, which a resume must share (the values files of older versions imply), and the
# option that sets each.
SETUP_DEFAULTS = {"judge_model": None, "judge_response_field": "parsed", "judge_prompt": BUILT_IN_PROMPT}
SETUP_OPTIONS = {"judge_model": "--model", "judge_response_field": "--response-field", "judge_prompt": "--prompt-file"}
VERDICT_FIELDS = ("index", *SETUP_DEFAULTS, "llm_match", "llm_judge_answer", "llm_judge_error")


@dataclass
class JudgeReport:
    judged_path: Path
    summary_path: Path
    overall: dict[str, Any]  # the summary's first line: every record judged in this scope
    resumed: int  # records kept from a previous run
    notes: list[str]  # what the user should know about the summary (no supports, questions not in the QA file)
    lines: list[dict[str, Any]]  # the whole summary: `overall`, then the support and --stratify lines


def earlier_verdicts(
    judged_path: Path, records: Sequence[dict[str, Any]], setup: dict[str, str], resume: bool
) -> dict[int, dict[str, Any]]:
    """The finished verdicts of a previous run (none without one); UserError if there is one and `resume` is
    off, or it asked otherwise: another judge model, response field or prompt (`setup`, keys of SETUP_DEFAULTS)."""
    if not judged_path.exists():
        return {}
    if not resume:
        raise UserError(f"{judged_path} exists; pass --resume to continue it, or delete it to judge again")
    done = {i: r for i, r in read_judged(judged_path, records).items() if r.get("llm_match") is not None}
    for key, value in setup.items():
        others = sorted({str(r.get(key, SETUP_DEFAULTS[key])) for r in done.values()} - {value})
        if others:
            raise UserError(
                f"{judged_path} was judged with {', '.join(others)}, not {value}; resume "
                f"with that {SETUP_OPTIONS[key]}, or delete the file to judge again"
            )
    return done


def append_verdicts(path: Path, judge_one: Callable[[int], dict], pending: Sequence[int], concurrency: int, done: dict):
    """Judge the `pending` records (`judge_one` on `concurrency` threads), appending each verdict to `path` as it
    arrives (flushed: a kill loses only the records in flight) and putting it in `done` by its index."""
    from tqdm import tqdm

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        with path.open("a", encoding="utf-8") as f:
            futures = [pool.submit(judge_one, i) for i in pending]
            for future in tqdm(as_completed(futures), total=len(futures), desc="judging", unit="record"):
                record = future.result()
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()  # on disk for a resume even if this process is killed next
                done[record["index"]] = record
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, ask nothing more


def merged_verdicts(records: Sequence[dict], done: dict[int, dict], setup: dict[str, str]) -> list[dict[str, Any]]:
    """Every verdict in input order, with this run's record fields (e.g. the supports a --qa join added) and the
    setup that earlier_verdicts found they share (which files of older versions do not name)."""
    return [{**records[i], **setup, **{k: done[i][k] for k in VERDICT_FIELDS if k in done[i]}} for i in sorted(done)]


def judge_file(
    input_path: str | Path,
    judge: GeminiJudge,
    output_dir: str | Path | None = None,
    concurrency: int = 8,
    resume: bool = False,
    stratify: Sequence[str] = (),
    qa: str | Path | None = None,
    support_thresholds: Sequence[int] | None = None,
    max_records: int | None = None,
    response_field: str = "parsed",
    prompt_file: str | Path | None = None,
) -> JudgeReport:
    """Judge the records of an eval_details file (the first `max_records` of them) and write the judged records
    (every verdict the file has, past `max_records` too) and their summary. `qa` and `support_thresholds` left None
    come from the run's config.yaml for a file of a run (judge_settings)."""
    if response_field not in RESPONSE_FIELDS:
        raise UserError(f"--response-field {response_field}: pick one of {', '.join(RESPONSE_FIELDS)}")
    template, prompt_id = load_prompt_template(prompt_file) if prompt_file else (RUBRIC, BUILT_IN_PROMPT)
    input_path = Path(input_path)
    settings, settings_note = judge_settings(input_path, qa, support_thresholds)
    records, notes = load_judge_input(input_path, settings["qa"], stratify, response_field)
    thresholds, note = support_thresholds_for(records, settings["support_thresholds"], input_path)
    scope = range(min(len(records), max_records or len(records)))
    judged_path, summary_path = output_paths(input_path, output_dir)
    setup = {"judge_model": judge.model, "judge_response_field": response_field, "judge_prompt": prompt_id}
    done = earlier_verdicts(judged_path, records, setup, resume)
    # Keep only the finished verdicts (drops old errors and a torn last line) before appending to the file.
    write_jsonl_atomic(judged_path, [done[i] for i in sorted(done)])
    resumed = sum(i in done for i in scope)

    def judge_one(index: int) -> dict[str, Any]:
        out = {**records[index], "index": index, **setup}
        prompt = judge_prompt(records[index], template, response_field)
        try:
            out["llm_match"], out["llm_judge_answer"] = judge.verdict(prompt)
        except JudgeError as e:
            out["llm_match"], out["llm_judge_answer"], out["llm_judge_error"] = None, None, str(e)
        return out

    append_verdicts(judged_path, judge_one, [i for i in scope if i not in done], concurrency, done)
    final = merged_verdicts(records, done, setup)
    write_jsonl_atomic(judged_path, final)
    summary = summarize_judged([r for r in final if r["index"] in scope], stratify, thresholds)
    summary[0] |= {
        "input": str(input_path),
        **setup,
        "judge_prompt_file": str(prompt_file) if prompt_file else None,
        **settings,
        "support_thresholds": thresholds,  # none where no record has supports (see the note)
    }
    write_jsonl_atomic(summary_path, summary)
    notes = [n for n in (settings_note, *notes, note) if n]
    return JudgeReport(judged_path, summary_path, summary[0], resumed, notes, summary)
