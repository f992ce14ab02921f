"""The fetch module's pure core: cache keys, what to fetch, when a cached copy is current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergerunner.fetch import (
    INDEX_FILE,
    WEIGHTS_FILE,
    FetchError,
    RemoteObject,
    cache_key,
    fetch_checkpoint,
    fetch_checkpoint_result,
    is_aux_file,
    is_current,
    manifest_entry,
    md5_expected,
    normalise_etag,
    part_ranges,
    plan_checkpoint,
    shard_names,
)
from mergerunner.storage import StorageConfig, parse_uri

pytestmark = pytest.mark.unit

AUX = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


# --- cache keys -----------------------------------------------------------------------------


def test_cache_key_is_stable_across_spellings() -> None:
    config = StorageConfig(endpoint="http://a:1")
    keys = {cache_key(parse_uri(u), config) for u in ("s3://b/x/y", "s3://b/x/y/", "s3://b//x/y")}
    assert len(keys) == 1
    (key,) = keys
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)


def test_cache_key_separates_prefixes_endpoints_and_schemes() -> None:
    a = StorageConfig(endpoint="http://a:1")
    b = StorageConfig(endpoint="http://b:1")
    keys = [
        cache_key(parse_uri("s3://b/x/"), a),
        cache_key(parse_uri("s3://b/x/"), b),
        cache_key(parse_uri("s3://b/xy/"), a),
        cache_key(parse_uri("gs://b/x/"), a),
    ]
    assert len(set(keys)) == len(keys)


# --- which files a checkpoint needs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("config.json", True),
        ("tokenizer.json", True),
        ("tokenizer.model", True),
        ("merges.txt", True),
        ("chat_template.jinja", True),
        ("special_tokens_map.json", True),
        ("pytorch_model.bin", False),
        ("training_args.bin", False),
        ("optimizer.pt", False),
        ("rng_state.pth", False),
        ("state.pkl", False),
        ("model.ckpt", False),
        ("modeling_custom.py", False),
        ("adapter_model.safetensors", False),
        (INDEX_FILE, False),
        ("sub/config.json", False),
    ],
)
def test_aux_file_selection_never_takes_pickles(name: str, wanted: bool) -> None:
    assert is_aux_file(name) is wanted


def test_single_file_plan_takes_weights_and_aux_only() -> None:
    names = [WEIGHTS_FILE, *AUX, "pytorch_model.bin", "optimizer.pt", "README.md"]
    plan = plan_checkpoint("s3://b/x/", names, None)
    assert plan[0] == WEIGHTS_FILE
    assert sorted(plan) == sorted([WEIGHTS_FILE, *AUX])


def test_single_file_wins_over_index() -> None:
    names = [WEIGHTS_FILE, INDEX_FILE, "model-00001-of-00002.safetensors", *AUX]
    assert plan_checkpoint("u", names, None) == [WEIGHTS_FILE, *sorted(AUX)]


def test_sharded_plan_takes_index_and_named_shards() -> None:
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    names = [INDEX_FILE, *shards, "stray.safetensors", *AUX]
    plan = plan_checkpoint("u", names, shards)
    assert plan[:2] == shards
    assert set(plan) == {INDEX_FILE, *shards, *AUX}


def test_missing_shard_is_named() -> None:
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with pytest.raises(FetchError) as caught:
        plan_checkpoint("s3://b/x/", [INDEX_FILE, shards[0]], shards)
    assert caught.value.kind == "invalid-checkpoint"
    assert "model-00002-of-00002.safetensors" in str(caught.value)
    assert "s3://b/x/" in str(caught.value)


def test_not_a_safetensors_checkpoint() -> None:
    with pytest.raises(FetchError) as caught:
        plan_checkpoint("s3://b/x/", ["pytorch_model.bin", "config.json"], None)
    assert caught.value.kind == "invalid-checkpoint"
    assert "not a safetensors checkpoint" in str(caught.value)
    assert "pytorch_model.bin" in str(caught.value)


def index_text(weight_map: object) -> str:
    return json.dumps({"metadata": {"total_size": 8}, "weight_map": weight_map})


def test_shard_names_deduplicated_and_sorted() -> None:
    text = index_text({"a": "s-2.safetensors", "b": "s-1.safetensors", "c": "s-2.safetensors"})
    assert shard_names("u", text) == ["s-1.safetensors", "s-2.safetensors"]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        b"\x80\x81 not utf-8",
        json.dumps({"no": "weight_map"}),
        index_text({}),
        index_text({"a": "../../outside.safetensors"}),
        index_text({"a": "sub/dir.safetensors"}),
        index_text({"a": "weights.bin"}),
    ],
)
def test_hostile_or_broken_index_is_rejected(text: str | bytes) -> None:
    with pytest.raises(FetchError) as caught:
        shard_names("s3://b/x/", text)
    assert caught.value.kind == "invalid-checkpoint"


# --- when a cached copy is current ----------------------------------------------------------


class FakeStat:
    """Just the two fields `is_current` reads."""

    def __init__(self, size: int, mtime_ns: int) -> None:
        self.st_size = size
        self.st_mtime_ns = mtime_ns


def remote(etag: str | None = "abc", size: int = 10) -> RemoteObject:
    return RemoteObject("model.safetensors", size, etag, "2026-01-01T00:00:00+00:00")


def test_current_when_remote_and_local_unchanged() -> None:
    entry = manifest_entry(remote(), mtime_ns=5)
    assert is_current(entry, remote(), FakeStat(10, 5))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now_remote", "local"),
    [
        (remote(etag="changed"), FakeStat(10, 5)),
        (remote(size=11), FakeStat(10, 5)),
        (remote(), FakeStat(9, 5)),  # truncated locally
        (remote(), FakeStat(10, 6)),  # rewritten locally
        (remote(), None),  # deleted locally
    ],
)
def test_not_current_when_anything_changed(now_remote: RemoteObject, local: object) -> None:
    entry = manifest_entry(remote(), mtime_ns=5)
    assert not is_current(entry, now_remote, local)  # type: ignore[arg-type]


def test_without_etag_the_modification_time_decides() -> None:
    entry = manifest_entry(remote(etag=None), mtime_ns=5)
    later = RemoteObject("model.safetensors", 10, None, "2026-02-01T00:00:00+00:00")
    assert is_current(entry, remote(etag=None), FakeStat(10, 5))  # type: ignore[arg-type]
    assert not is_current(entry, later, FakeStat(10, 5))  # type: ignore[arg-type]


def test_no_manifest_entry_is_never_current() -> None:
    assert not is_current(None, remote(), FakeStat(10, 5))  # type: ignore[arg-type]


def test_md5_only_for_single_part_etags() -> None:
    md5 = "0123456789abcdef0123456789abcdef"
    assert md5_expected(remote(etag=md5), enabled=True) == md5
    assert md5_expected(remote(etag=md5 + "-3"), enabled=True) is None
    assert md5_expected(remote(etag="CJ+3zv7x"), enabled=True) is None
    assert md5_expected(remote(etag=md5), enabled=False) is None


def test_etag_normalisation() -> None:
    assert normalise_etag('"abc"') == "abc"
    assert normalise_etag('W/"abc"') == "abc"
    assert normalise_etag(None) is None
    assert normalise_etag('""') is None


def test_part_ranges_cover_exactly() -> None:
    assert part_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert part_ranges(8, 4) == [(0, 4), (4, 8)]
    assert part_ranges(3, 4) == [(0, 3)]
    assert part_ranges(0, 4) == []


# --- local checkpoints are validated and used in place --------------------------------------


def make_local_checkpoint(directory: Path, *, sharded: bool) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    if sharded:
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for shard in shards:
            (directory / shard).write_bytes(b"\0" * 8)
        (directory / INDEX_FILE).write_text(index_text({"a": shards[0], "b": shards[1]}))
    else:
        (directory / WEIGHTS_FILE).write_bytes(b"\0" * 8)
    return directory


@pytest.mark.parametrize("sharded", [False, True])
def test_local_checkpoint_is_used_in_place(tmp_path: Path, sharded: bool) -> None:
    source = make_local_checkpoint(tmp_path / "ckpt", sharded=sharded)
    cache = tmp_path / "cache"
    assert fetch_checkpoint(str(source), cache) == source
    result = fetch_checkpoint_result(f"file://{source}", cache)
    assert result.path == source
    assert result.local and result.downloaded == ()
    assert not cache.exists()  # nothing was copied


def test_local_sharded_checkpoint_missing_a_shard(tmp_path: Path) -> None:
    source = make_local_checkpoint(tmp_path / "ckpt", sharded=True)
    (source / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(str(source), tmp_path / "cache")
    assert caught.value.kind == "invalid-checkpoint"
    assert "model-00002-of-00002.safetensors" in str(caught.value)


def test_local_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(str(tmp_path / "nope"), tmp_path / "cache")
    assert caught.value.kind == "not-found"
    assert str(tmp_path / "nope") in str(caught.value)


def test_local_directory_without_safetensors(tmp_path: Path) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FetchError) as caught:
        fetch_checkpoint(str(source), tmp_path / "cache")
    assert caught.value.kind == "invalid-checkpoint"
