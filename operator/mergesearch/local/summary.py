"""The end-of-search table and the paper's three claims, computed from trial records (pure).

The claims are checked, not asserted: the table says for this search whether the optimised
merge beat every baseline, kept held-out scores at least as good as the uniform merge's, and
spread its weight over most checkpoints (Khalifa et al., arXiv 2412.04144, §4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean

from mergesearch.local.records import TrialLogEntry


@dataclass(frozen=True)
class Row:
    """`fitness` on the search's examples; `confirmed` on the unseen ones (None: not confirmed)."""

    label: str
    held_in: dict[str, float]
    fitness: float
    held_out: dict[str, float]
    confirmed: float | None = None


@dataclass(frozen=True)
class Claims:
    beats_best_single: bool
    beats_uniform: bool
    beats_merge_best: bool | None
    held_out_no_worse: bool | None
    nonnegligible_weights: int
    checkpoints: int
    basis: str = "search"  # which examples (a) compared on: "confirmation" or "search"

    @property
    def weights_spread(self) -> bool:
        return self.nonnegligible_weights > self.checkpoints / 2

    def lines(self) -> list[str]:
        def mark(ok: bool | None) -> str:
            return "n/a" if ok is None else ("yes" if ok else "NO")

        where = "unseen (confirmation)" if self.basis == "confirmation" else "the search's"
        return [
            f"(a) on {where} examples, beats the best single checkpoint: "
            f"{mark(self.beats_best_single)}; "
            f"the uniform merge: {mark(self.beats_uniform)}; "
            f"merge-best: {mark(self.beats_merge_best)}",
            f"(b) held-out no worse than the uniform merge: {mark(self.held_out_no_worse)}",
            f"(c) weight over 1/(10N) on {self.nonnegligible_weights} of {self.checkpoints} "
            f"checkpoints: {mark(self.weights_spread)}",
        ]


def baseline_label(trial_id: str) -> str:
    """`b-each-sft-a` → `sft-a`, `b-uniform` → `uniform`: how tables and pictures name a
    baseline."""
    return trial_id.removeprefix("b-each-").removeprefix("b-")


def confirmed_fitness(records: Sequence[TrialLogEntry]) -> dict[str, float]:
    """Trial id → its fitness on the confirmation examples, for the trials confirmed."""
    return {
        r.source: r.fitness
        for r in records
        if r.subset == "confirmation"
        and r.status == "succeeded"
        and r.source is not None
        and r.fitness is not None
    }


def table_rows(
    records: Sequence[TrialLogEntry], best_id: str | None, best_held_out: Mapping[str, float]
) -> list[Row]:
    """Baselines in the order they ran, then the chosen merge; both fitnesses side by side."""
    confirmed = confirmed_fitness(records)
    searched = [r for r in records if r.subset == "search" and r.status == "succeeded"]
    rows = [
        Row(baseline_label(r.id), r.held_in, r.fitness or 0.0, r.held_out, confirmed.get(r.id))
        for r in searched
        if r.kind == "baseline"
    ]
    best = next((r for r in searched if r.id == best_id), None)
    if best is not None:
        rows.append(
            Row(
                f"best ({best.id})",
                best.held_in,
                best.fitness or 0.0,
                dict(best_held_out),
                confirmed.get(best.id),
            )
        )
    return rows


def check_claims(
    records: Sequence[TrialLogEntry],
    best_id: str,
    best_weights: Mapping[str, float],
    best_held_out: Mapping[str, float],
) -> Claims:
    """(a) compares fitness on the confirmation examples when the best and every baseline were
    confirmed, else on the search's (biased upwards for the best: it was selected there)."""
    done = {r.id: r for r in records if r.status == "succeeded" and r.subset == "search"}
    confirmed = confirmed_fitness(records)
    compared = [i for i in done if i == best_id or i.startswith("b-")]
    basis = "confirmation" if compared and all(i in confirmed for i in compared) else "search"

    def score(trial_id: str) -> float:
        if basis == "confirmation":
            return confirmed[trial_id]
        return done[trial_id].fitness or 0.0

    singles = [score(i) for i in done if i.startswith("b-each-")]
    uniform = done.get("b-uniform")
    merge_best = done.get("b-merge-best")
    fitness = score(best_id)
    held_out_ok = None
    if uniform is not None and uniform.held_out and best_held_out:
        held_out_ok = fmean(best_held_out.values()) >= fmean(uniform.held_out.values())
    n = len(best_weights)
    return Claims(
        beats_best_single=bool(singles) and fitness > max(singles),
        beats_uniform=uniform is not None and fitness > score(uniform.id),
        beats_merge_best=None if merge_best is None else fitness > score(merge_best.id),
        held_out_no_worse=held_out_ok,
        nonnegligible_weights=sum(1 for w in best_weights.values() if w > 1 / (10 * n)),
        checkpoints=n,
        basis=basis,
    )
