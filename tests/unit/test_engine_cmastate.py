"""cma's strategy as plain data: a restored strategy continues exactly like the live one."""

from __future__ import annotations

import json
from pathlib import Path

import cma
import numpy as np
import pytest

from mergesearch.engine import cmastate
from mergesearch.engine.codec import (
    CodecError,
    decode_f8,
    encode_f8,
    generator_from_state,
    generator_state,
    pack_upper,
    unpack_upper,
)

pytestmark = pytest.mark.unit


def _loss(x: np.ndarray) -> float:
    """A rotated ellipsoid: CMA-ES must learn correlations, so C really changes."""
    n = len(x)
    scales = np.logspace(0, 2, n)
    y = x - 0.3 + 0.5 * np.roll(x, 1)
    return float(np.sum(scales * y**2))


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


def _settings(dim: int, popsize: int) -> cmastate.StrategySettings:
    return cmastate.StrategySettings(tuple([0.1] * dim), 0.3, popsize)


@pytest.mark.parametrize(("dim", "popsize", "generations"), [(1, 4, 25), (7, 10, 40), (63, 16, 12)])
def test_restored_strategy_asks_exactly_what_the_live_one_asks(
    dim: int, popsize: int, generations: int
) -> None:
    settings = _settings(dim, popsize)
    # The reference: one live strategy built directly by cma, never serialised, plain ask/tell.
    live_gen = np.random.Generator(np.random.PCG64(11))
    live_source = cmastate.NormalSource(live_gen)
    live = cma.CMAEvolutionStrategy(
        list(settings.x0), settings.sigma0, cmastate.strategy_options(settings, live_source)
    )
    # The restored run: snapshot + generator state through JSON text at every generation.
    gen = np.random.Generator(np.random.PCG64(11))
    es = cmastate.new_strategy(settings, cmastate.NormalSource(gen))
    stored = json.dumps(
        {"cma": cmastate.snapshot(es).model_dump(mode="json"), "rng": generator_state(gen)}
    )
    for _ in range(generations):
        data = json.loads(stored)
        source = cmastate.NormalSource(generator_from_state(data["rng"]))
        es = cmastate.restore(settings, cmastate.CmaSnapshot.model_validate(data["cma"]), source)
        for name in ("mean", "pc", "pc2"):
            assert np.array_equal(_bits(getattr(es, name)), _bits(getattr(live, name))), name
        assert np.array_equal(_bits(es.adapt_sigma.ps), _bits(live.adapt_sigma.ps))
        scalars = ("sigma", "countiter", "countevals")
        assert [getattr(es, k) for k in scalars] == [getattr(live, k) for k in scalars]
        csa = ("delta", "_ps_updated_iteration")
        assert [getattr(es.adapt_sigma, k) for k in csa] == [
            getattr(live.adapt_sigma, k) for k in csa
        ]

        expected = np.array(live.ask())  # plain cma decomposes C here, lazily
        rows = cmastate.ask(es, popsize)
        assert np.array_equal(_bits(rows), _bits(expected))
        for name in ("C", "B", "D"):
            assert np.array_equal(_bits(getattr(es.sm, name)), _bits(getattr(live.sm, name)))
        counters = ("count_tell", "last_update", "count_eigen")
        assert [getattr(es.sm, k) for k in counters] == [getattr(live.sm, k) for k in counters]
        live.tell(list(expected), [_loss(x) for x in expected])  # plain cma: decomposes lazily
        cmastate.tell(es, list(rows), [_loss(x) for x in rows])
        stored = json.dumps(
            {
                "cma": cmastate.snapshot(es).model_dump(mode="json"),
                "rng": generator_state(source.generator),
            }
        )
    assert live.countiter == generations
    assert live.sigma != settings.sigma0  # the run adapted, so the comparison meant something


def test_copied_template_equals_a_freshly_built_strategy() -> None:
    settings = _settings(5, 8)
    a = cmastate.new_strategy(settings, cmastate.NormalSource(np.random.default_rng(1)))
    b = cma.CMAEvolutionStrategy(
        list(settings.x0),
        settings.sigma0,
        cmastate.strategy_options(settings, cmastate.NormalSource(np.random.default_rng(1))),
    )
    assert np.array_equal(np.array(a.ask()), np.array(b.ask()))
    again = cmastate.new_strategy(settings, cmastate.NormalSource(np.random.default_rng(2)))
    assert again.countiter == 0 and again.sm.count_tell == 0  # the template was not touched


def test_strategy_leaves_global_random_state_files_and_output_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    settings = _settings(4, 8)
    es = cmastate.new_strategy(settings, cmastate.NormalSource(np.random.default_rng(0)))
    for _ in range(5):
        rows = cmastate.ask(es, 8)
        cmastate.tell(es, list(rows), [_loss(x) for x in rows])
    assert np.array_equal(np.random.get_state()[1], before)
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_snapshot_refuses_a_generation_in_flight() -> None:
    es = cmastate.new_strategy(_settings(3, 6), cmastate.NormalSource(np.random.default_rng(0)))
    cmastate.ask(es, 6)
    with pytest.raises(cmastate.UnsupportedStrategyState, match="asked but not told"):
        cmastate.snapshot(es)


def test_restore_refuses_a_snapshot_of_another_dimension() -> None:
    es = cmastate.new_strategy(_settings(3, 6), cmastate.NormalSource(np.random.default_rng(0)))
    snap = cmastate.snapshot(es)
    with pytest.raises(cmastate.UnsupportedStrategyState, match="dimension"):
        cmastate.restore(_settings(4, 6), snap, cmastate.NormalSource(np.random.default_rng(0)))


def test_snapshot_is_small_for_64_checkpoints() -> None:
    settings = _settings(63, 16)
    es = cmastate.new_strategy(settings, cmastate.NormalSource(np.random.default_rng(0)))
    for _ in range(3):
        rows = cmastate.ask(es, 16)
        cmastate.tell(es, list(rows), [_loss(x) for x in rows])
    text = cmastate.snapshot(es).model_dump_json()
    # 2016 covariance entries + 4 vectors of 63, as base64 float64: about 24 KB.
    assert len(text) < 26_000


def test_float_arrays_round_trip_bit_for_bit() -> None:
    values = np.array([0.0, -0.0, 1e-310, -np.inf, np.pi, 1 / 3, 2.0**-1074, np.nan])
    back = decode_f8(encode_f8(values), len(values))
    assert np.array_equal(_bits(back), _bits(values))
    assert back.flags.writeable
    with pytest.raises(CodecError):
        decode_f8(encode_f8(values), len(values) + 1)
    with pytest.raises(CodecError):
        decode_f8("not base64!", 1)


def test_triangle_storage_is_exact_and_only_for_symmetric_matrices() -> None:
    a = np.random.default_rng(0).standard_normal((6, 6))
    c = (a + a.T) / 2
    assert np.array_equal(unpack_upper(pack_upper(c), 6), c)
    with pytest.raises(CodecError):
        pack_upper(a)


def test_generator_state_is_json_and_continues_the_stream() -> None:
    gen = np.random.Generator(np.random.PCG64(5))
    gen.standard_normal(7)
    data = json.loads(json.dumps(generator_state(gen)))
    assert isinstance(data["state"], str) and isinstance(data["inc"], str)  # 128-bit integers
    restored = generator_from_state(data)
    assert np.array_equal(restored.standard_normal(5), gen.standard_normal(5))
    with pytest.raises(CodecError):
        generator_from_state({"bit_generator": "MT19937"})
