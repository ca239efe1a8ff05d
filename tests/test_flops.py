"""models.flops against an independent count: torch's FlopCounterMode over a real forward (and
backward) of tiny product models, vanilla, latent and every baseline; and the per-token decoding
counts, summed over a sequence, against the causal forward's.

What FlopCounterMode counts here: every matmul (aten mm/addmm for the linear layers and the output
layer, baddbmm/bmm for the local spec's core attention QK^T and AV on CPU, at 2 FLOPs per
multiply-add; the bias add of addmm/baddbmm is not counted) and their backward matmuls. The local
spec's attention runs torch's fused kernel (models.attention), whose CPU variant torch's counter
does not know: it is counted below with torch's own formula for the GPU variants (QK^T and AV over
the full S x S, as models.flops counts them). It does not
count elementwise work (norms, activations, softmax, rotary, the thought feedback, cross-entropy) or
embedding lookups, and neither does models.flops. So the two must agree exactly.
"""

import pytest
import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from megatron_latent.config import ModelConfig
from megatron_latent.models.flops import decoder_pass_flops, model_decode_bytes, model_decode_flops, model_step_flops

pytestmark = pytest.mark.usefixtures("single_rank")
B, S = 2, 8

aten = torch.ops.aten
# The CPU flash kernels take (query, key, value, ...) and (grad_out, query, key, value, ...) like the
# GPU ones that torch's formulas cover.
@flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_flop(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


@flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    # The four matmuls of the backward (dV, dP, dQ, dK), as the unfused path runs them; the fused
    # kernel also recomputes QK^T, which torch's formula adds and models.flops does not count.
    return 2 * flop_counter.sdpa_flop_count(query, key, value)


def _config(preset, n):
    from megatron_latent.config import get_preset

    # llama: grouped-query attention and the gated MLP; gpt2: biases, plain MLP, learned positions.
    return get_preset(preset, num_layers=2, hidden_size=32, ffn_hidden_size=48, num_latent_thoughts=n,
                      jacobi_iters=(1, 3) if n else (2, 3))


def _model(cfg):
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel

    if cfg.latent.num_latent_thoughts == 0:
        return build_gpt_model(cfg, use_te=False)  # the plain GPTModel: vanilla
    return build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent, use_te=False)


def _counted(model, n, j, training, jacobi=None):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (B, S + 1), generator=g)
    pos = torch.arange(S).expand(B, S)
    kw = {"num_jacobi_iters": j} if n or jacobi else {}
    model.train(training)
    with FlopCounterMode(display=False) as counter:
        if training:
            model(tokens[:, :-1], pos, None, labels=tokens[:, 1:], **kw).sum().backward()
        else:
            with torch.no_grad():
                model(tokens[:, :-1], pos, None, **kw)
    return counter.get_total_flops()


@pytest.mark.parametrize("training", [False, True], ids=["forward", "train"])
@pytest.mark.parametrize("n,j", [(0, 0), (1, 2), (2, 1)])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_flops_equal_torch_flop_counter(preset, n, j, training):
    cfg = _config(preset, n)
    expected = B * model_step_flops(cfg, S, j, training=training)
    assert _counted(_model(cfg), n, j, training) == expected


@pytest.mark.parametrize("k", [1, 2, 3])
def test_flops_with_grad_passes_equal_torch_flop_counter(k):
    # N=1, J=2: 4 passes; the first 4 - k are forward only.
    cfg = _config("tiny-llama", 1).replace(grad_passes=k)
    expected = B * model_step_flops(cfg, S, 2)
    assert _counted(_model(cfg), 1, 2, True) == expected
    full = model_step_flops(cfg.replace(grad_passes=None), S, 2)
    assert (expected < B * full) == (k < 4)


# The brief's sizes: 4 layers, H=256, V=2048, L=256 (ffn 4H), plain MLP, no grouped queries.
BRIEF = ModelConfig(name="b", arch="gpt-neox", num_layers=4, hidden_size=256, num_attention_heads=4,
                    ffn_hidden_size=1024, vocab_size=2048, make_vocab_size_divisible_by=1, seq_length=256)


def test_latent_flop_ratio_of_the_design_brief():
    # Exact ratios 7.0 (J=2) and 9.0 (J=3) to vanilla.
    base = model_step_flops(BRIEF, 256, 0)
    assert model_step_flops(BRIEF.replace(num_latent_thoughts=1), 256, 2) / base == pytest.approx(7.0, abs=0.01)
    assert model_step_flops(BRIEF.replace(num_latent_thoughts=1), 256, 3) / base == pytest.approx(9.0, abs=0.01)


# ------------------------------------------------------------------ the baselines
def _method_config(preset, **method):
    cfg = _config(preset, 0).replace(**method)
    return cfg.replace(jacobi_iters=(1, 3)) if cfg.latent.num_latent_thoughts else cfg


def _method_model(cfg):
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel

    return build_gpt_model(cfg, model_cls=LatentGPTModel, use_te=False)


@pytest.mark.parametrize("training", [False, True], ids=["forward", "train"])
@pytest.mark.parametrize("method,j", [
    (dict(num_pause_tokens=2), 0),
    (dict(num_extra_loops=2), 0),
    (dict(num_latent_thoughts=1, thought_input="interpolated"), 2),
    (dict(num_latent_thoughts=2, thought_input="interpolated", interpolation_topk=5), 1),
    (dict(num_ponder_steps=2), 0),
    (dict(num_ponder_steps=2, ponder_feedback="hidden"), 0),
], ids=["pause", "loop", "interpolated", "interpolated-topk-n2", "ponder", "ponder-hidden"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_method_flops_equal_torch_flop_counter(preset, method, j, training):
    cfg = _method_config(preset, **method)
    expected = B * model_step_flops(cfg, S, j, training=training)
    assert _counted(_method_model(cfg), cfg.latent.num_latent_thoughts, j, training, jacobi=True) == expected


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_interpolated_flops_with_grad_passes_equal_torch_flop_counter(k):
    # N=1, J=2: 4 passes, 3 of them feeding thoughts; the first 4 - k keep no graph, and the mix
    # after the last of those still gives the weights their gradients.
    cfg = _method_config("tiny-llama", num_latent_thoughts=1, thought_input="interpolated").replace(grad_passes=k)
    assert _counted(_method_model(cfg), 1, 2, True) == B * model_step_flops(cfg, S, 2)


def test_method_flops_against_vanilla():
    """The per-method structure on the brief's sizes (4 layers, H=256, V=2048, L=256)."""
    base = BRIEF
    layers = decoder_pass_flops(256, 256, 4, 1024, 4)
    out = 2 * 256 * 256 * 2048
    vanilla = model_step_flops(base, 256, 0)
    assert vanilla == 3 * (layers + out)
    # Loops: K+1 passes, the output layer once.
    assert model_step_flops(base.replace(num_extra_loops=3), 256, 0) == 3 * (4 * layers + out)
    # Pause: one pass over 4x the tokens (attention 16x), the output layer once; the pause row pads V.
    pause = base.replace(num_pause_tokens=3)
    assert model_step_flops(pause, 256, 0) == 3 * (decoder_pass_flops(1024, 256, 4, 1024, 4) + 2 * 256 * 256 * 2049)
    # Interpolated N=1 J=2: the latent count plus 3 fed passes x 2 matmuls x 3 (backward).
    interp = base.replace(num_latent_thoughts=1, thought_input="interpolated")
    latent = base.replace(num_latent_thoughts=1)
    assert model_step_flops(interp, 256, 2) - model_step_flops(latent, 256, 2) == 3 * 2 * 3 * out
    # PonderLM K=3: four forwards, the output layer once, and 3 mixes of 2 matmuls (x 3 with the
    # backward); GPT-NeoX's hidden feedback adds nothing counted.
    ponder = base.replace(num_ponder_steps=3)
    assert ponder.latent.ponder_feedback == "hidden"
    assert model_step_flops(ponder, 256, 0) == 3 * (4 * layers + out)
    assert model_step_flops(ponder.replace(ponder_feedback="interpolated"), 256, 0) == 3 * (4 * layers + out + 6 * out)


@pytest.mark.parametrize("method", [
    dict(), dict(num_latent_thoughts=1), dict(num_latent_thoughts=2, thought_input="interpolated"),
    dict(num_pause_tokens=2), dict(num_extra_loops=2), dict(num_ponder_steps=2),
    dict(num_ponder_steps=2, ponder_feedback="hidden"),
], ids=["vanilla", "latent", "interpolated", "pause", "loop", "ponder", "ponder-hidden"])
def test_decode_flops_equal_torch_flop_counter(method):
    """KV-cached decoding of each method, counted: the KV decoder's steps on megatron's static KV
    cache (the token, then its thoughts fed back or its pause slots; with extra loops one cache per
    run of the stack, each fed the previous one's output), the output layer once."""
    from megatron_latent.inference.kv_decoder import LatentKVDecoder

    cfg = _method_config("tiny-llama", **method)
    model = _method_model(cfg).eval()
    cache = LatentKVDecoder(model, 1, 4)
    valid = torch.ones(1, 1, dtype=torch.bool)
    for p in range(4):
        ids, pos = torch.tensor([[p + 3]]), torch.tensor([[p]])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.output(cache.step(ids, pos, valid), ids, pos)
        assert counter.get_total_flops() == model_decode_flops(cfg, p), p


class _KernelReads(TorchDispatchMode):
    """Bytes the matmul and attention kernels read from the given storages (weights, KV cache)."""

    KERNELS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default}

    def __init__(self, storages):
        super().__init__()
        self.storages, self.bytes = storages, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.KERNELS:
            for a in args:
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages:
                    self.bytes += a.numel() * a.element_size()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", [
    dict(), dict(num_latent_thoughts=1), dict(num_latent_thoughts=2, thought_input="interpolated"),
    dict(num_pause_tokens=2), dict(num_extra_loops=2), dict(num_ponder_steps=2),
], ids=["vanilla", "latent", "interpolated", "pause", "loop", "ponder"])
def test_decode_bytes_equal_what_the_kernels_read(method):
    """The weights (matrices; biases and norms are not counted) and the cached keys and values that
    the matmul and attention kernels of a KV-cached decoding step read, at batch 3."""
    from megatron_latent.inference.kv_decoder import LatentKVDecoder

    cfg = _method_config("tiny-llama", **method)
    model = _method_model(cfg).eval()
    b, cache = 3, LatentKVDecoder(model, 3, 5)
    valid = torch.ones(b, 1, dtype=torch.bool)
    weights = {w.untyped_storage().data_ptr() for w in model.parameters() if w.dim() > 1}
    for p in range(5):
        ids, pos = torch.full((b, 1), p + 3), torch.full((b, 1), p)
        kv = {t.untyped_storage().data_ptr() for c in cache.contexts for m in c.key_value_memory_dict.values()
              for t in m}
        with torch.no_grad(), _KernelReads(weights | kv) as reads:
            model.output(cache.step(ids, pos, valid), ids, pos)
        if p:  # the first step allocates the cache inside the step
            assert reads.bytes == model_decode_bytes(cfg, p, b), p


def test_latent_decode_reads_its_cache_twice_as_the_2x_layers_model():
    vanilla = _method_config("tiny-llama")
    lat, van = vanilla.replace(num_latent_thoughts=1), vanilla.replace(num_layers=2 * vanilla.num_layers)
    assert model_decode_flops(lat, 0) > model_decode_flops(van, 0)  # only attention differs
    assert model_decode_bytes(lat, 0, batch=0) == model_decode_bytes(van, 0, batch=0)  # the same weights
    # Per sample, each further position adds twice the cache bytes to a step.
    grow = [model_decode_bytes(c, 9, 1) - model_decode_bytes(c, 8, 1) for c in (lat, van)]
    assert grow[0] == 2 * grow[1] > 0


@pytest.mark.parametrize("n", [0, 1, 2])
def test_decode_flops_sum_to_the_causal_forward(n):
    # Over a whole sequence, decoding does every slot's matmuls once and attention over the lower
    # triangle of the (N+1) S slots; the output layer once per token.
    cfg = ModelConfig(name="d", arch="llama", num_layers=4, hidden_size=64, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=176, vocab_size=512, seq_length=16)
    cfg = cfg.replace(num_latent_thoughts=n)
    s, vocab = 16, 512
    m = (n + 1) * s
    full = decoder_pass_flops(m, hidden=64, num_layers=4, ffn_hidden=176, num_heads=4, num_query_groups=2,
                              gated_mlp=True)
    causal = full - 4 * 4 * m * m * 64 + 4 * 4 * 64 * m * (m + 1) // 2
    total = sum(model_decode_flops(cfg, p) for p in range(s))
    assert total == causal + 2 * s * 64 * vocab
