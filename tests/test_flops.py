"""The FLOP counter agrees with the design brief's exact ratios and the closed form."""

import pytest

from megatron_latent.models.flops import decoder_pass_flops, latent_step_flops


def test_latent_flop_ratio_of_the_design_brief():
    # 4 layers, H=256, V=2048, L=256 (ffn 4H): exact ratios 7.0 (J=2) and 9.0 (J=3) to vanilla.
    kw = dict(vocab=2048, hidden=256, num_layers=4, ffn_hidden=1024, num_heads=4)
    base = latent_step_flops(256, 0, 0, **kw)
    assert latent_step_flops(256, 1, 2, **kw) / base == pytest.approx(7.0, abs=0.01)
    assert latent_step_flops(256, 1, 3, **kw) / base == pytest.approx(9.0, abs=0.01)


def test_decoder_units_match_the_cost_formula_without_attention_growth():
    # Decoder work, ignoring the quadratic attention term, is N(N+1)/2 + (J+1)(N+1) plain passes.
    H, F = 64, 256
    lin = decoder_pass_flops(100, H, 2, F, 4) - 2 * 2 * 100 * 100 * H * 2  # strip attention
    for n, j in [(1, 2), (2, 3), (3, 1)]:
        units = n * (n + 1) // 2 + (j + 1) * (n + 1)
        total = latent_step_flops(100, n, j, 1, H, 2, F, 4, training=False) - 2 * 100 * H
        attention = sum(2 * 2 * (k * 100) ** 2 * H * 2 for k in list(range(1, n + 1)) + [n + 1] * (j + 1))
        assert total - attention == units * lin
