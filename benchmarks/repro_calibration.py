"""Calibration: the default thresholds of the switching policy, from the other parts' data.

Every case with a known outcome (the reference models trained in part (d), the two quadratics of
part (b)) gives scores (part (a)'s at initialisation where it ran, else part (d)'s; and part (d)'s
after training) and whether SGD kept up with Adam. For each threshold pair the policy's pick on
every score is judged right, acceptable, unneeded or wrong; the defaults in
``blockopt.Thresholds`` are checked against that, and the pair that does best on the data
(nearest the defaults among equals) is reported. Parts that did not run are named and skipped.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from repro_common import LABELS, MODELS, Section, save_figure, table

import blockopt

QUADRATIC_FACTOR = 3.0  # part (b): GD "alike" Adam when within this factor in iterations
QUADRATIC_TOL = "1e-06"
GRID = np.round(np.arange(0.0, 5.0001, 0.25), 2)  # candidate thresholds, in decades

CLAIM = (
    "**Paper's claim.** Zhang et al. (2024) give no threshold: their JS0 reads about 0.1 where "
    "SGD keeps up with Adam and 19 and more where it falls behind, in their own units. "
    "blockopt's policy needs two numbers on its own score (`spread`, in decades): below "
    "`sgd_below` it uses SGD, above `adam_above` Adam, in between SGD with one learning rate "
    "per block; leaving a mode needs the score past the boundary by `margin` decades."
)


@dataclass(frozen=True)
class Case:
    """One calibration point: a score and what training (or the quadratic) showed at it.
    ``block_ok`` is None where block SGD was not measured; ``max_ratio`` is the decades between
    the largest and smallest block curvature (0 where not recorded)."""

    label: str
    source: str
    score: float
    sgd_ok: bool
    block_ok: bool | None
    evidence: str
    max_ratio: float = 0.0


def verdict(case: Case, mode: str) -> str:
    """Where SGD keeps up: SGD ``right``, block SGD ``acceptable`` (if it keeps up too), Adam
    ``unneeded``. Where SGD lags: Adam ``right``, block SGD ``right`` if it keeps up. A mode that
    lags Adam is ``wrong``; block SGD where it was not measured ``unknown``."""
    if mode == "sgd":
        return "right" if case.sgd_ok else "wrong"
    if mode == "block_sgd":
        if case.block_ok is None:
            return "unknown"
        if not case.block_ok:
            return "wrong"
        return "acceptable" if case.sgd_ok else "right"
    return "unneeded" if case.sgd_ok else "right"


def margins_met(case: Case, t: blockopt.Thresholds) -> bool:
    """Whether the policy reaches a good mode from the opposite one, margin included: from SGD a
    lagging case must clear ``adam_above + margin`` (or ``sgd_below + margin`` if block SGD
    keeps up); from Adam a case where SGD keeps up must fall below ``sgd_below - margin``."""
    if case.sgd_ok:
        return case.score < t.sgd_below - t.margin
    if case.block_ok:
        return case.score > t.sgd_below + t.margin
    return case.score > t.adam_above + t.margin


def evaluate(cases: list[Case], t: blockopt.Thresholds) -> dict[str, Any]:
    """Counts of each verdict and of cases whose margins are met."""
    counts = dict.fromkeys(("right", "acceptable", "unneeded", "unknown", "wrong"), 0)
    for c in cases:
        counts[verdict(c, t.target(c.score, c.max_ratio))] += 1
    return {**counts, "margins_met": sum(margins_met(c, t) for c in cases), "cases": len(cases)}


def recommend(cases: list[Case], current: blockopt.Thresholds) -> tuple[blockopt.Thresholds, Any]:
    """The threshold pair on ``GRID`` with the fewest wrong picks, then the fewest unneeded or
    unknown ones, then the most margins met, then the nearest to ``current``."""

    def key(t: blockopt.Thresholds) -> tuple[float, ...]:
        e = evaluate(cases, t)
        distance = abs(t.sgd_below - current.sgd_below) + abs(t.adam_above - current.adam_above)
        return (e["wrong"], e["unneeded"] + e["unknown"], -e["margins_met"], distance)

    candidates = [current] + [
        blockopt.Thresholds(
            float(s), float(a), current.margin, current.min_interval, current.block_ratio
        )
        for s in GRID
        for a in GRID
        if s <= a
    ]
    best = min(candidates, key=key)
    return best, key(best)


def bounds(cases: list[Case], margin: float) -> tuple[float, float, float]:
    """What the margins ask of the thresholds: ``sgd_below`` above ``lo`` (every case where SGD
    keeps up falls below ``sgd_below - margin``), ``adam_above`` below ``hi`` (every case that
    needs Adam clears ``adam_above + margin``) and ``sgd_below`` below ``cap`` (every lagging case
    where block SGD keeps up clears ``sgd_below + margin``); +-inf where no case constrains."""
    lo = max((c.score + margin for c in cases if c.sgd_ok), default=-math.inf)
    hi = min((c.score - margin for c in cases if not c.sgd_ok and not c.block_ok), default=math.inf)
    cap = min((c.score - margin for c in cases if not c.sgd_ok and c.block_ok), default=math.inf)
    return lo, hi, cap


def cases_from(data: dict[str, Any]) -> tuple[list[Case], list[str]]:
    """Calibration cases from whatever parts ran, and notes on what is missing."""
    notes: list[str] = []
    cases: list[Case] = []
    a, b, d = data.get("a"), data.get("b"), data.get("d")
    if d is None:
        notes.append(
            "part (d) did not run: no training outcomes for the reference models"
            + (", so part (a)'s scores are listed without a verdict" if a else "")
        )
    if a is None and d is not None:
        notes.append("part (a) did not run: scores at initialisation come from part (d)")
    if b is None:
        notes.append("part (b) did not run: no quadratic cases")
    if d is not None:
        on_par = d.get("on_par_share", 0.05)
        for name in MODELS:
            if name not in d["results"]:
                continue
            res, summ = d["results"][name], d["summary"][name]
            sgd_ok, block_ok = bool(summ["sgd_on_par"]), bool(summ["block_sgd_on_par"])
            share = summ["share_run"]
            evidence = (
                "SGD shortfall "
                + (f"{100 * share:.1f}%" if share is not None else "diverged")
                + " (block SGD "
                + (
                    f"{100 * summ['block_sgd_share_run']:.1f}%"
                    if summ["block_sgd_share_run"] is not None
                    and math.isfinite(summ["block_sgd_share_run"])
                    else "diverged"
                )
                + f"; on par: at most {100 * on_par:.0f}%)"
            )
            if a is not None and name in a["results"]:
                rows, source = a["results"][name], "(a) init"
            else:
                rows, source = res["init"], "(d) init"
            for r in rows:
                cases.append(
                    Case(
                        f"{LABELS[name]}, seed {r['seed']}",
                        source,
                        float(r["spread"]),
                        sgd_ok,
                        block_ok,
                        evidence,
                        float(r.get("max_ratio", 0.0)),
                    )
                )
            # After training in the mode that suits it: what the policy would see later on.
            mode = "sgd" if sgd_ok else "adam"
            if mode in res.get("end", {}):
                cases.append(
                    Case(
                        f"{LABELS[name]}, seed {d['seeds'][0]}, after {mode.upper()} training",
                        "(d) end",
                        float(res["end"][mode]["spread"]),
                        sgd_ok,
                        block_ok,
                        evidence,
                        float(res["end"][mode].get("max_ratio", 0.0)),
                    )
                )
    elif a is not None:
        notes.append(
            "scores from (a) without outcomes: "
            + "; ".join(
                f"{LABELS[n]} {statistics.median(float(r['spread']) for r in a['results'][n]):.2f}"
                for n in MODELS
                if n in a["results"]
            )
        )
    if b is not None:
        cap = b.get("iterations_cap", 0)
        for case, res in b["results"].items():

            def iters(key: str, res: dict[str, Any] = res) -> float:
                values = res[key][f"iters_{QUADRATIC_TOL}"]
                return statistics.median(cap + 1 if v is None else v for v in values)

            gd, block, adam = iters("gd_grid"), iters("block_max"), iters("adam")
            sgd_ok = gd <= QUADRATIC_FACTOR * adam
            block_ok = block <= QUADRATIC_FACTOR * adam

            def fmt(x: float) -> str:
                return f"> {cap:,}" if x > cap else f"{x:,.0f}"

            evidence = (
                f"iterations to {float(QUADRATIC_TOL):g}: GD {fmt(gd)}, per-block GD "
                f"{fmt(block)}, Adam {fmt(adam)} (medians over seeds; keeps up: within "
                f"{QUADRATIC_FACTOR:g}x of Adam)"
            )
            for i, spec in enumerate(res["spectra"]):
                seed = res["seeds"][i] if "seeds" in res else i
                cases.append(
                    Case(
                        f"quadratic, {case}, seed {seed}",
                        "(b)",
                        float(spec["spread"]),
                        sgd_ok,
                        block_ok,
                        evidence,
                        float(spec.get("max_ratio", 0.0)),
                    )
                )
    return cases, notes


def block_ratio_text(cases: list[Case], t: blockopt.Thresholds, d: dict[str, Any] | None) -> str:
    """Where ``block_ratio`` would act: the cases below ``sgd_below`` and their ``max_ratio``,
    and what part (d) measured for block SGD against SGD on the models among them, on the
    training set and held out (why the rule is off by default)."""
    band = [c for c in cases if c.score < t.sgd_below]
    if not band:
        return "**`block_ratio`.** No case scores below `sgd_below`."
    ranges = []
    for group in sorted({_group(c) for c in band}):
        ratios = [c.max_ratio for c in band if _group(c) == group]
        ranges.append(f"{group} {min(ratios):.2f}-{max(ratios):.2f}")
    if t.block_ratio is None:
        rule = (
            "**`block_ratio`.** Off by default (`block_ratio=None`). Set, it makes the policy "
            "pick block SGD below `sgd_below` too when `max_ratio` (decades between the largest "
            "and the smallest block curvature) exceeds it by the margin"
        )
    else:
        rule = (
            f"**`block_ratio`.** Below `sgd_below` the policy picks block SGD when `max_ratio` "
            f"(decades between the largest and the smallest block curvature) exceeds "
            f"`block_ratio={t.block_ratio:g}` (entering needs {t.block_ratio + t.margin:g}, "
            f"leaving {t.block_ratio - t.margin:g})"
        )
    text = (
        rule + ": the score weighs blocks by size, so a few small blocks far below the rest do "
        "not move it, yet one learning rate leaves them learning 10^max_ratio times slower. "
        "`max_ratio` of the cases below `sgd_below`: "
        + "; ".join(ranges)
        + ". The verdicts above (SGD and block SGD both keep up there) cannot tell the two apart; "
        "the final losses can"
    )
    if d is None:
        return text + "; part (d) did not run."
    rows = []
    for name in MODELS:
        res = d["results"].get(name)
        if res is None or not any(_group(c) == LABELS[name] for c in band):
            continue
        sgd = res["runs"].get("sgd", [])
        block = [r for r in res["block_sgd"]["runs"] if not r.get("diverged")]
        if not sgd or not block:
            continue
        best_block = min(r["train_loss"] for r in block)
        ratio = statistics.median(r["train_loss"] for r in sgd) / best_block
        rows.append(
            [
                LABELS[name],
                ", ".join(_losses(r) for r in sgd),
                ", ".join(_losses(r) for r in block),
                f"{ratio:.1f}x",
                _test_ratio(sgd, block),
            ]
        )
    worse = all(
        _held_out_worse(d["results"][n])
        for n in MODELS
        if n in d["results"] and any(_group(c) == LABELS[n] for c in band)
    )
    text += (
        ": block SGD reaches lower training losses, but its held-out (test) loss is above SGD's "
        "median at every learning rate tried, so a model in SGD's band stays in SGD by default:"
        if rows and worse
        else ":"
    )
    return "\n\n".join(
        [
            text,
            table(
                [
                    "model",
                    "SGD final loss, training / test (tuned lr, per seed)",
                    "block SGD final loss, training / test (per lr tried)",
                    "training: SGD over the best block SGD",
                    "test: best block SGD over SGD",
                ],
                rows,
            ),
        ]
    )


def _losses(run: dict[str, Any]) -> str:
    """A run's final training loss, its test loss when recorded, and its learning rate."""
    test = run.get("test_loss")
    held = "" if test is None else f" / {test:.2g}"
    return f"{run['train_loss']:.2g}{held} (lr {run['lr']:.2g})"


def _held_out_worse(res: dict[str, Any]) -> bool:
    """Whether every finished block-SGD run's test loss is above SGD's median one."""
    sgd = [r["test_loss"] for r in res["runs"].get("sgd", []) if r.get("test_loss") is not None]
    block = [r.get("test_loss") for r in res["block_sgd"]["runs"] if not r.get("diverged")]
    if not sgd or not block or None in block:
        return False
    return min(block) > statistics.median(sgd)


def _test_ratio(sgd: list[dict[str, Any]], block: list[dict[str, Any]]) -> str:
    """The lowest block-SGD test loss over SGD's median one; ``-`` when not recorded."""
    sgd_test = [r["test_loss"] for r in sgd if r.get("test_loss") is not None]
    block_test = [r["test_loss"] for r in block if r.get("test_loss") is not None]
    if not sgd_test or not block_test:
        return "-"
    return f"{min(block_test) / statistics.median(sgd_test):.2f}x"


def _group(case: Case) -> str:
    """The setting a case belongs to: its label without the seed."""
    return case.label.split(", seed")[0]


def _figure(
    cases: list[Case], t: blockopt.Thresholds, best: blockopt.Thresholds, fig_dir: Path
) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    groups = sorted({_group(c) for c in cases})
    for row, group in enumerate(groups):
        for c in cases:
            if _group(c) != group:
                continue
            color = "C2" if c.sgd_ok else "C3"
            marker = "s" if c.source.endswith("end") else "o"
            ax.scatter(c.score, row, color=color, marker=marker, alpha=0.7, zorder=3)
    ax.axvspan(-0.5, t.sgd_below, color="C2", alpha=0.08)
    ax.axvspan(t.adam_above, 6.0, color="C3", alpha=0.08)
    if (best.sgd_below, best.adam_above) != (t.sgd_below, t.adam_above):
        for value in (best.sgd_below, best.adam_above):
            ax.axvline(value, color="k", ls="--", lw=0.9)
    ax.set_xlim(-0.2, max([c.score for c in cases] + [t.adam_above]) + 0.5)
    ax.set_yticks(range(len(groups)), groups)
    ax.set_xlabel("score (decades); green: SGD keeps up, red: it lags; square: after training")
    title = f"Calibration cases; shaded: SGD below {t.sgd_below:g}, Adam above {t.adam_above:g}"
    if (best.sgd_below, best.adam_above) != (t.sgd_below, t.adam_above):
        title += f"\n(defaults); dashed: best pair {best.sgd_below:g} / {best.adam_above:g}"
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, fig_dir, "calibration_scores")


def run(fig_dir: Path, data: dict[str, Any], *, quick: bool = False) -> Section:
    cases, notes = cases_from(data)
    current = blockopt.Thresholds()
    missing = [f"({k})" for k in ("a", "b", "d") if k not in data]
    if not cases:
        text = (
            "**Our measurement.** Nothing to calibrate on: "
            + "; ".join(notes)
            + ". Run parts (b) and (d) (and (a)) with it."
        )
        return Section(
            key="calibration",
            title="Calibration of the switching thresholds",
            markdown="\n\n".join([CLAIM, text, "**Agreement.** Not assessed: no data."]),
            data={"missing": missing, "notes": notes, "cases": []},
        )
    best, _ = recommend(cases, current)
    ev_current, ev_best = evaluate(cases, current), evaluate(cases, best)
    rows = []
    for c in sorted(cases, key=lambda c: c.score):
        mode = current.target(c.score, c.max_ratio)
        rows.append(
            [
                c.label,
                c.source,
                f"{c.score:.2f}",
                f"{c.max_ratio:.2f}",
                "yes" if c.sgd_ok else "no",
                "-" if c.block_ok is None else ("yes" if c.block_ok else "no"),
                mode,
                verdict(c, mode),
                "yes" if margins_met(c, current) else "no",
                best.target(c.score, c.max_ratio),
                verdict(c, best.target(c.score, c.max_ratio)),
                c.evidence,
            ]
        )
    ok = [c.score for c in cases if c.sgd_ok]
    lag = [c.score for c in cases if not c.sgd_ok]
    window = (
        f"Scores where SGD keeps up: {min(ok):.2f}-{max(ok):.2f}; where it lags: "
        f"{min(lag):.2f}-{max(lag):.2f}"
        if ok and lag
        else "Only one kind of outcome is present"
    )
    same = (best.sgd_below, best.adam_above) == (current.sgd_below, current.adam_above)
    groups = sorted({_group(c) for c in cases})

    def summary(e: dict[str, Any]) -> str:
        return (
            f"{e['right']} right, {e['acceptable']} acceptable, {e['unneeded']} unneeded "
            f"Adam, {e['unknown']} unknown, {e['wrong']} wrong; margins met in "
            f"{e['margins_met']}/{e['cases']}"
        )

    measurement = "\n\n".join(
        [
            "**Our measurement.** Cases: each reference model trained in part (d) (one row per "
            "seed scored at initialisation, from part (a) where it ran, and one row for its "
            "score after training in the mode that suits it), and each quadratic of part (b) "
            "(one row per seed). *SGD keeps up*: part (d)'s shortfall over the run within its "
            f"tolerance; for the quadratics, single-lr GD within {QUADRATIC_FACTOR:g}x Adam's "
            f"iterations to {float(QUADRATIC_TOL):g}. *Block SGD keeps up*: the same for block "
            "SGD (part (d)) or GD with an lr per block (part (b)). Verdicts: where SGD keeps "
            "up, SGD is *right*, block SGD *acceptable* (if it keeps up too) and Adam "
            "*unneeded*; where SGD lags, Adam is *right*, and so is block SGD if it keeps up; "
            "a mode that lags is *wrong*. *Margins met*: the policy also gets there from the "
            f"opposite mode (score past the boundary by the margin, {current.margin:g} "
            f"decades). Current defaults `sgd_below={current.sgd_below:g}`, "
            f"`adam_above={current.adam_above:g}`; "
            f"best pair on a {GRID[1] - GRID[0]:g}-decade grid (fewest wrong, then unneeded "
            "or unknown, then most margins met, then nearest the defaults): "
            f"`sgd_below={best.sgd_below:g}`, `adam_above={best.adam_above:g}`."
            + (f" Missing: {'; '.join(notes)}." if notes else ""),
            table(
                [
                    "case",
                    "from",
                    "score",
                    "max_ratio",
                    "SGD keeps up",
                    "block SGD keeps up",
                    "default picks",
                    "verdict",
                    "margin met",
                    "best pair picks",
                    "verdict",
                    "evidence",
                ],
                rows,
            ),
            _figure(cases, current, best, fig_dir),
        ]
    )
    if same:
        conclusion = (
            f"The data support the current defaults: {summary(ev_current)}; no pair on the "
            "grid does better."
        )
    else:
        conclusion = (
            f"The current defaults score {summary(ev_current)}; "
            f"`sgd_below={best.sgd_below:g}`, `adam_above={best.adam_above:g}` score "
            f"{summary(ev_best)}."
        )
    lo, hi, cap = bounds(cases, current.margin)
    parts = [f"**Agreement.** {window}. {conclusion}"]
    if math.isfinite(lo) or math.isfinite(hi):
        parts.append(
            f"With the margin of {current.margin:g} decades, every case is reached from either "
            "side when "
            + " and ".join(
                [f"`sgd_below` > {lo:.2f}"] * math.isfinite(lo)
                + [f"`adam_above` < {hi:.2f}"] * math.isfinite(hi)
                + [f"`sgd_below` < {cap:.2f}"] * math.isfinite(cap)
            )
            + (
                "."
                if lo < min(hi, cap)
                else "; these bounds conflict, so no pair meets every margin."
            )
        )
    parts.append(
        f"The cases are few ({len(groups)} settings: {'; '.join(groups)}), so the data bound "
        "the thresholds rather than pin them; the pair reported is the one nearest the current "
        "defaults within those bounds."
    )
    agreement = " ".join(parts)
    ratio_text = block_ratio_text(cases, current, data.get("d"))
    return Section(
        key="calibration",
        title="Calibration of the switching thresholds",
        markdown="\n\n".join([CLAIM, measurement, agreement, ratio_text]),
        data={
            "missing": missing,
            "notes": notes,
            "current": {
                "sgd_below": current.sgd_below,
                "adam_above": current.adam_above,
                "block_ratio": current.block_ratio,
            },
            "best": {"sgd_below": best.sgd_below, "adam_above": best.adam_above},
            "margin": current.margin,
            "evaluation_current": ev_current,
            "evaluation_best": ev_best,
            "bounds": {"sgd_below_above": lo, "adam_above_below": hi, "sgd_below_below": cap},
            "cases": [
                {
                    "label": c.label,
                    "source": c.source,
                    "score": c.score,
                    "sgd_ok": c.sgd_ok,
                    "block_ok": c.block_ok,
                    "evidence": c.evidence,
                    "max_ratio": c.max_ratio,
                    "default_pick": current.target(c.score, c.max_ratio),
                    "default_verdict": verdict(c, current.target(c.score, c.max_ratio)),
                    "best_pick": best.target(c.score, c.max_ratio),
                }
                for c in cases
            ],
        },
    )
