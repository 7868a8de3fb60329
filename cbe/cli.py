"""The `cbe` command: data and result tools beside `python main.py` (which trains); `cbe <tool> --help` for each.

rescore, judge and plot also read what the benchmark's own harness writes (details files, JAX run dirs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cbe.errors import UserError, exit_with
from cbe.eval.parse import PARSERS

SIZES = ("small", "medium", "large")
DETAILS_HELP = "an eval_details/<set>_step_<N>.jsonl file, of cbe or the benchmark's harness"


def download(args: argparse.Namespace) -> None:
    """Download a track's files from the hub (or --list them)."""
    from cbe.data.download import download_track, files_to_fetch, list_files, load_recipe, source

    recipe = load_recipe()
    tracks = [args.track] if args.track else list(recipe)
    for track in tracks:  # every track and size is checked before any file moves
        if track not in recipe:
            raise UserError(f"unknown track {track!r}; data/download.yaml has {', '.join(recipe)}")
        if not args.list:
            files_to_fetch(recipe, track, args.corpus, args.qa)
    for track in tracks:
        if args.list:
            repo, revision = source(recipe, track, args.revision)
            print(f"{repo}@{revision}:")
            print("\n".join(f"  {name}" for name in list_files(recipe, track, args.revision)))
        else:
            placed = download_track(recipe, track, args.corpus, args.qa, args.data_dir, args.revision)
            print(f"{track}: {len(placed)} files ready in {placed[0].parent}")


def format_news(args: argparse.Namespace) -> None:
    """Render raw news articles as the benchmark's text and print what was done."""
    from cbe.data.format_news import format_news as run

    options = _options(args, "overwrite", "normalize", "skip_bad", "keep_untitled")
    print(run(args.input, args.output, **options).summary())


def make_stages(args: argparse.Namespace) -> None:
    """Cut a downloaded track into continual-learning stages."""
    from cbe.data.stages import TASK_DIR
    from cbe.data.stages import make_stages as run

    print(run(args.track, args.data_dir, args.by, args.stages, args.month, args.task_dir or TASK_DIR).summary())


def rescore(args: argparse.Namespace) -> None:
    """Recompute every metric of a details file; print them as JSON."""
    from cbe.eval.details import join_qa, load_details, markers_of, support_thresholds_for
    from cbe.eval.metrics import score_answer, summarize

    records = load_details(args.details, "rescore", predictions=("raw_prediction",))
    if args.qa:
        records, note = join_qa(records, args.qa, args.details)
        _note(note)
    thresholds, note = support_thresholds_for(records, args.support_thresholds, args.details)
    _note(note)
    markers = markers_of(args.details)  # the question marker of the run's prompt template
    details = []
    for r in records:
        gold, question = str(r["ground_truth"]), str(r.get("question", ""))
        details.append({**r, **score_answer(r["raw_prediction"], gold, args.parser, question, markers)})
    print(json.dumps(summarize(details, thresholds)))


def _note(text: str | None) -> None:
    """A line for the user beside the results (stderr, so stdout stays the results alone)."""
    if text:
        print(f"cbe: note: {text}", file=sys.stderr)


def _options(args: argparse.Namespace, *names: str) -> dict:
    """The named options, as keyword arguments of the same names."""
    return {name: getattr(args, name) for name in names}


def judge(args: argparse.Namespace) -> None:
    """Re-score a details file with a Gemini judge; print its summary (and write it, with --summary)."""
    from cbe.run import write_atomic

    report = _judge_records(args)
    for note in report.notes:
        _note(note)
    _print_judge_summary(report)
    if args.summary:  # the printed numbers, the files written and the strata, as one JSON file
        files = {"judged_file": str(report.judged_path), "summary_file": str(report.summary_path)}
        summary = {**report.overall, "resumed": report.resumed, **files, "strata": report.lines[1:]}
        write_atomic(args.summary, json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
        print(f"wrote {args.summary}")
    o = report.overall
    if o["errors"]:
        unjudged = f"{o['errors']} of {o['n']} records got no verdict (llm_judge_error in {report.judged_path})"
        exit_with(f"{unjudged}; rerun with --resume to retry them", code=1)


def _judge_records(args: argparse.Namespace):
    """Check judge's options, then judge the input file with one Gemini client per key (closed after)."""
    from cbe.eval.judge import GeminiJudge, judge_file, load_keys

    for option in ("concurrency", "max_attempts", "max_records"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} must be 1 or more, got {getattr(args, option)}")
    if not Path(args.input).is_file():
        raise UserError(f"{args.input}: no such file; pass an eval_details/<set>_step_<N>.jsonl file")
    requests = _options(args, "base_url", "timeout_seconds", "max_attempts", "retry_base_seconds")
    gemini = GeminiJudge(load_keys(args.keys_file), args.model, **requests)
    judging = ("concurrency", "resume", "stratify", "qa", "support_thresholds", "max_records", "response_field")
    try:
        return judge_file(args.input, gemini, args.output_dir, prompt_file=args.prompt_file, **_options(args, *judging))
    finally:
        gemini.close()


def _print_judge_summary(report) -> None:
    """The summary's first line (every record): the judge's rate beside the string metrics', and its flips."""
    o = report.overall

    def rate(name: str) -> str:
        return "n/a" if o[name] is None else f"{o[name]:.3f}"

    flips = ", ".join(
        f"{o[f'judge_yes_{m}_no']} up and {o[f'judge_no_{m}_yes']} down vs {m}" for m in ("exact", "substring", "fuzzy")
    )
    print(
        f"judged {o['judged']} of {o['n']} records ({report.resumed} from before): llm_match {rate('llm_match')}, "
        f"exact {rate('exact_match')}, substring {rate('substring_match')}, fuzzy {rate('fuzzy_match')}; "
        f"the judge flips {flips}"
    )
    print(f"wrote {report.judged_path} and {report.summary_path}")


def plot(args: argparse.Namespace) -> None:
    """Plot every run under a folder; print what each run has."""
    from cbe.plot import BENCHMARK_JAX, plot_folder

    path, runs = plot_folder(args.folder, args.metric, args.output)
    for run in runs:
        curve = f"{len(run.metric)} evaluations"
        if run.backend == BENCHMARK_JAX:
            curve = f"no {args.metric} curve (the benchmark's JAX runs keep only losses)"
        if run.stages:  # a staged run: its own figures show the metric per stage
            curve = f"{len(run.stages)} stages, {max(map(len, run.stage_metric.values()), default=0)} evaluations"
        print(
            f"{run.name} ({run.backend}): {curve}, {len(run.eval_loss)} eval-loss points, {len(run.train_loss)} "
            f"train-loss points from {run.train_loss_source}"
        )
    for figure in (figure for run in runs for figure in run.plots):  # a staged run's own figures
        print(f"wrote {figure}")
    print(f"wrote {path}")


def sweep_summary(args: argparse.Namespace) -> None:
    """(Re)write a multirun's summary and print its table."""
    from cbe.sweep import SUMMARY_FILE, format_table, summarize_sweep

    print(format_table(summarize_sweep(args.sweep_dir)))
    print(f"sweep summary: {args.sweep_dir.rstrip('/')}/{SUMMARY_FILE}")


def continual_summary(args: argparse.Namespace) -> None:
    """Print and save a staged run's continual-learning summary."""
    from cbe.continual import continual_summary, save_continual_summary

    summary, notes = continual_summary(args.run_dir)
    save_continual_summary(args.run_dir, summary)
    for note in notes:
        _note(note)
    print(json.dumps(summary))


def retention_set(args: argparse.Namespace) -> None:
    """Write the retention QA set: the questions the base model answers exactly."""
    from cbe.continual import build_retention_set

    print(build_retention_set(args.details, args.qa, args.output))


def add_strata_options(p: argparse.ArgumentParser, verb: str, from_run: bool = False) -> None:
    """--support-thresholds and --qa of rescore and judge; `from_run`: not given (None), the run's config.yaml's."""
    run_default = " (default: the run's config.yaml, for a file in a run's eval_details/)" if from_run else ""
    p.add_argument(
        "--support-thresholds",
        type=int,
        nargs="*",
        default=None if from_run else [],
        metavar="K",
        help=f"also {verb} the questions with supports >= K{run_default}",
    )
    p.add_argument(
        "--qa",
        metavar="QA_FILE",
        help="join supports and ids from this QA file by question text "
        f"(for details files without them, e.g. the benchmark harness's){run_default}",
    )


def _data_parsers(commands) -> None:
    p = commands.add_parser("download", help="download a track from the HuggingFace hub into data/<track>/")
    p.add_argument("--track", help="news or geminon (default: every track in data/download.yaml)")
    p.add_argument("--corpus", choices=SIZES, default="small", help="corpus size (default: small)")
    p.add_argument("--qa", choices=SIZES, default="small", help="QA set size (default: small; geminon has no large)")
    p.add_argument(
        "--revision",
        help="a tag, branch or commit of the hub repo, e.g. main for the latest files "
        "(default: the pin in data/download.yaml)",
    )
    p.add_argument("--list", action="store_true", help="list the files of the track's repo at its revision")
    p.add_argument("--data-dir", default="data", help="where tracks land (default: data)")
    p.set_defaults(run=download)

    p = commands.add_parser(
        "format-news",
        help="render raw news articles as Title/Date/Article text, "
        "as the benchmark does (dates as 'Sep 01 (2025-09-01 00:00:00 UTC)', untitled dropped)",
    )
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument(
        "--keep-untitled",
        action="store_true",
        help="keep untitled articles, without a Title line (the benchmark drops them)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
    p.add_argument("--normalize", action="store_true", help="clean scraped text: NFC, entities, control chars, spaces")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines and report them instead of stopping")
    p.set_defaults(run=format_news)

    p = commands.add_parser(
        "make-stages",
        help="cut a downloaded track into stages for continual learning: data/<task>/<stage>/, "
        "data/<task>/manifest.json and the task conf/task/<task>.yaml (task=news_weekly, ...)",
    )
    p.add_argument("--track", required=True, choices=("news", "geminon"))
    p.add_argument(
        "--by",
        choices=("week", "month"),
        help="news: weeks w1..w4 (days 1-7, 8-14, 15-21, 22-end; the default) or the month, m1",
    )
    p.add_argument("--stages", type=int, metavar="N", help="geminon: N groups of creatures, s1..sN")
    p.add_argument("--month", metavar="YYYY-MM", help="news: the month to cut (default: 2025-09, when it was crawled)")
    p.add_argument("--data-dir", default="data", help="where the track is and the stages go (default: data)")
    p.add_argument("--task-dir", help="where the task config goes (default: this checkout's conf/task)")
    p.set_defaults(run=make_stages)


def _result_parsers(commands) -> None:
    p = commands.add_parser("rescore", help="recompute every metric of a saved eval_details file")
    p.add_argument("details", help=DETAILS_HELP)
    p.add_argument("--parser", choices=sorted(PARSERS), default="default", help="how to parse raw_prediction")
    add_strata_options(p, "report")
    p.set_defaults(run=rescore)

    p = commands.add_parser("sweep-summary", help="(re)write a multirun's sweep_summary.jsonl and print its table")
    p.add_argument("sweep_dir", help="the sweep's folder: outputs/<project>/<run_name>/ holding one folder per job")
    p.set_defaults(run=sweep_summary)

    p = commands.add_parser(
        "continual-summary",
        help="print and write (metrics/continual_summary.json) a staged run's ACC, BWT, forgetting and FWT "
        "with 95%% CIs, its accuracy matrices and the retention of what the base model knew",
    )
    p.add_argument("run_dir", help="a staged run's dir (its task lists data.stages): metrics/stage_matrix.jsonl")
    p.set_defaults(run=continual_summary)

    p = commands.add_parser(
        "retention-set",
        help="a general-knowledge retention QA set (continual.retention_qa_path): the questions of a QA file "
        "the base model answers exactly",
    )
    p.add_argument(
        "--details",
        required=True,
        help="the details of the base model on the QA file: "
        "main.py mode=eval checkpoint=base eval.qa_data=QA eval.save_details=THIS",
    )
    p.add_argument("--qa", required=True, help="the QA file evaluated")
    p.add_argument("--output", required=True, help="the retention QA file to write")
    p.set_defaults(run=retention_set)


def _judge_parser(commands) -> None:
    p = commands.add_parser("judge", help="re-score an eval_details file with a Gemini judge (paraphrases count)")
    p.add_argument("--input", required=True, help=DETAILS_HELP)
    p.add_argument("--model", default="gemini-2.5-flash-lite", help="the judge model (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="keep the verdicts of an earlier run, judge the rest")
    p.add_argument(
        "--output-dir", help="where <name>_llm_judged.jsonl and <name>_summary.jsonl go (default: beside the input)"
    )
    p.add_argument(
        "--stratify",
        action="append",
        default=[],
        metavar="FIELD",
        help="also summarize per value of this record field, e.g. geminon_name (repeatable)",
    )
    add_strata_options(p, "summarize", from_run=True)
    p.add_argument("--max-records", type=int, metavar="N", help="judge only the first N records")
    p.add_argument(
        "--response-field",
        choices=("parsed", "raw"),
        default="parsed",
        help="judge each record's parsed answer (parsed_prediction, what the metrics scored) or its raw "
        "generation (raw_prediction) (default: %(default)s)",
    )
    p.add_argument(
        "--prompt-file",
        metavar="PROMPT_FILE",
        help="a judge prompt template instead of the built-in one, with the placeholders {question}, "
        "{ground_truth} and {prediction} ({{ and }} for literal braces); the judge must reply 1 or 0",
    )
    p.add_argument(
        "--summary",
        metavar="JSON_FILE",
        help="also write the summary the command prints (and the strata) to this JSON file, atomically",
    )
    p.add_argument(
        "--keys-file",
        help="API keys, one per line, used round-robin (default: secrets/gemini_keys.txt "
        "if present, else GEMINI_API_KEY or GOOGLE_API_KEY)",
    )
    p.add_argument("--base-url", help="another endpoint for the Gemini API (a proxy, or a local stand-in in tests)")
    p.add_argument("--timeout-seconds", type=float, default=60, help="per request (default: %(default)s)")
    p.add_argument(
        "--max-attempts", type=int, default=6, help="tries per record on 429, 5xx and timeouts (default: %(default)s)"
    )
    p.add_argument(
        "--retry-base-seconds",
        type=float,
        default=1.0,
        help="first backoff; doubles per retry, with jitter (default: %(default)s)",
    )
    p.set_defaults(run=judge)


def _plot_parser(commands) -> None:
    p = commands.add_parser(
        "plot",
        help="plot a metric, eval loss and train loss of every run under a folder "
        "(cbe's runs, and the benchmark harness's JAX runs: losses only)",
    )
    p.add_argument("folder", help="a folder of runs, e.g. outputs/<project>/<task>")
    p.add_argument(
        "--metric",
        default="valqa_fuzzy_match",
        help="any eval_results.jsonl key, e.g. valqa_substring_match (default: %(default)s)",
    )
    p.add_argument("--output", help="the PNG to write (default: <folder>/runs_plot.png)")
    p.set_defaults(run=plot)


def export(args: argparse.Namespace) -> None:
    """Write a checkpoint as an HF model dir; upload it with --push-to-hub."""
    from cbe.export import export_checkpoint

    options = _options(args, "merge_lora", "dtype", "overrides", "overwrite")
    out = export_checkpoint(args.checkpoint, args.out, **options)
    print(f"wrote {out}")
    if args.push_to_hub:
        from cbe.publish import push_folder

        print(f"uploaded to {push_folder(out, args.push_to_hub, private=args.private)}")


def add_checkpoint_arguments(p: argparse.ArgumentParser, dtype_of: str) -> None:
    """CHECKPOINT, its config overrides and --dtype, of export and lm-eval (the checkpoint loads as mode=eval does)."""
    p.add_argument("checkpoint", help="a checkpoints/<name> dir, <run>/checkpoints/latest, or base (the base model)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="config overrides as main.py takes them, applied after the run's own (for base: model=gemma3_1b, ...)",
    )
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32", help=f"{dtype_of} (default: %(default)s)")


def _export_parser(commands) -> None:
    p = commands.add_parser(
        "export",
        help="write any checkpoint (HF or KD, full or LoRA) as a standard HF model dir: config, safetensors, "
        "tokenizer; a LoRA one as a PEFT adapter dir, or merged with --merge-lora",
    )
    add_checkpoint_arguments(p, "the weights' dtype")
    p.add_argument("--out", required=True, help="the dir to write (refused if it exists, unless --overwrite)")
    p.add_argument("--merge-lora", action="store_true", help="fold a LoRA adapter into the weights: a whole model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the dir to this hub model repo (HF_TOKEN's)")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.set_defaults(run=export)


def lm_eval(args: argparse.Namespace) -> None:
    """Score a checkpoint with lm-evaluation-harness; print the scores and where they went."""
    from cbe.lm_eval import RESULTS, evaluate_checkpoint, format_scores

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    for option in ("limit", "batch_size"):
        if isinstance(getattr(args, option), int) and getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} must be 1 or more, got {getattr(args, option)}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    options = _options(args, "limit", "num_fewshot", "include_path", "batch_size", "device", "dtype", "overrides")
    out = evaluate_checkpoint(args.checkpoint, tasks, **options)
    print(format_scores(json.loads((out / RESULTS).read_text())))
    print(f"results: {out / RESULTS}")


def _batch_size(text: str) -> int | str:
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"an int or auto, not {text!r}")
    return text if text == "auto" else int(text)


def _lm_eval_parser(commands) -> None:
    p = commands.add_parser(
        "lm-eval",
        help="score a checkpoint with lm-evaluation-harness (exported as an HF model, LoRA merged); results go to "
        "<run>/eval/<checkpoint>/lm-eval-<hash>/results.json, one dir per set of settings",
    )
    add_checkpoint_arguments(p, "the exported weights' dtype")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval task, group or tag names: the bundled cbe_general_mc (offline), lm-eval's "
        "own (arc_easy, hellaswag, ...: their data comes from the hub) or those of --include-path",
    )
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N questions of each task")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="examples before each question (default: the task's)")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a dir of your own lm-eval task YAMLs (repeatable); their relative data_files resolve against the "
        "current dir, as lm-eval resolves them",
    )
    p.add_argument(
        "--batch-size", type=_batch_size, default=8, metavar="B", help="an int or auto (default: %(default)s)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda where there is one, else cpu)")
    p.set_defaults(run=lm_eval)


def build_parser() -> argparse.ArgumentParser:
    """The `cbe` parser: one subcommand per tool, added by the functions above in `cbe --help`'s order."""
    parser = argparse.ArgumentParser(prog="cbe", description="Data and result tools for cbe runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    _data_parsers(commands)
    _result_parsers(commands)
    _judge_parser(commands)
    _plot_parser(commands)
    _export_parser(commands)
    _lm_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one `cbe` subcommand; a user mistake exits with one line, not a traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Config overrides (key=value) may follow the options, where argparse alone would not take them.
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        args.run(args)
    except UserError as e:
        exit_with(e)
    except KeyboardInterrupt:
        exit_with("interrupted; finished files are in place and nothing half-written was left", code=130)


if __name__ == "__main__":
    sys.exit(main())
