"""analysis/scaling.py on synthetic points whose law and multipliers are known exactly."""

import math

import numpy as np
import pytest

from megatron_latent.analysis.scaling import (
    Point,
    analyze,
    fit_power_law,
    format_fits,
    format_multipliers,
    multiplier,
    plot_scaling,
)

E, A, ALPHA = 2.0, 3.0, 0.35
SIZES = {"s1": 2e4, "s2": 6e4, "s3": 2e5, "s4": 6e5, "s5": 2e6}  # 100x
RATIO = 20  # tokens per parameter


def vanilla_loss(n):
    return E + A * (n / 1e5) ** -ALPHA


def _points(k=2.0, train_cost=4.0, infer_cost=2.0, noise=0.0, seeds=(1, 2, 3), sizes=SIZES, seed=0):
    """vanilla at N params (train FLOPs 6 N D with D = RATIO N, inference 2 N per token); a method
    with the loss vanilla has at k N, `train_cost` x vanilla's training FLOPs and `infer_cost` x its
    inference FLOPs, at the same N. Gaussian noise of `noise` nats on every run."""
    rng = np.random.default_rng(seed)
    pts = []
    for s, n in sizes.items():
        for sd in seeds:
            for method, loss, tc, ic in (("vanilla", vanilla_loss(n), 1.0, 1.0),
                                         ("latent", vanilla_loss(k * n), train_cost, infer_cost)):
                pts.append(Point(method, s, sd, n, tc * 6 * n * RATIO * n, ic * 2 * n,
                                 loss + noise * rng.standard_normal()))
    return pts


def test_exact_points_recover_the_saturating_law():
    n = np.array(list(SIZES.values()))
    fit = fit_power_law(n, vanilla_loss(n))
    assert fit.form == "saturating"
    assert fit.E == pytest.approx(E, abs=1e-3) and fit.alpha == pytest.approx(ALPHA, rel=2e-3)
    assert fit.loss(3e5) == pytest.approx(vanilla_loss(3e5), abs=1e-5)
    assert fit.inverse(vanilla_loss(3e5)) == pytest.approx(3e5, rel=1e-3)
    assert fit.inverse(E - 0.1) == math.inf  # below the floor: never reached


def test_fallback_to_a_pure_power_law():
    n = np.array([1e4, 1e5, 1e6])  # three sizes cannot support three parameters
    fit = fit_power_law(n, 5.0 * (n / 1e5) ** -0.1)
    assert fit.form == "power" and fit.E == 0.0
    assert fit.alpha == pytest.approx(0.1, rel=1e-5) and fit.loss(1e5) == pytest.approx(5.0, rel=1e-5)
    # Four sizes on a straight log-log line show no floor: the power law again, exactly.
    n4 = np.array([1e4, 1e5, 1e6, 1e7])
    fit4 = fit_power_law(n4, 5.0 * (n4 / 1e5) ** -0.1)
    assert fit4.form == "power" and fit4.alpha == pytest.approx(0.1, rel=1e-5)
    # A loss rising with x: the log-log line, alpha < 0, no multiplier.
    rising = fit_power_law(n4, 3.0 * (n4 / 1e5) ** 0.05)
    assert rising.form == "power" and rising.alpha == pytest.approx(-0.05) and math.isnan(rising.inverse(3.0))
    with pytest.raises(ValueError, match="at least 2 distinct"):
        fit_power_law([1e4, 1e4], [3.0, 3.1])


def test_multiplier_of_a_known_method_on_every_axis():
    k, tc, ic = 2.0, 4.0, 2.0
    res = analyze(_points(k, tc, ic), bootstrap=20)
    # Params: vanilla needs k x the parameters at every size, measured and from the fit.
    for s in SIZES:
        assert res["params"].measured["latent"][s].value == pytest.approx(k, rel=1e-2)
        assert res["params"].fitted["latent"][s].value == pytest.approx(k, rel=1e-2)
    assert res["params"].overall["latent"].value == pytest.approx(k, rel=1e-2)
    # Training FLOPs grow as N^2 at a fixed ratio: vanilla at k N spends k^2 its FLOPs at N,
    # against the method's tc of them.
    assert res["train_flops"].overall["latent"].value == pytest.approx(k**2 / tc, rel=2e-2)
    # Inference FLOPs per token grow as N: k against ic.
    assert res["inference_flops"].overall["latent"].value == pytest.approx(k / ic, rel=2e-2)
    # Vanilla against itself: 1.
    assert res["params"].overall["vanilla"].value == pytest.approx(1.0, rel=1e-3)


def test_noisy_seeds_recover_the_multiplier_within_its_interval():
    k = 2.0
    res = analyze(_points(k, noise=0.005, seeds=(1, 2, 3, 4)), bootstrap=200, seed=1)
    est = res["params"].overall["latent"]
    assert est.value == pytest.approx(k, rel=0.15)
    assert est.low < k < est.high and est.high / est.low < 2.5


def test_a_method_identical_to_vanilla_has_multiplier_one_inside_its_interval():
    pts = _points(k=1.0, train_cost=1.0, infer_cost=1.0, noise=0.01, seeds=(1, 2, 3))
    res = analyze(pts, bootstrap=200, seed=2)
    for axis in ("params", "train_flops", "inference_flops"):
        est = res[axis].overall["latent"]
        assert est.low <= 1.0 <= est.high, (axis, est)
        # Per size, an interval from a few seeds misses now and then (95%, and a bootstrap over
        # 3 seeds is narrow): most hold 1.
        held = [m.low <= 1.0 <= m.high for m in res[axis].measured["latent"].values()]
        assert sum(held) >= len(SIZES) - 1, (axis, res[axis].measured["latent"])


def test_tables_and_plot(tmp_path):
    pts = _points(noise=0.003)
    res = analyze(pts, bootstrap=20)
    fits = format_fits(res)
    assert fits.count("\n") == 2 + 3 * 2 - 1 and "| non-embedding parameters | latent | saturating |" in fits
    mult = format_multipliers(res)
    assert mult.count("| latent | measured |") == 3 and "over the sizes" in mult
    out = tmp_path / "scaling.png"
    plot_scaling(res, pts, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors():
    with pytest.raises(ValueError, match="baseline method 'vanilla'"):
        analyze([p for p in _points() if p.method != "vanilla"], bootstrap=1)
    assert multiplier(fit_power_law([1e4, 1e5], [3.0, 2.0]), 1e4, 3.0) == pytest.approx(1.0)
