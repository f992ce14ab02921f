"""Exact, JSON-safe encodings for the engine's numbers: float arrays and generator states.

Float arrays are stored as base64 of their little-endian IEEE-754 float64 bytes, not as JSON
numbers, for two reasons (docs/engine.md has the numbers):

- exactness through any JSON handler: the operator's status goes through the Kubernetes API
  server, which re-encodes JSON in Go; `-0.0` comes back as `0` and integral floats as integers.
  Bytes in a string survive bit for bit, and bit-for-bit restores are what the engine promises;
- size: a float64 is 8 bytes (10.7 as base64) against ~20 characters as shortest-repr decimal,
  which keeps the covariance of a 64-checkpoint search small enough for a status.

Decoding is `numpy.frombuffer` with a fixed dtype and a checked length: plain data, no code.
Generator states hold 128-bit integers, which JSON numbers cannot carry portably, so they are
decimal strings.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

_F8 = np.dtype("<f8")


class CodecError(ValueError):
    """A stored array or generator state is malformed."""


def encode_f8(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=_F8).tobytes()).decode("ascii")


def decode_f8(text: str, count: int) -> np.ndarray:
    """Return a fresh, writable float64 vector of exactly `count` values."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise CodecError(f"not base64: {e}") from e
    if len(raw) != count * _F8.itemsize:
        raise CodecError(f"expected {count} float64 values, got {len(raw)} bytes")
    return np.frombuffer(raw, dtype=_F8).astype(np.float64, copy=True)


def decode_f8_rows(text: str, rows: int, cols: int) -> np.ndarray:
    return decode_f8(text, rows * cols).reshape(rows, cols)


def pack_upper(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle with the diagonal, row by row; only exact for a symmetric matrix."""
    n = matrix.shape[0]
    if not np.array_equal(matrix, matrix.T):
        raise CodecError("only an exactly symmetric matrix can be stored as a triangle")
    return matrix[np.triu_indices(n)]


def unpack_upper(values: np.ndarray, n: int) -> np.ndarray:
    if values.shape != (n * (n + 1) // 2,):
        raise CodecError(f"a {n}×{n} triangle has {n * (n + 1) // 2} values, got {values.size}")
    matrix = np.zeros((n, n))
    rows, cols = np.triu_indices(n)
    matrix[rows, cols] = values
    matrix[cols, rows] = values
    return matrix


def generator_state(generator: np.random.Generator) -> dict[str, Any]:
    """A PCG64 generator's state as JSON-safe data (128-bit integers as decimal strings)."""
    state = generator.bit_generator.state
    if state["bit_generator"] != "PCG64":
        raise CodecError(f"only PCG64 generators are stored, got {state['bit_generator']}")
    return {
        "bit_generator": "PCG64",
        "state": str(state["state"]["state"]),
        "inc": str(state["state"]["inc"]),
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def generator_from_state(data: dict[str, Any]) -> np.random.Generator:
    if data.get("bit_generator") != "PCG64":
        raise CodecError("only PCG64 generator states can be restored")
    try:
        inner = {"state": int(data["state"]), "inc": int(data["inc"])}
        bit_generator = np.random.PCG64()
        bit_generator.state = {
            "bit_generator": "PCG64",
            "state": inner,
            "has_uint32": int(data["has_uint32"]),
            "uinteger": int(data["uinteger"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"malformed generator state: {e}") from e
    return np.random.Generator(bit_generator)
