"""The `cbe` command: data and result tools beside `python main.py` (which trains).

    cbe download --track news [--corpus small] [--qa small] [--list]
    cbe format-news --input IN --output OUT [--overwrite] [--normalize] [--skip-bad]
    cbe rescore outputs/.../eval_details/valqa_step_001000.jsonl [--parser news]
"""
from __future__ import annotations

import argparse
import sys

from cbe.errors import UserError, exit_with
from cbe.eval.parse import PARSERS

SIZES = ("small", "medium", "large")


def download(args: argparse.Namespace) -> None:
    from cbe.data.download import download_track, list_files, load_recipe

    recipe = load_recipe()
    tracks = [args.track] if args.track else list(recipe)
    for track in tracks:
        if track not in recipe:
            raise UserError(f"unknown track {track!r}; data/download.yaml has {', '.join(recipe)}")
        if args.list:
            print(f"{recipe[track]['repo']}@{recipe[track]['revision']}:")
            print("\n".join(f"  {name}" for name in list_files(recipe, track)))
        else:
            placed = download_track(recipe, track, args.corpus, args.qa, args.data_dir)
            print(f"{track}: {len(placed)} files ready in {placed[0].parent}")


def format_news(args: argparse.Namespace) -> None:
    from cbe.data.format_news import format_news as run

    print(run(args.input, args.output, overwrite=args.overwrite, normalize=args.normalize,
              skip_bad=args.skip_bad).summary())


def rescore(args: argparse.Namespace) -> None:
    import json

    from cbe.data.jsonl import iter_jsonl
    from cbe.eval.metrics import score_answer, summarize

    fields = {"raw_prediction": (str,), "ground_truth": (str, int, float)}
    details = [{**r, **score_answer(r["raw_prediction"], str(r["ground_truth"]), PARSERS[args.parser])}
               for r in iter_jsonl(args.details, fields)]
    if not details:
        raise UserError(f"{args.details}: no records to rescore")
    print(json.dumps(summarize(details, args.support_thresholds)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbe", description="Data and result tools for cbe runs.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("download", help="download a track from the HuggingFace hub into data/<track>/")
    p.add_argument("--track", help="news or geminon (default: every track in data/download.yaml)")
    p.add_argument("--corpus", choices=SIZES, default="small", help="corpus size (default: small)")
    p.add_argument("--qa", choices=SIZES, default="small", help="QA set size (default: small)")
    p.add_argument("--list", action="store_true", help="list the files of the track's repo at its revision")
    p.add_argument("--data-dir", default="data", help="where tracks land (default: data)")
    p.set_defaults(run=download)

    p = commands.add_parser("format-news", help="render raw news articles as Title/Date/Article text")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
    p.add_argument("--normalize", action="store_true", help="clean scraped text: NFC, entities, control chars, spaces")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines and report them instead of stopping")
    p.set_defaults(run=format_news)

    p = commands.add_parser("rescore", help="recompute every metric of a saved eval_details file")
    p.add_argument("details", help="an eval_details/<set>_step_<N>.jsonl file")
    p.add_argument("--parser", choices=sorted(PARSERS), default="default", help="how to parse raw_prediction")
    p.add_argument("--support-thresholds", type=int, nargs="*", default=[], metavar="K",
                   help="also report questions with supports >= K")
    p.set_defaults(run=rescore)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        exit_with(e)
    except KeyboardInterrupt:
        exit_with("interrupted; finished files are in place and nothing half-written was left", code=130)


if __name__ == "__main__":
    sys.exit(main())
