"""The latent-thought forward (TP=1, in process): N=0 is vanilla, the Jacobi forward reaches the
exact sequential rollout, gradients flow through every pass and match finite differences."""

import pytest
import torch

from megatron_latent.config import ConfigError, LatentSettings, get_preset
from megatron_latent.inference.reference import sequential_logits
from megatron_latent.models import slots
from parallel_utils import batch, init_weights, tiny_config, tiny_gpt

pytestmark = pytest.mark.usefixtures("single_rank")
L = 8


def _model(n, pos="rope", scale=False, dtype=torch.float32, **cfg):
    settings = LatentSettings(num_latent_thoughts=n, scale_embeddings=scale) if n or scale else LatentSettings()
    m = tiny_gpt(tiny_config(params_dtype=dtype, **cfg), position_embedding_type=pos, latent=settings)
    init_weights([m])
    return m.to(dtype).eval()


def _doc_inputs(b=2):
    """Two documents per row (split at a different place per row): reset positions and mask."""
    d = batch(0, b, L)
    splits = [3, 5][:b]
    pos, mask = [], torch.zeros(b, 1, L, L, dtype=torch.bool)
    for r, s in enumerate(splits):
        doc = (torch.arange(L) >= s).long()
        pos.append(torch.where(doc == 0, torch.arange(L), torch.arange(L) - s))
        mask[r, 0] = slots.causal_mask(L)[0, 0] | (doc[:, None] != doc[None, :])
    return d["tokens"], torch.stack(pos), mask


def test_n0_is_exactly_vanilla_gpt():
    torch.manual_seed(0)
    latent, vanilla = _model(0), tiny_gpt(tiny_config())
    vanilla.load_state_dict(latent.state_dict())
    assert list(latent.state_dict()) == list(vanilla.state_dict())
    d = batch(1, 2, L)
    la = latent(d["tokens"], d["position_ids"], None, labels=d["labels"]).mean()
    lv = vanilla.eval()(d["tokens"], d["position_ids"], None, labels=d["labels"]).mean()
    la.backward(), lv.backward()
    assert la.item() == lv.item()
    for (name, a), (_, b) in zip(latent.named_parameters(), vanilla.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    # The latent code path itself, at N=0, is the plain decoder forward.
    h = latent.final_hidden_states(d["tokens"], d["position_ids"], None)
    ref = vanilla.decoder(hidden_states=vanilla.embedding(d["tokens"], d["position_ids"]), attention_mask=None,
                          rotary_pos_emb=vanilla.rotary_pos_emb(L))
    torch.testing.assert_close(h, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,pos", [(1, "rope"), (2, "rope"), (3, "rope"), (1, "learned_absolute")])
def test_jacobi_fixed_point_is_the_sequential_rollout(n, pos):
    m = _model(n, pos=pos, scale=True)
    d = batch(2, 2, L)
    exact = sequential_logits(m, d["tokens"], d["position_ids"])
    # The Jacobi map is causal: L * N iterations reach the exact thoughts up to rounding.
    with torch.no_grad():
        got = m(d["tokens"], d["position_ids"], None, num_jacobi_iters=L * n)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_fixed_point_with_document_resets(n):
    m = _model(n, scale=True)
    tokens, pos, mask = _doc_inputs()
    exact = sequential_logits(m, tokens, pos, mask)
    with torch.no_grad():
        got = m(tokens, pos, mask, num_jacobi_iters=L * n)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    # Resets matter: without them the same tokens give other logits.
    with torch.no_grad():
        plain = m(tokens, batch(2, 2, L)["position_ids"], None, num_jacobi_iters=L * n)
    assert (plain - exact).abs().max() > 1e-3


def test_convergence_profile_decreases():
    m = _model(1, scale=True)
    d = batch(3, 2, L)
    exact = sequential_logits(m, d["tokens"], d["position_ids"])
    errors = []
    with torch.no_grad():
        for j in range(0, L + 1):
            got = m(d["tokens"], d["position_ids"], None, num_jacobi_iters=j)
            errors.append((got - exact).abs().max().item())
    print("\nmax |logit error| vs Jacobi iterations:", " ".join(f"J={j}:{e:.2e}" for j, e in enumerate(errors)))
    assert errors[0] > 1e-3
    assert all(b <= a * 1.01 + 1e-7 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-5


def test_every_pass_contributes_gradient(monkeypatch):
    m = _model(1, scale=True).train()
    d = batch(4, 2, L)

    def grads(detach_pass=None):
        m.zero_grad()
        calls = {"i": 0}
        original = type(m).run_pass

        def hooked(self, *a):
            out = original(self, *a)
            i, calls["i"] = calls["i"], calls["i"] + 1
            return out.detach() if i == detach_pass else out

        monkeypatch.setattr(type(m), "run_pass", hooked)
        m(d["tokens"], d["position_ids"], None, labels=d["labels"], num_jacobi_iters=2).mean().backward()
        monkeypatch.setattr(type(m), "run_pass", original)
        assert calls["i"] == 4  # growth, 2 Jacobi, final
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    full = grads()
    for p in range(3):  # the final pass carries the loss itself; detaching any earlier one changes grads
        assert (grads(detach_pass=p) - full).abs().max() > 1e-6


def _grads(m, d, j):
    m.zero_grad()
    loss = m(d["tokens"], d["position_ids"], None, labels=d["labels"], num_jacobi_iters=j).mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])


@pytest.mark.parametrize("n,j", [(1, 2), (2, 1)])
def test_grad_passes_backpropagate_through_the_last_k_passes_only(monkeypatch, n, j):
    """grad_passes k: the passes before the last k keep no graph. Equal to detaching their outputs;
    k = all passes is the full backpropagation, bit for bit."""
    import dataclasses

    m = _model(n, scale=True).train()
    d = batch(6, 2, L)
    total = len(m.latent.pass_slots(j))
    full = _grads(m, d, j)
    original = type(m).run_pass
    for k in range(1, total + 1):
        # The reference: the full graph with the outputs of the first total - k passes detached.
        calls = {"i": 0}

        def detached(self, *a):
            out = original(self, *a)
            i, calls["i"] = calls["i"], calls["i"] + 1
            return out.detach() if i < total - k else out

        monkeypatch.setattr(type(m), "run_pass", detached)
        ref = _grads(m, d, j)
        monkeypatch.setattr(type(m), "run_pass", original)
        m.latent = dataclasses.replace(m.latent, grad_passes=k)
        got = _grads(m, d, j)
        m.latent = dataclasses.replace(m.latent, grad_passes=None)
        assert got[0] == ref[0] == full[0]  # the forward is the same
        assert torch.equal(got[1], ref[1]), k
        assert (k == total) == torch.equal(got[1], full[1]), k


def test_gradient_matches_finite_differences_float64():
    m = _model(1, scale=True, dtype=torch.float64).train()
    d = batch(5, 1, 4)
    params = [p for p in m.parameters()]

    def loss():
        # From the logits: megatron's fused loss computes in float32.
        logits = m(d["tokens"], d["position_ids"], None, num_jacobi_iters=1)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), d["labels"].flatten())

    loss().backward()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        analytic = sum((p.grad * u).sum() for p, u in zip(params, direction)).item()
        eps = 1e-6
        with torch.no_grad():
            for p, u in zip(params, direction):
                p.add_(eps * u)
            up = loss().item()
            for p, u in zip(params, direction):
                p.sub_(2 * eps * u)
            down = loss().item()
            for p, u in zip(params, direction):
                p.add_(eps * u)
        assert (up - down) / (2 * eps) == pytest.approx(analytic, rel=1e-6)


def test_jacobi_draw_is_per_step_and_in_range():
    s = LatentSettings(num_latent_thoughts=1, jacobi_iters=(2, 3))
    draws = [s.jacobi_iters_for_step(k, seed=7) for k in range(200)]
    assert set(draws) == {2, 3}
    assert draws == [LatentSettings(1, (2, 3)).jacobi_iters_for_step(k, seed=7) for k in range(200)]
    assert draws != [s.jacobi_iters_for_step(k, seed=8) for k in range(200)]
    assert s.pass_slots(2) == [1, 2, 2, 2]
    assert LatentSettings(2).pass_slots(3) == [1, 2, 3, 3, 3, 3]
    assert LatentSettings(0).pass_slots(3) == [1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_latent_thoughts=-1), "num_latent_thoughts must be an integer >= 0"),
        (dict(num_latent_thoughts=1, jacobi_iters=(3, 2)), r"jacobi_iters \[3, 2\]"),
        (dict(num_latent_thoughts=1, jacobi_iters=(-1, 2)), r"jacobi_iters \[-1, 2\]"),
        (dict(num_latent_thoughts=1, jacobi_iters_eval=-1), "jacobi_iters_eval must be >= 0"),
    ],
)
def test_bad_latent_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LatentSettings(**kwargs)


def test_latent_settings_inside_the_model_config():
    cfg = get_preset("tiny-pythia", num_latent_thoughts=1)
    assert cfg.latent.jacobi_iters == (2, 4)  # the family's default range, filled in once N > 0
    assert cfg.replace(num_latent_thoughts=0).latent.jacobi_iters is None  # a vanilla model has no J
    assert cfg.replace(jacobi_iters=(1, 4)).latent == LatentSettings(1, (1, 4))
    # Round trip, and the flat latent fields of older checkpoints.
    d = cfg.to_dict()
    assert type(cfg).from_dict(d) == cfg
    flat = {k: v for k, v in d.items() if k != "latent"} | d["latent"]
    assert type(cfg).from_dict(flat) == cfg
    with pytest.raises(ConfigError, match="unknown model config fields: jacobi_seed"):
        type(cfg).from_dict(flat | {"jacobi_seed": 1})


@pytest.mark.parametrize("preset,passes", [("tiny-pythia", True), ("tiny-llama", False), ("tiny-gpt2", True)])
def test_paper_init(preset, passes):
    # std sqrt(2/(5H)), truncated at 3 std; output projections / sqrt(2 * layers * (N+1)) in the authors'
    # GPT-NeoX code (and our GPT-2), / sqrt(2 * layers) in their LLaMA code.
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel

    cfg = get_preset(preset, num_latent_thoughts=1)
    H, layers, n = cfg.hidden_size, cfg.num_layers, cfg.latent.num_latent_thoughts
    torch.manual_seed(0)
    m = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent)
    std = (2 / (5 * H)) ** 0.5
    out_std = std / (2 * layers * ((n + 1) if passes else 1)) ** 0.5
    weights = [(m.embedding.word_embeddings.weight, std)]
    if not cfg.tie_embeddings:
        weights.append((m.output_layer.weight, std))
    for layer in m.decoder.layers:
        weights += [(layer.self_attention.linear_qkv.weight, std), (layer.self_attention.linear_proj.weight, out_std),
                    (layer.mlp.linear_fc1.weight, std), (layer.mlp.linear_fc2.weight, out_std)]
    # The std of a normal truncated at 3 sigma is sqrt(1 - 6 phi(3) / (2 Phi(3) - 1)) = 0.98658 sigma. The
    # sample std of k draws has a relative standard error of about 1/sqrt(2k): allow 5 of them, per
    # tensor and over all weights pooled (~200k draws: 0.8%, which tells 0.98658 from 0.9733).
    trunc = 0.98658
    for w, s in weights:
        assert w.std().item() == pytest.approx(trunc * s, rel=5 / (2 * w.numel()) ** 0.5)
        assert w.abs().max().item() <= 3 * s + 1e-7
    pooled = torch.cat([(w / s).flatten() for w, s in weights])
    assert pooled.std().item() == pytest.approx(trunc, rel=5 / (2 * pooled.numel()) ** 0.5)
    layer = m.decoder.layers[0]
    assert torch.equal(m.decoder.final_layernorm.weight, torch.ones(H))
    if cfg.add_qkv_bias:
        assert torch.equal(layer.self_attention.linear_qkv.bias, torch.zeros_like(layer.self_attention.linear_qkv.bias))


@pytest.mark.parametrize("preset,scaled_out", [("tiny-pythia", False), ("tiny-llama", False), ("tiny-gpt2", True)])
def test_hf_init_of_the_paper_baselines(preset, scaled_out):
    # --init-method-std s: the stock HF init, normal(0, s) (not truncated); only HF's GPT-2 scales c_proj.
    from megatron_latent.models.gpt import build_gpt_model

    cfg = get_preset(preset, init_method_std=0.05)
    torch.manual_seed(0)
    m = build_gpt_model(cfg)
    out_std = 0.05 / (2 * cfg.num_layers) ** 0.5 if scaled_out else 0.05
    layers = m.decoder.layers
    qkv = torch.cat([x.self_attention.linear_qkv.weight.flatten() for x in layers])
    out = torch.cat([x.mlp.linear_fc2.weight.flatten() for x in layers])
    assert qkv.std().item() == pytest.approx(0.05, rel=5 / (2 * qkv.numel()) ** 0.5)
    assert out.std().item() == pytest.approx(out_std, rel=5 / (2 * out.numel()) ** 0.5)
    assert qkv.abs().max().item() > 3.5 * 0.05  # not truncated (P(|x| > 3.5 sigma) * 49k draws ~ 23)


def test_paper_defaults_per_family():
    # The authors' training J ranges: GPT-NeoX torch.randint(2, 5), LLaMA torch.randint(2, 4).
    presets = ("pythia-410m", "llama-410m", "gpt2-small")
    ranges = {p: get_preset(p, num_latent_thoughts=1).latent.jacobi_iters for p in presets}
    assert ranges == {"pythia-410m": (2, 4), "llama-410m": (2, 3), "gpt2-small": (2, 3)}
    on, off = get_preset("pythia-410m", num_latent_thoughts=1), get_preset("pythia-410m")
    assert on.latent.scale_embeddings and on.latent.jacobi_iters_eval == 3
    assert not off.latent.scale_embeddings and off.latent.jacobi_iters is None and off.init_method_std is None
    assert on.replace(scale_embeddings=False).latent.scale_embeddings is False
    assert "training J drawn from {2, 3, 4}" in on.describe() and "sqrt(2.5 H)" in on.describe()
