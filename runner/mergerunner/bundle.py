"""Data bundles: everything lm-eval's registry tasks read at run time, in one directory tree.

A trial pod (and a local search) never reaches a hub: `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` are
forced. Registry tasks such as gsm8k, mbpp, ifeval or the leaderboard_musr group still need their
data, so a user builds a bundle once on a machine with hub access (`mergesearch datasets pack`),
uploads it next to the checkpoints, and names it in `spec.objective.datasets.uri`. The runner
fetches it into the verified cache like a checkpoint and points the libraries at it.

Layout (`BUNDLE_VERSION` 1)::

    mergesearch-bundle.json   what is inside: tasks, datasets, NLTK resources, library versions
    datasets/                 HF_DATASETS_CACHE: the `datasets` library's own cache layout,
                              <namespace>___<name>/<config>/<version>/<hash>/{dataset_info.json,
                              <name>-<split>.arrow}
    nltk_data/                NLTK_DATA: e.g. tokenizers/punkt_tab (ifeval)
    hf/                       HF_HOME (hub and module caches; empty unless a metric needs one)

Why the datasets *cache* layout rather than `save_to_disk`: it is what `datasets.load_dataset`
reads by itself in offline mode (its `cache` module), so lm-eval's own task definitions run
unchanged — `dataset_path: openai/gsm8k`, `dataset_name: main` resolve from the bundle with no
patched loader and no rewritten task config. `save_to_disk` output can only be read with
`load_from_disk`, which lm-eval never calls: every task would need its loader replaced. The cost
is that the cache layout belongs to the `datasets` major version that wrote it, so the manifest
records that version and the runner refuses a bundle written by another major version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergerunner.trial import FailureKind, TrialError

BUNDLE_MANIFEST = "mergesearch-bundle.json"
BUNDLE_VERSION = 1
DATASETS_DIR = "datasets"
NLTK_DIR = "nltk_data"
HF_HOME_DIR = "hf"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Tasks whose code reads NLTK data at import (lm-eval's ifeval downloads it when missing).
NLTK_NEEDS: Mapping[str, tuple[str, ...]] = {"ifeval": ("tokenizers/punkt_tab",)}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


class BundleError(TrialError):
    """A bundle that is missing, unreadable, of another version, or lacks what a task needs."""

    failure_kind = FailureKind.DATA_MISSING


@dataclass(frozen=True)
class DatasetRef:
    """One Hugging Face dataset (repository id and configuration) a task loads."""

    path: str
    name: str | None = None

    @property
    def config(self) -> str:
        return self.name or "default"

    @property
    def cache_dir_name(self) -> str:
        """`openai/gsm8k` -> `openai___gsm8k`: the datasets library's directory for it."""
        from datasets.naming import camelcase_to_snakecase

        parts = self.path.split("/")
        parts[-1] = camelcase_to_snakecase(parts[-1])
        return "___".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name}


@dataclass(frozen=True)
class TaskNeeds:
    """What a task (or every leaf of a group) reads at run time."""

    task: str
    leaves: tuple[str, ...]
    datasets: tuple[DatasetRef, ...]
    nltk: tuple[str, ...] = ()
    unsafe_code: tuple[str, ...] = ()  # leaves that execute generated code


@dataclass
class BundleManifest:
    version: int = BUNDLE_VERSION
    datasets_version: str = ""
    tasks: list[str] = field(default_factory=list)
    datasets: list[DatasetRef] = field(default_factory=list)
    nltk: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "datasetsVersion": self.datasets_version,
            "tasks": sorted(set(self.tasks)),
            "datasets": [d.to_json() for d in sorted(set(self.datasets), key=_ref_key)],
            "nltk": sorted(set(self.nltk)),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> BundleManifest:
        try:
            return cls(
                version=int(data["version"]),
                datasets_version=str(data.get("datasetsVersion", "")),
                tasks=[str(t) for t in data.get("tasks", [])],
                datasets=[DatasetRef(str(d["path"]), d.get("name")) for d in data["datasets"]],
                nltk=[str(n) for n in data.get("nltk", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: malformed {BUNDLE_MANIFEST}: {exc}") from None


def _ref_key(ref: DatasetRef) -> tuple[str, str]:
    return (ref.path, ref.name or "")


# --------------------------------------------------------------------------- task resolution


def _leaf_dataset(cfg: Mapping[str, Any]) -> DatasetRef | None:
    """The hub dataset a leaf task loads, or None for local files (`json` + data_files)."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path:
        return None
    kwargs = cfg.get("dataset_kwargs") or {}
    if "/" not in path and (kwargs.get("data_files") or kwargs.get("data_dir")):
        return None  # a packaged builder (json, csv, parquet) reading files beside the YAML
    if Path(path).is_absolute():
        return None
    name = cfg.get("dataset_name")
    return DatasetRef(path, str(name) if name is not None else None)


def task_needs(index: Mapping[str, Any], name: str) -> TaskNeeds:
    """Resolve a task or group name against lm-eval's task index (its `Entry` objects, whose
    `cfg` is the parsed YAML with includes merged and functions unresolved): the leaf tasks, the
    datasets they read, and whether they run generated code. Nothing is built or downloaded.

    Raises KeyError naming the first unknown name (a group's member included).
    """
    leaves: list[str] = []
    datasets: list[DatasetRef] = []
    unsafe: list[str] = []

    def visit(child: Any) -> None:
        if isinstance(child, Mapping):
            inner = child.get("task")
            if "group" in child or isinstance(inner, list):  # an inline group: its members
                for item in inner or []:
                    visit(item)
                return
            base = index.get(inner) if isinstance(inner, str) else None
            _leaf(str(inner), {**((base.cfg or {}) if base is not None else {}), **child})
            return
        entry = index.get(child)
        if entry is None:
            raise KeyError(child)
        cfg = dict(entry.cfg or {})
        kind = getattr(entry.kind, "name", "")
        if kind == "TAG":
            for member in sorted(entry.tags):
                visit(member)
            return
        if kind == "GROUP":
            for member in cfg.get("task") or []:
                visit(member)
            return
        _leaf(child, cfg)

    def _leaf(leaf: str, cfg: Mapping[str, Any]) -> None:
        leaves.append(leaf)
        ref = _leaf_dataset(cfg)
        if ref is not None and ref not in datasets:
            datasets.append(ref)
        if cfg.get("unsafe_code"):
            unsafe.append(leaf)

    visit(name)
    nltk = tuple(sorted({r for leaf in leaves for r in NLTK_NEEDS.get(leaf, ())}))
    return TaskNeeds(name, tuple(leaves), tuple(datasets), nltk, tuple(unsafe))


def task_index(include_path: Path | None = None) -> Mapping[str, Any]:
    """lm-eval's index of its own tasks (and custom ones), without building any task."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    return manager.task_index


# --------------------------------------------------------------------------- reading a bundle


def read_manifest(root: Path) -> BundleManifest:
    path = Path(root) / BUNDLE_MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{root}: not a data bundle (no {BUNDLE_MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable: {exc}") from None
    manifest = BundleManifest.from_json(data, str(path))
    if manifest.version != BUNDLE_VERSION:
        raise BundleError(
            f"{path}: bundle version {manifest.version}; this runner reads version "
            f"{BUNDLE_VERSION} (rebuild it with mergesearch datasets pack)"
        )
    return manifest


def _major(version: str) -> str:
    return version.split(".")[0]


def check_compatible(manifest: BundleManifest, root: Path) -> None:
    """The datasets cache layout is the datasets library's: refuse another major version's."""
    from importlib.metadata import version

    ours = version("datasets")
    if manifest.datasets_version and _major(manifest.datasets_version) != _major(ours):
        raise BundleError(
            f"{root}: bundle written by datasets {manifest.datasets_version}, this runner has "
            f"datasets {ours}; rebuild the bundle with a matching mergesearch release",
            kind=FailureKind.CONFIG,
        )


def missing_for(needs: TaskNeeds, manifest: BundleManifest, root: Path) -> list[str]:
    """What `needs` lacks in the bundle, one readable line each (empty when complete)."""
    have = set(manifest.datasets)
    problems = []
    for ref in needs.datasets:
        if ref not in have and DatasetRef(ref.path, None) not in have:
            where = f"{ref.path}" + (f" ({ref.name})" if ref.name else "")
            problems.append(f"task {needs.task!r}: dataset {where} is not in the bundle {root}")
        elif not (Path(root) / DATASETS_DIR / ref.cache_dir_name).is_dir():
            problems.append(
                f"task {needs.task!r}: the bundle's manifest lists {ref.path} but "
                f"{DATASETS_DIR}/{ref.cache_dir_name} is absent"
            )
    for resource in needs.nltk:
        if not (Path(root) / NLTK_DIR / resource).exists():
            problems.append(
                f"task {needs.task!r}: NLTK resource {resource} is not in the bundle {root}"
            )
    return problems


def activate(root: Path, environ: MutableMapping[str, str] | None = None) -> None:
    """Point the datasets library, NLTK and the hub client at the bundle; force offline mode.

    The bundle is only read. The datasets library writes a lock file beside every dataset it
    loads from its cache, and HF_HOME gets its module cache, so both point at a scratch mirror
    of the bundle's tree: the same directories, holding symbolic links to the bundle's files
    (a few dozen links for the paper's suite; no data is copied). A bundle on a read-only
    volume then works, pods sharing one node cache do not write into each other's copy, and
    the verified cache stays as it was fetched. NLTK only reads its directory.

    The libraries read these variables at import; when one is already imported (a local search
    that loaded lm-eval for another reason), its module-level settings are updated as well.
    """
    env = os.environ if environ is None else environ
    root = Path(root).resolve()
    scratch = _scratch_for(root)
    datasets_cache = _mirror(root / DATASETS_DIR, scratch / DATASETS_DIR)
    env["HF_DATASETS_CACHE"] = str(datasets_cache)
    env["NLTK_DATA"] = str(root / NLTK_DIR)
    env["HF_HOME"] = str(_mirror(root / HF_HOME_DIR, scratch / HF_HOME_DIR))
    env.update(OFFLINE_ENV)
    if environ is not None:
        return
    import sys

    if "datasets" in sys.modules:
        import datasets.config as dconfig

        dconfig.HF_DATASETS_CACHE = datasets_cache
        dconfig.HF_HUB_OFFLINE = True
        dconfig.HF_DATASETS_OFFLINE = True
    if "nltk" in sys.modules:
        import nltk

        if str(root / NLTK_DIR) not in nltk.data.path:
            nltk.data.path.insert(0, str(root / NLTK_DIR))


# One private scratch directory per bundle and process (mkdtemp: mode 0700, an unpredictable
# name, so no other user of the machine can plant links in it).
_SCRATCH: dict[Path, Path] = {}


def _scratch_for(root: Path) -> Path:
    if root not in _SCRATCH:
        _SCRATCH[root] = Path(tempfile.mkdtemp(prefix="mergesearch-bundle-"))
    return _SCRATCH[root]


def _mirror(source: Path, target: Path) -> Path:
    """`target`: `source`'s directories, with a symbolic link to each of its files."""
    target.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        return target
    for directory, subdirs, files in os.walk(source):
        here = target / Path(directory).relative_to(source)
        for name in subdirs:
            (here / name).mkdir(exist_ok=True)
        for name in files:
            link = here / name
            if not link.is_symlink():
                link.symlink_to(Path(directory) / name)
    return target


# --------------------------------------------------------------------------- writing a bundle


def _split_files(directory: Path) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in DATA_SUFFIXES:
            files.setdefault(path.stem.split("-")[0], []).append(str(path))
    return files


def _content_hash(paths: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def build_from_files(ref: DatasetRef, source: Path, datasets_dir: Path) -> Path:
    """Write one dataset configuration into the bundle from local split files, in the cache
    layout `load_dataset(ref.path, ref.name)` produces with hub access.

    `source` holds `<split>.jsonl|json|parquet|csv` (optionally `<split>-00000-of-00001.*`), or
    a sub-folder named after the configuration holding them — the shape of a hub repository.
    """
    folder = source / ref.config if (source / ref.config).is_dir() else source
    files = _split_files(folder)
    if not files:
        raise BundleError(f"{folder}: no split files ({', '.join(DATA_SUFFIXES)}) for {ref.path}")
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    suffix = Path(next(iter(files.values()))[0]).suffix
    module = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[suffix]
    builder_cls = _import_builder(_PACKAGED_DATASETS_MODULES[module][0])
    short = ref.path.split("/")[-1]
    content = _content_hash(p for paths in files.values() for p in paths)
    with tempfile.TemporaryDirectory(prefix="bundle-build-") as tmp:
        builder = builder_cls(
            cache_dir=tmp,
            dataset_name=short,
            config_name=ref.config,
            hash=content,
            data_files=DataFilesDict.from_patterns(files),
        )
        builder.download_and_prepare()
        built = Path(builder.cache_dir)
        info_path = built / "dataset_info.json"
        info = json.loads(info_path.read_text())
        info["config_name"] = ref.config
        info_path.write_text(json.dumps(info))
        target = datasets_dir / ref.cache_dir_name / ref.config / built.parent.name / content
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built, target, ignore=shutil.ignore_patterns("*.lock"))
    return target


def _import_builder(module_name: str) -> Any:
    import importlib
    import inspect

    import datasets

    module = importlib.import_module(module_name)
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, datasets.DatasetBuilder) and obj.__module__ == module.__name__:
            return obj
    raise BundleError(f"no dataset builder in {module_name}")


def download_to_bundle(ref: DatasetRef, datasets_dir: Path) -> None:
    """With hub access: let `load_dataset` write its own cache into the bundle."""
    import datasets

    datasets.load_dataset(ref.path, ref.name, cache_dir=str(datasets_dir))
    shutil.rmtree(datasets_dir / "downloads", ignore_errors=True)


def copy_nltk(resource: str, nltk_dir: Path, source: Path | None) -> None:
    """An NLTK resource from a local NLTK data folder, else downloaded (with hub access)."""
    target = nltk_dir / resource
    if source is not None:
        found = source / resource
        if not found.exists():
            raise BundleError(f"{source}: no NLTK resource {resource}")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(found, target)
        return
    import nltk

    if not nltk.download(resource.split("/")[-1], download_dir=str(nltk_dir), quiet=True):
        raise BundleError(f"could not download NLTK resource {resource}")
    for archive in nltk_dir.rglob("*.zip"):
        archive.unlink()


def pack(
    tasks: Sequence[str],
    out: Path,
    *,
    index: Mapping[str, Any],
    sources: Mapping[str, Path] | None = None,
    nltk_source: Path | None = None,
) -> BundleManifest:
    """Build (or extend) the bundle at `out` for `tasks` (task or group names).

    `sources` maps a dataset path (`openai/gsm8k`) to a local folder of split files to build it
    from; datasets without a source are downloaded with `load_dataset` (needs hub access).
    """
    from importlib.metadata import version

    out = Path(out)
    (out / DATASETS_DIR).mkdir(parents=True, exist_ok=True)
    (out / NLTK_DIR).mkdir(exist_ok=True)
    (out / HF_HOME_DIR).mkdir(exist_ok=True)
    manifest = read_manifest(out) if (out / BUNDLE_MANIFEST).exists() else BundleManifest()
    manifest.datasets_version = version("datasets")
    sources = dict(sources or {})
    for name in tasks:
        try:
            needs = task_needs(index, name)
        except KeyError as exc:
            raise BundleError(
                f"unknown lm-eval task or group {exc.args[0]!r} (in {name!r})",
                kind=FailureKind.UNKNOWN_TASK,
            ) from None
        for ref in needs.datasets:
            if ref.path in sources:
                build_from_files(ref, Path(sources[ref.path]), out / DATASETS_DIR)
            else:
                download_to_bundle(ref, out / DATASETS_DIR)
            if ref not in manifest.datasets:
                manifest.datasets.append(ref)
        for resource in needs.nltk:
            copy_nltk(resource, out / NLTK_DIR, nltk_source)
            manifest.nltk.append(resource)
        manifest.tasks.append(name)
    (out / BUNDLE_MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    return read_manifest(out)
