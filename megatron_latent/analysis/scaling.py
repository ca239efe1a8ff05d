"""Scaling-law fits and effective multipliers of a method against vanilla training.

Per method, validation loss against a cost x (non-embedding parameters, training FLOPs, or
inference FLOPs per token) is fitted with a saturating power law

    L(x) = E + A * (x / x0)^-alpha        (E >= 0 the irreducible loss, A > 0, x0 the points' geometric mean)

by a grid over alpha (log-spaced, then refined around the best) with linear least squares for
(E, A) at each alpha, so no nonlinear optimizer is needed. Three parameters need more points than
that and a curvature the points show, so the saturating form is used only when there are >= 4
distinct x, the best alpha is strictly inside the grid, the best E is strictly between 0 and the
lowest loss, and the floor E removes at least half of the squared residual the pure power law
leaves; otherwise the fallback is that pure power law L = A (x/x0)^-alpha (E = 0, a straight line
in log-log), fitted the same way (least squares on the losses, the grid over alpha). A loss that
does not fall with x gets the log-log line, with alpha <= 0 and no multiplier. The fit is to the
mean loss over seeds at each x.

The effective multiplier of a method at a cost x with loss L is vanilla_fit.inverse(L) / x: how
many times more of that cost a vanilla model needs (per its fit) to reach the method's loss;
> 1 means the method is worth more than its cost. It is given per size from the measured mean
loss, per size from the method's own fit, and as the geometric mean of the latter over the sizes,
each with a percentile interval from a bootstrap over seeds (each (method, size) cell's seeds
resampled with replacement, every fit redone in the form chosen for the point estimate). A cell
with one seed adds no spread. Vanilla never reaching the loss (L <= its E) gives an infinite
multiplier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_latent.analysis.figures import save_png

AXES = {
    "params": "non-embedding parameters",
    "train_flops": "training FLOPs",
    "inference_flops": "inference FLOPs per token",
}
_ALPHAS = np.geomspace(0.01, 4.0, 241)


@dataclass(frozen=True)
class Point:
    """One finished run: its method (a label such as "vanilla", "latent-N1"), size, seed, costs
    and final validation loss."""

    method: str
    size: str
    seed: int
    params: float  # non-embedding parameters
    train_flops: float
    inference_flops: float  # per token
    loss: float

    def x(self, axis: str) -> float:
        return float(getattr(self, axis))


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = E + A (x / x0)^-alpha; form "saturating" (E fitted) or "power" (E = 0)."""

    form: str
    E: float
    A: float
    alpha: float
    x0: float
    rss: float  # residual sum of squares over the fitted (mean) points
    points: int

    def loss(self, x):
        return self.E + self.A * (np.asarray(x, dtype=float) / self.x0) ** -self.alpha

    def inverse(self, loss: float) -> float:
        """The x at which the curve reaches `loss`: inf when it never does (loss <= E), nan when
        the curve does not fall with x (alpha <= 0)."""
        if not self.alpha > 0 or not self.A > 0:
            return math.nan
        if loss <= self.E:
            return math.inf
        return self.x0 * ((loss - self.E) / self.A) ** (-1.0 / self.alpha)

    def describe(self) -> str:
        if self.form == "saturating":
            return f"L = {self.E:.4f} + {self.A:.4f} (x/{self.x0:.3g})^-{self.alpha:.3f}"
        return f"L = {self.A:.4f} (x/{self.x0:.3g})^-{self.alpha:.3f} (pure power law)"


def _with_rss(law: PowerLaw, x: np.ndarray, y: np.ndarray) -> PowerLaw:
    rss = float(np.sum((law.loss(x) - y) ** 2))
    return PowerLaw(law.form, law.E, law.A, law.alpha, law.x0, rss, law.points)


def _best_on_grid(lx: np.ndarray, y: np.ndarray, alphas: np.ndarray, floor: bool):
    """(E, A, index) of the alpha with the least squared residual, vectorized over alphas: with
    `floor`, (E, A) by least squares with 0 <= E < min y and A > 0 required; without, E = 0 and A
    by least squares. None when no alpha is feasible."""
    u = np.exp(-alphas[:, None] * lx[None, :])  # (grid, points)
    with np.errstate(divide="ignore", invalid="ignore"):
        if floor:
            um, ym = u.mean(axis=1, keepdims=True), y.mean()
            du = u - um
            a = (du * (y - ym)[None, :]).sum(axis=1) / (du**2).sum(axis=1)
            e = ym - a * um[:, 0]
        else:
            a, e = (u * y[None, :]).sum(axis=1) / (u**2).sum(axis=1), np.zeros(len(alphas))
    rss = ((e[:, None] + a[:, None] * u - y[None, :]) ** 2).sum(axis=1)
    feasible = np.isfinite(rss) & (a > 0) & (e >= 0) & (e < y.min())
    if not feasible.any():
        return None
    i = int(np.argmin(np.where(feasible, rss, np.inf)))
    return float(e[i]), float(a[i]), i


def _fit_grid(lx, y, x0, floor: bool):
    """The best law of one form (None if none is feasible) and whether its alpha is inside the
    grid; the grid is refined three times around the best (each 50x finer)."""
    best = _best_on_grid(lx, y, _ALPHAS, floor)
    if best is None:
        return None, False
    e, a, i = best
    grid, j, alpha = _ALPHAS, i, _ALPHAS[i]
    for _ in range(3):
        fine = np.geomspace(grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)], 101)
        refined = _best_on_grid(lx, y, fine, floor)
        if refined is None:
            break
        e, a, j = refined
        grid, alpha = fine, fine[j]
    law = PowerLaw("saturating" if floor else "power", e, a, float(alpha), x0, 0.0, len(y))
    return _with_rss(law, np.exp(lx) * x0, y), 0 < i < len(_ALPHAS) - 1


def fit_power_law(x: Sequence[float], loss: Sequence[float], form: Optional[str] = None) -> PowerLaw:
    """The fit of `loss` against `x` (same length; repeated x are averaged first). `form`
    None chooses (see the module docstring); "saturating" or "power" forces one (a forced
    saturating fit with no feasible point falls back to the power law)."""
    x, y = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("fit_power_law: x and loss must be 1-D and of the same length")
    if (x <= 0).any() or (y <= 0).any() or not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError("fit_power_law: x and loss must be finite and > 0")
    xs = np.unique(x)
    if len(xs) < 2:
        raise ValueError("fit_power_law: need at least 2 distinct x")
    y = np.array([y[x == v].mean() for v in xs])
    x0 = float(np.exp(np.log(xs).mean()))
    lx = np.log(xs / x0)
    slope, intercept = np.polyfit(lx, np.log(y), 1)
    power, _ = _fit_grid(lx, y, x0, floor=False) if slope < 0 else (None, False)
    if power is None:
        # The loss does not fall with x (or not within the grid): the log-log line, alpha <= 0 or
        # outside the grid, which gives no multiplier when alpha <= 0.
        power = _with_rss(PowerLaw("power", 0.0, float(math.exp(intercept)), float(-slope), x0, 0.0, len(y)),
                          xs, y)
    if form == "power" or (form is None and len(xs) < 4) or power.alpha <= 0:
        return power
    sat, interior = _fit_grid(lx, y, x0, floor=True)
    if sat is None:
        return power
    floor_helps = sat.rss < 0.5 * power.rss - 1e-12 * float(np.sum(y**2))
    if form is None and not (interior and 0 < sat.E < y.min() and floor_helps):
        return power
    return sat


def multiplier(baseline: PowerLaw, x: float, loss: float) -> float:
    """How many times `x` the baseline needs (per its fit) to reach `loss`."""
    return baseline.inverse(loss) / x


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def __str__(self):
        return f"{_num(self.value)} [{_num(self.low)}, {_num(self.high)}]"


def _num(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3g}")


@dataclass
class AxisResult:
    """One axis' fits and the multipliers of every method against the baseline."""

    axis: str
    fits: Dict[str, PowerLaw]
    sizes: List[str]
    x: Dict[str, Dict[str, float]]  # method -> size -> mean x
    loss: Dict[str, Dict[str, float]]  # method -> size -> mean loss
    measured: Dict[str, Dict[str, Estimate]] = field(default_factory=dict)  # method -> size -> from the mean loss
    fitted: Dict[str, Dict[str, Estimate]] = field(default_factory=dict)  # method -> size -> from its fit
    overall: Dict[str, Estimate] = field(default_factory=dict)  # geometric mean over the sizes of `fitted`


def _cells(points: Sequence[Point]) -> Dict[Tuple[str, str], List[Point]]:
    cells: Dict[Tuple[str, str], List[Point]] = {}
    for p in points:
        cells.setdefault((p.method, p.size), []).append(p)
    return cells


def _multipliers(fits, xs, losses, baseline, methods, sizes):
    """(measured, fitted, overall) point values for one set of cell means."""
    base = fits[baseline]
    measured = {m: {s: multiplier(base, xs[m][s], losses[m][s]) for s in sizes if s in xs[m]} for m in methods}
    fitted = {m: {s: multiplier(base, xs[m][s], float(fits[m].loss(xs[m][s]))) for s in sizes if s in xs[m]}
              for m in methods}
    overall = {}
    for m in methods:
        v = np.array(list(fitted[m].values()))
        overall[m] = float(np.exp(np.log(v).mean())) if len(v) and (v > 0).all() else math.nan
    return measured, fitted, overall


def _interval(samples: List[float], value: float, confidence: float) -> Estimate:
    """Percentile interval by order statistics (so infinite samples are fine; nans dropped)."""
    s = sorted(v for v in samples if not math.isnan(v))
    if not s:
        return Estimate(value, math.nan, math.nan)
    tail = (1 - confidence) / 2
    lo = s[min(len(s) - 1, int(math.floor(tail * len(s))))]
    hi = s[max(0, int(math.ceil((1 - tail) * len(s))) - 1)]
    return Estimate(value, lo, hi)


def analyze(points: Sequence[Point], baseline: str = "vanilla", axes: Sequence[str] = tuple(AXES),
            bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> Dict[str, AxisResult]:
    """Fits and multipliers on every axis (see the module docstring). Every method needs >= 2
    sizes; the baseline's must be among `points`."""
    cells = _cells(points)
    methods = sorted({m for m, _ in cells})
    if baseline not in methods:
        raise ValueError(f"no points of the baseline method {baseline!r} (methods: {', '.join(methods)})")
    order = {}
    for p in sorted(points, key=lambda p: p.params):
        order.setdefault(p.size, len(order))
    sizes = sorted(order, key=order.get)
    rng = np.random.default_rng(seed)
    results = {}
    for axis in axes:
        xs = {m: {s: float(np.mean([p.x(axis) for p in cells[m, s]])) for (mm, s) in cells if mm == m}
              for m in methods}
        losses = {m: {s: float(np.mean([p.loss for p in cells[m, s]])) for (mm, s) in cells if mm == m}
                  for m in methods}
        fits = {}
        for m in methods:
            if len(xs[m]) < 2:
                raise ValueError(f"method {m!r}: {len(xs[m])} size(s); a fit needs at least 2")
            s_list = list(xs[m])
            fits[m] = fit_power_law([xs[m][s] for s in s_list], [losses[m][s] for s in s_list])
        measured, fitted, overall = _multipliers(fits, xs, losses, baseline, methods, sizes)
        boot = {"measured": {m: {s: [] for s in measured[m]} for m in methods},
                "fitted": {m: {s: [] for s in fitted[m]} for m in methods},
                "overall": {m: [] for m in methods}}
        for _ in range(bootstrap):
            bl = {m: {} for m in methods}
            for (m, s), members in cells.items():
                pick = rng.integers(0, len(members), len(members))
                bl[m][s] = float(np.mean([members[i].loss for i in pick]))
            bfits = {m: fit_power_law([xs[m][s] for s in xs[m]], [bl[m][s] for s in xs[m]], form=fits[m].form)
                     for m in methods}
            bm, bf, bo = _multipliers(bfits, xs, bl, baseline, methods, sizes)
            for m in methods:
                for s in bm[m]:
                    boot["measured"][m][s].append(bm[m][s])
                    boot["fitted"][m][s].append(bf[m][s])
                boot["overall"][m].append(bo[m])
        r = AxisResult(axis, fits, sizes, xs, losses)
        for m in methods:
            r.measured[m] = {s: _interval(boot["measured"][m][s], measured[m][s], confidence) for s in measured[m]}
            r.fitted[m] = {s: _interval(boot["fitted"][m][s], fitted[m][s], confidence) for s in fitted[m]}
            r.overall[m] = _interval(boot["overall"][m], overall[m], confidence)
        results[axis] = r
    return results


def format_fits(results: Dict[str, AxisResult]) -> str:
    """A Markdown table of every method's fit on every axis."""
    lines = ["| axis | method | form | E | A | alpha | x0 | sizes | rms residual |", "|---" * 9 + "|"]
    for axis, r in results.items():
        for m, f in r.fits.items():
            lines.append(f"| {AXES[axis]} | {m} | {f.form} | {f.E:.4f} | {f.A:.4f} | {f.alpha:.3f} | {f.x0:.3g} "
                         f"| {f.points} | {math.sqrt(f.rss / f.points):.2g} |")
    return "\n".join(lines)


def format_multipliers(results: Dict[str, AxisResult], baseline: str = "vanilla", confidence: float = 0.95) -> str:
    """A Markdown table per axis: each method's multiplier against `baseline` at each size (from
    the measured mean loss; from the fits) and over the sizes, with its bootstrap interval."""
    out = []
    for axis, r in results.items():
        sizes = r.sizes
        out += [f"Effective {AXES[axis]} multiplier against {baseline} (how many times the method's {AXES[axis]} "
                f"{baseline} needs for its loss; {confidence:.0%} bootstrap interval over seeds):", "",
                "| method | estimate | " + " | ".join(sizes) + " | over the sizes (fit) |",
                "|---|---|" + "---|" * (len(sizes) + 1)]
        for m in r.fits:
            if m == baseline:
                continue
            for name, table in (("measured", r.measured[m]), ("fit", r.fitted[m])):
                cells = [str(table[s]) if s in table else "-" for s in sizes]
                last = str(r.overall[m]) if name == "fit" else ""
                out.append(f"| {m} | {name} | " + " | ".join(cells) + f" | {last} |")
        out.append("")
    return "\n".join(out).rstrip()


def plot_scaling(results: Dict[str, AxisResult], points: Sequence[Point], out_png: str) -> None:
    """Validation loss against each axis (log x), one colour per method: the seeds' mean with its
    spread, and the fitted curve. Written atomically."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cells = _cells(points)
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.3), squeeze=False)
    for ax, (axis, r) in zip(axes[0], results.items()):
        for k, (m, fit) in enumerate(r.fits.items()):
            color = f"C{k}"
            s_list = sorted(r.x[m], key=r.x[m].get)
            xs = [r.x[m][s] for s in s_list]
            sd = [float(np.std([p.loss for p in cells[m, s]])) for s in s_list]
            ax.errorbar(xs, [r.loss[m][s] for s in s_list], yerr=sd, fmt="o", color=color, markersize=4, capsize=2)
            grid = np.geomspace(min(xs), max(xs), 100)
            ax.plot(grid, fit.loss(grid), color=color, label=f"{m} ({fit.form}, alpha {fit.alpha:.2f})")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out_png)
