"""Checkpoint download throughput: our fetch (obstore) against boto3 and s3fs, side by side.

Starts a local SeaweedFS S3 server (authentication on), uploads one synthetic checkpoint of
several shards (~200 MB by default), then downloads it with each client in interleaved rounds
and prints the median throughput and the ratio to the best. The machine is shared and noisy:
read the ratios, not the absolute numbers. Server and client share the same CPUs, so this
measures client overhead under contention more than network capacity.

    python bench/fetch.py [--size-mb 200] [--shards 4] [--rounds 3] [--s3fs-python PATH]

s3fs is not a project dependency; it runs in-process when importable, or in a child process
when `--s3fs-python` names an interpreter that has it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runner"), str(ROOT / "tests")]

from mergerunner.fetch import fetch_checkpoint_result  # noqa: E402
from mergerunner.storage import StorageConfig  # noqa: E402
from support.s3server import SeaweedS3  # noqa: E402

CONCURRENCY = 8
PREFIX = "bench/ckpt"

# A downloader fills a directory; it returns its own timing when the wall time would include
# unrelated work (a child interpreter starting up), else None.
Downloader = Callable[[Path], float | None]


def make_checkpoint(directory: Path, size_mb: int, shards: int) -> dict[str, int]:
    """Random shards (incompressible) plus the small files a real checkpoint carries."""
    directory.mkdir(parents=True)
    shard_bytes = size_mb * 2**20 // shards
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for name in names:
        (directory / name).write_bytes(os.urandom(shard_bytes))
    index = {"metadata": {}, "weight_map": {f"w{i}": name for i, name in enumerate(names)}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({"model_type": "bench"}))
    (directory / "tokenizer.json").write_bytes(os.urandom(2 * 2**20).hex().encode()[: 2 * 2**20])
    (directory / "tokenizer_config.json").write_text("{}")
    return {path.name: path.stat().st_size for path in directory.iterdir()}


def ours(server: SeaweedS3, bucket: str, scratch: Path) -> Downloader:
    config = StorageConfig(
        endpoint=server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region=server.region,
    )

    def download(out: Path) -> None:
        result = fetch_checkpoint_result(f"s3://{bucket}/{PREFIX}/", out, config=config)
        total = sum(p.stat().st_size for p in result.path.iterdir() if not p.name.startswith("."))
        if result.bytes_downloaded != total or total == 0:
            raise RuntimeError("expected a complete cold fetch")

    return download


def ours_cached(server: SeaweedS3, bucket: str, scratch: Path) -> Downloader:
    """The second fetch of the same checkpoint: one listing, no transfer."""
    warm = scratch / "warm-cache"
    fetch = ours(server, bucket, scratch)
    fetch(warm)
    config = StorageConfig(
        endpoint=server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
    )

    def download(out: Path) -> None:
        result = fetch_checkpoint_result(f"s3://{bucket}/{PREFIX}/", warm, config=config)
        if result.downloaded:
            raise RuntimeError("expected a cache hit")

    return download


def obstore_raw(server: SeaweedS3, bucket: str, scratch: Path) -> Downloader:
    """Plain concurrent GETs streamed to disk: the library's floor, no checks, no cache."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        prefix=PREFIX,
        endpoint=server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region=server.region,
        client_options={"allow_http": True, "timeout": "600s"},
    )

    async def run(out: Path) -> None:
        limiter = asyncio.Semaphore(CONCURRENCY)
        listing = await obstore.list_with_delimiter_async(store, None)

        async def one(name: str) -> None:
            async with limiter:
                result = await obstore.get_async(store, name)
                with (out / name).open("wb") as handle:
                    async for chunk in result.stream(min_chunk_size=8 * 2**20):
                        handle.write(chunk)

        await asyncio.gather(*(one(meta["path"]) for meta in listing["objects"]))

    return lambda out: asyncio.run(run(out))


def boto3_transfer(server: SeaweedS3, bucket: str, scratch: Path) -> Downloader:
    """boto3's managed transfer: files in a thread pool, ranged parts within each file."""
    from boto3.s3.transfer import TransferConfig

    client = server.client()
    transfer = TransferConfig(max_concurrency=CONCURRENCY, multipart_chunksize=16 * 2**20)

    def download(out: Path) -> None:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")["Contents"]
        keys = [item["Key"] for item in listed]

        def one(key: str) -> None:
            client.download_file(bucket, key, str(out / Path(key).name), Config=transfer)

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, keys))

    return download


S3FS_CHILD = """
import sys, time, s3fs
endpoint, key, secret, source, out = sys.argv[1:6]
fs = s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=endpoint, max_concurrency=8)
started = time.perf_counter()
fs.get(source + "/", out + "/", recursive=True)
print(time.perf_counter() - started)
"""


def s3fs_get(server: SeaweedS3, bucket: str, scratch: Path, python: str | None) -> Downloader:
    """fsspec's S3 filesystem `get` (aiobotocore underneath), in-process or in a child."""
    interpreter = python or sys.executable
    child_env = {**os.environ, "AWS_REGION": server.region}
    args = [server.endpoint, server.access_key, server.secret_key, f"{bucket}/{PREFIX}"]

    def download(out: Path) -> float:
        command = [interpreter, "-c", S3FS_CHILD, *args, str(out)]
        done = subprocess.run(command, check=True, env=child_env, capture_output=True, text=True)
        return float(done.stdout.strip().splitlines()[-1])

    return download


def s3fs_available(python: str | None) -> bool:
    if python:
        return subprocess.run([python, "-c", "import s3fs"], capture_output=True).returncode == 0
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


def time_round(name: str, download: Downloader, scratch: Path, total: int, check: bool) -> float:
    out = scratch / f"out-{name.replace(' ', '-')}"
    out.mkdir()
    started = time.perf_counter()
    own_timing = download(out)
    elapsed = time.perf_counter() - started if own_timing is None else own_timing
    if check:
        got = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.suffix != "")
        if got < total:
            raise RuntimeError(f"{name}: downloaded {got} of {total} bytes")
    shutil.rmtree(out)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3fs-python", default=None, help="an interpreter with s3fs installed")
    options = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp,
        SeaweedS3(Path(tmp) / "s3") as server,
    ):
        scratch = Path(tmp)
        sizes = make_checkpoint(scratch / "source", options.size_mb, options.shards)
        total = sum(sizes.values())
        bucket = server.create_bucket("bench")
        client = server.client()
        for name in sizes:
            client.upload_file(str(scratch / "source" / name), bucket, f"{PREFIX}/{name}")
        print(f"checkpoint: {len(sizes)} files, {total / 2**20:.0f} MiB; {options.rounds} rounds")

        contenders: dict[str, tuple[Downloader, bool]] = {
            "mergerunner.fetch (obstore)": (ours(server, bucket, scratch), False),
            "obstore, plain GETs": (obstore_raw(server, bucket, scratch), True),
            "boto3 download_file": (boto3_transfer(server, bucket, scratch), True),
        }
        if s3fs_available(options.s3fs_python):
            contenders["s3fs get"] = (s3fs_get(server, bucket, scratch, options.s3fs_python), True)
        else:
            print("s3fs: not installed (pass --s3fs-python to include it)")
        cached = ours_cached(server, bucket, scratch)

        times: dict[str, list[float]] = {name: [] for name in contenders}
        hits: list[float] = []
        for round_number in range(options.rounds):
            order = list(contenders)
            order = order[round_number % len(order) :] + order[: round_number % len(order)]
            for name in order:
                download, check = contenders[name]
                times[name].append(time_round(name, download, scratch, total, check))
            hits.append(time_round("cached", cached, scratch, 0, False))

        report(times, hits, total)


def report(times: dict[str, list[float]], hits: list[float], total: int) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    best = min(medians.values())
    print(f"\n{'client':<30} {'median MiB/s':>12} {'min..max s':>14} {'time / best':>12}")
    for name, median in sorted(medians.items(), key=lambda item: item[1]):
        spread = f"{min(times[name]):.2f}..{max(times[name]):.2f}"
        rate = total / median / 2**20
        print(f"{name:<30} {rate:>12.0f} {spread:>14} {median / best:>12.2f}")
    print(f"\nsecond fetch of the same checkpoint (listing only): {statistics.median(hits):.3f}s")


if __name__ == "__main__":
    main()
