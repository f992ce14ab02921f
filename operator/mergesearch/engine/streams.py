"""The search's random streams, all derived from the config's seed and nothing else.

The main stream feeds every generation's population; its state is part of the engine state.
A replacement sample (failure policy `resample`) draws from its own stream, keyed by
(generation, slot, attempt): so the main stream, hence every later generation, is the same
whatever fails, and a replacement does not depend on the order in which failures arrive.
"""

from __future__ import annotations

import numpy as np

_MAIN = 0
_REPLACEMENT = 1


def main_generator(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _MAIN])))


def replacement_generator(
    seed: int, generation: int, slot: int, attempt: int
) -> np.random.Generator:
    entropy = [seed, _REPLACEMENT, generation, slot, attempt]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
