"""Pinned numerics for building a toy pool: the same bytes on every x86-64 machine.

Measured on this project's CI machine (Xeon with AVX-512, torch 2.15 with MKL 2024.2), a
three-stage build of the paper recipe gave different weights under each of: one vs two torch
threads; torch's AVX-512, AVX2 and scalar ("default") kernels, which torch picks per CPU; and
MKL's native code path vs its conditional-numerical-reproducibility (CNR) paths, which MKL also
picks per CPU. A user's machine with another CPU therefore trained another pool under the same
recipe key. Pinning torch to its scalar kernels (`ATEN_CPU_CAPABILITY=default`, compiled for
baseline x86-64 so every CPU runs the same instructions) and MKL to its SSE2 CNR path
(`MKL_CBWR=COMPATIBLE`, documented to give the same results on all Intel-compatible CPUs for a
fixed MKL version) made the bytes independent of the thread count (1 and 2) and of the glibc
math variants (masked with GLIBC_TUNABLES); it costs about 1.6x training time (MKL's SSE2
GEMM), the scalar torch kernels nothing measurable at this size.

Both settings are read once when torch and MKL load, so the build runs in a child process
started with them (`worker_env`), and that process refuses to train if they did not take.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def worker_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a build process: the caller's, with the pinned settings on top."""
    return {**(os.environ if base is None else base), **PINNED_ENV}


def pin_torch() -> None:
    """In the build process: one thread, deterministic kernels, and proof the pins took.

    Raises RuntimeError when torch already chose vectorised kernels (the process was not
    started with `worker_env`): training would then depend on the CPU again.
    """
    import torch

    missing = {k: v for k, v in PINNED_ENV.items() if os.environ.get(k) != v}
    capability = torch.backends.cpu.get_cpu_capability()
    if missing or capability != "DEFAULT":
        raise RuntimeError(
            f"toy pool build needs the pinned environment {PINNED_ENV} "
            f"(missing {missing}, torch CPU capability {capability})"
        )
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
