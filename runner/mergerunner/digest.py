"""The merge's digests: what says two merged models hold the same bytes.

The content digest hashes, tensor by tensor in write order, the tensor's name, dtype and shape,
then the BLAKE3 of each DIGEST_BLOCK-element block of its bytes. Blocks make it parallel: the
streaming merge's workers hash the spans they wrote in any order (`BlockDigests`), and a
resident merge hashes the model it evaluated (`content_digest`); both give the same digest for
the same weights and dtype. The recipe digest names what determines a merge instead, for free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from blake3 import blake3

from mergerunner.arithmetic import CODE_OF_TORCH
from mergerunner.checkpoint import FLOAT_ITEMSIZE, MergePlan
from mergerunner.writer import ShardSpec, Span

# Elements per block of the content digest: every tensor is hashed block by block (see
# `content_digest`), so that blocks can be hashed in parallel. Spans start on block bounds.
DIGEST_BLOCK = 1 << 16
# BLAKE3, not sha256: 2.2x faster here (256 MiB in 0.08 s against 0.18 s with SHA-NI), which
# made the digest the merge's costliest stage after the arithmetic.
DIGEST_SCHEME = "blake3:"


def digest_prefix(name: str, code: str, shape: Sequence[int]) -> bytes:
    """What the content digest hashes before a tensor's block digests: name, dtype and shape."""
    return json.dumps([name, code, list(shape)]).encode() + b"\n"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes, without a copy when it is already on the CPU."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def block_digests(raw: memoryview, itemsize: int) -> bytes:
    """BLAKE3 of each DIGEST_BLOCK-element block of `raw` (the last one may be shorter),
    concatenated. `raw` must start on a block boundary of its tensor."""
    step = DIGEST_BLOCK * itemsize
    return b"".join(blake3(raw[i : i + step]).digest() for i in range(0, len(raw), step))


def blocks_of(numel: int) -> int:
    return -(-numel // DIGEST_BLOCK)


def content_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The content digest of tensors in the given order (see `merge_to_directory`).

    `merge_to_directory` computes the same digest while it writes, so a resident merge and a
    written one of the same weights and dtype have equal digests."""
    hasher = blake3()
    for name, tensor in named:
        hasher.update(digest_prefix(name, CODE_OF_TORCH[tensor.dtype], tensor.shape))
        if tensor.numel():
            hasher.update(block_digests(tensor_bytes(tensor), tensor.element_size()))
    return DIGEST_SCHEME + hasher.hexdigest()


class BlockDigests:
    """Block digests of every output tensor, in write order, filled in by the workers.

    The content digest hashes each tensor's blocks separately, so that the workers hash the
    spans they merged in parallel and in any order; only the final, short pass over the
    block digests is serial. One slot of 32 bytes per DIGEST_BLOCK elements: 0.02% of a bf16
    model's size.
    """

    def __init__(self, shards: Sequence[ShardSpec], code: str) -> None:
        self._code = code
        self._itemsize = FLOAT_ITEMSIZE[code]
        self._order = [t for spec in shards for t in spec.tensors]
        self._base: dict[str, int] = {}
        slots = 0
        for tensor in self._order:
            self._base[tensor.name] = slots
            slots += blocks_of(tensor.numel)
        self._slots = bytearray(32 * slots)

    def record(self, span: Span, raw: memoryview) -> None:
        if span.start % DIGEST_BLOCK or (
            span.stop % DIGEST_BLOCK and span.stop != span.tensor.numel
        ):
            raise AssertionError(f"span {span.start}:{span.stop} is not on digest block bounds")
        slot = self._base[span.tensor.name] + span.start // DIGEST_BLOCK
        digests = block_digests(raw, self._itemsize)
        self._slots[32 * slot : 32 * slot + len(digests)] = digests

    def finish(self) -> str:
        hasher = blake3()
        view = memoryview(self._slots)
        for tensor in self._order:
            hasher.update(digest_prefix(tensor.name, self._code, tensor.shape))
            base = 32 * self._base[tensor.name]
            hasher.update(view[base : base + 32 * blocks_of(tensor.numel)])
        return DIGEST_SCHEME + hasher.hexdigest()


def inputs_identity(plan: MergePlan) -> list[Any]:
    """What identifies the inputs of a merge: every source file's path, size and mtime."""
    files = sorted({info.file for t in plan.tensors for info in t.sources})
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def recipe_digest(identity: Any, weights: Sequence[float], dtypes: Sequence[str]) -> str:
    """sha256 of a merge's inputs, exact weights (as hex floats) and output dtypes."""
    document = {"inputs": identity, "weights": [w.hex() for w in weights], "dtypes": dtypes}
    text = json.dumps(document, sort_keys=True).encode()
    return "recipe-sha256:" + hashlib.sha256(text).hexdigest()
