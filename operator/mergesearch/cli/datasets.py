"""`mergesearch datasets pack`: build the data bundle a search's registry tasks read.

Run once on a machine with hub access (or with local copies of the data, `--source`), upload
the folder next to the checkpoints, and name it in `spec.objective.datasets.uri`. The layout is
documented in `mergerunner.bundle`; the runner reads exactly this folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergerunner.contract import ExitCode


def add_commands(sub: argparse._SubParsersAction) -> None:
    datasets = sub.add_parser("datasets", help="data bundles for lm-eval registry tasks")
    inner = datasets.add_subparsers(dest="datasets_command", required=True)
    pack = inner.add_parser(
        "pack", help="write a bundle holding the data of the named tasks or groups"
    )
    pack.add_argument("tasks", nargs="*", help="lm-eval task or group names")
    pack.add_argument("-o", "--output", type=Path, required=True, help="bundle folder")
    pack.add_argument(
        "--from-manifest",
        type=Path,
        help="take the tasks (held-in and held-out) and custom-task path of a MergeSearch",
    )
    pack.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="DATASET=DIR",
        help="build DATASET (e.g. openai/gsm8k) from local split files in DIR "
        "([CONFIG/]SPLIT.jsonl|parquet|csv) instead of downloading it; repeatable",
    )
    pack.add_argument("--nltk-source", type=Path, help="a local NLTK data folder to copy from")
    pack.add_argument("--include-path", type=Path, help="custom task YAMLs to resolve too")
    pack.set_defaults(func=cmd_pack)


def tasks_of_manifest(path: Path) -> tuple[list[str], Path | None]:
    """Every task a manifest names, and its custom-task folder (relative to the manifest)."""
    from mergesearch.spec import load_manifest

    manifest = load_manifest(path)
    objective = manifest.spec.objective
    names = [t.task for t in (*objective.held_in, *objective.held_out)]
    custom = objective.custom_tasks
    include = None
    if custom is not None and custom.path is not None:
        include = (path.resolve().parent / custom.path).resolve()
    return names, include


def parse_sources(items: list[str]) -> dict[str, Path]:
    sources = {}
    for item in items:
        dataset, sep, folder = item.partition("=")
        if not sep or not dataset or not folder:
            raise ValueError(f"--source {item!r}: expected DATASET=DIR")
        sources[dataset] = Path(folder)
    return sources


def cmd_pack(args: argparse.Namespace) -> int:
    from mergerunner.bundle import BundleError, pack, task_index
    from mergesearch.spec import SpecError

    try:
        tasks = list(args.tasks)
        include = args.include_path
        if args.from_manifest:
            from_manifest, custom = tasks_of_manifest(args.from_manifest)
            tasks += [t for t in from_manifest if t not in tasks]
            include = include or custom
        if not tasks:
            raise ValueError("name at least one task, or --from-manifest FILE")
        sources = parse_sources(args.source)
        manifest = pack(
            tasks,
            args.output,
            index=task_index(include),
            sources=sources,
            nltk_source=args.nltk_source,
        )
    except (BundleError, SpecError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    data = manifest.to_json()
    print(
        f"{args.output}: {len(data['tasks'])} task(s), {len(data['datasets'])} dataset(s), "
        f"{len(data['nltk'])} NLTK resource(s)"
    )
    for ref in data["datasets"]:
        print(f"  {ref['path']}" + (f" ({ref['name']})" if ref["name"] else ""))
    return ExitCode.OK
