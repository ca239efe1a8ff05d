"""The CPU backend: off at import, on at parallel start-up without CUDA, inert with CUDA, and it
maps exactly what megatron needs."""

import subprocess
import sys
import textwrap

import torch

from megatron_latent import platform
from megatron_latent.platform import cpu_speedups, cuda_to_cpu

# As an entry point that runs megatron code without parallel start-up does.
platform.install_cpu_backend()


def _run(code):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_changes_nothing():
    # What tools import (preprocessing, HF mapping, configs) neither installs the backend nor pays
    # for megatron-core's tensor_parallel import.
    out = _run(
        """
        import sys, torch
        current_device = torch.cuda.current_device
        import megatron_latent, megatron_latent.config, megatron_latent.hf.mapping
        import megatron_latent.data.preprocess
        from megatron_latent import platform
        assert not platform.cpu_backend_installed()
        assert torch.cuda.current_device is current_device
        assert not torch.overrides._get_current_function_mode_stack()
        assert torch.ones(1).type() == "torch.FloatTensor"
        heavy = sorted(m for m in sys.modules if m.startswith("megatron.core"))
        assert not heavy, heavy
        print("clean")
        """
    )
    assert out == "clean"


def test_configs_import_neither_torch_nor_megatron():
    # Configs are pure data: tools that only read or write them stay light.
    out = _run(
        """
        import sys
        import megatron_latent.config
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron")))
        """
    )
    assert out == "[]"


def test_parallel_start_up_installs_it():
    out = _run(
        """
        import torch
        from megatron_latent import platform
        from megatron_latent.parallel.initialize import initialize_single_process
        assert not platform.cpu_backend_installed()
        initialize_single_process("test")
        assert platform.cpu_backend_installed()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        print("on")
        """
    )
    assert out == "on"


def test_installed_without_cuda():
    assert not torch.cuda.is_available()
    assert platform.cpu_backend_installed()
    assert platform.distributed_backend() == "gloo"
    assert platform.device() == torch.device("cpu")


def test_inert_when_cuda_is_present():
    # Simulate a CUDA machine before the package is imported: nothing may change.
    out = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True
        before = {n: getattr(torch.cuda, n) for n in
                  ("current_device", "synchronize", "get_rng_state", "set_rng_state", "manual_seed", "Stream")}
        from megatron_latent import platform
        from megatron.core.tensor_parallel import random as mrandom
        assert not platform.install_cpu_backend()
        assert not platform.cpu_backend_installed()
        assert all(getattr(torch.cuda, n) is f for n, f in before.items())
        assert not torch.overrides._get_current_function_mode_stack()
        assert mrandom._set_cuda_rng_state.__module__ == "megatron.core.tensor_parallel.random"
        assert torch.ones(1).type() == "torch.FloatTensor"
        print("inert")
        """
    )
    assert out == "inert"


def test_cuda_placements_map_to_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.arange(3.0)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.to(torch.device("cuda"), torch.float64).dtype == torch.float64
    assert t.to(torch.float16).dtype == torch.float16  # dtypes are not devices
    assert torch.tensor([1], pin_memory=True).device.type == "cpu"
    # megatron's type checks compare with CUDA type names
    assert t.type() == "torch.cuda.FloatTensor"
    assert t.type(torch.float64).dtype == torch.float64


def test_megatron_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(5)
    tracker.add("test-stream", 123)
    outside_before = torch.rand(3)
    torch.manual_seed(5)
    with tracker.fork("test-stream"):
        inside = torch.rand(3)
    outside_after = torch.rand(3)
    # The fork draws from its own stream and leaves the default stream where it was.
    assert torch.equal(outside_before, outside_after)
    assert torch.equal(inside, _draw(123))
    tracker.reset()


def _draw(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.rand(3, generator=g)


def test_freed_memory_is_kept_for_the_next_step():
    # A step's activations freed and allocated again: glibc trims its heap and the next round
    # page-faults every block in again, zero-filled; the backend's allocator settings keep them.
    out = _run(
        """
        import resource, torch
        from megatron_latent.platform import cpu_speedups

        def faults():
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(4):
                xs = [torch.ones(2 << 20) for _ in range(10)]  # ten 8 MiB blocks, then all freed
                del xs
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

        before = faults()
        assert cpu_speedups._keep_freed_memory()
        faults()
        print(before, faults())
        """
    )
    before, after = map(int, out.split())
    assert before > 30_000 and after < 1_000, (before, after)


def test_multi_tensor_kernels_equal_megatrons_fallbacks():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    assert clip_grads.l2_norm_impl is cpu_speedups._multi_tensor_l2norm
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) for n in (3, 70, 1000)]
    ours, _ = cpu_speedups._multi_tensor_l2norm(0, None, [grads], False)
    ref, _ = utils.local_multi_tensor_l2_norm(0, None, [grads], False)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    src = [t.clone() for t in grads]
    dst = [torch.empty_like(t, dtype=torch.float64) for t in grads]
    cpu_speedups._multi_tensor_scale(0, None, [src, dst], 0.5)
    for s, d in zip(src, dst):
        assert torch.equal(d, (s * 0.5).double())
    cpu_speedups._multi_tensor_scale(0, None, [src, src], 0.25)  # in place, as gradient clipping does
    for s, t in zip(src, grads):
        assert torch.equal(s, t * 0.25)


def test_fused_adam_steps_as_torchs_own(single_rank):
    from megatron.core.optimizer import OptimizerConfig

    from megatron_latent.config import ModelConfig
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.training import engine

    cfg = ModelConfig(name="t", arch="gpt-neox", num_layers=1, hidden_size=16, num_attention_heads=2,
                      ffn_hidden_size=32, vocab_size=64, seq_length=8)
    torch.manual_seed(0)
    model = engine.wrap_ddp([build_gpt_model(cfg)])
    opt = engine.build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1))
    inner = [o.optimizer for o in opt.chained_optimizers]
    assert inner and all(g["fused"] for o in inner for g in o.param_groups)
    # One AdamW step after another, fused and per tensor, from the same weights and gradients.
    params = list(model[0].parameters())
    fused = torch.optim.AdamW([p.detach().clone() for p in params], lr=1e-2, weight_decay=0.1, fused=True)
    plain = torch.optim.AdamW([p.detach().clone() for p in params], lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for o in (fused, plain):
            for p, gr in zip(o.param_groups[0]["params"], grads):
                p.grad = gr.clone()
            o.step()
    for a, b in zip(fused.param_groups[0]["params"], plain.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Its step runs without the mode, wrapped once however often fuse_optimizer is called (after
    # every checkpoint load).
    seen = []
    inner[0].register_step_pre_hook(lambda *_: seen.append(len(torch.overrides._get_current_function_mode_stack())))
    platform.fuse_optimizer(opt)
    assert not getattr(inner[0].step.__wrapped__, "without_mode", False)
    for p in params:
        p.main_grad.fill_(0.5)
    before = params[0].detach().clone()
    opt.step()
    assert seen == [0]
    assert not torch.equal(params[0], before)  # it stepped
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_to_local_if_dtensor_equals_megatrons(single_rank):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    assert clip_grads.to_local_if_dtensor is cpu_speedups._to_local_if_dtensor
    t = torch.randn(4, 3, requires_grad=True)
    assert cpu_speedups._to_local_if_dtensor(t) is t
    d = distribute_tensor(t.detach(), init_device_mesh("cpu", (1,)), [Replicate()])
    local, ref = cpu_speedups._to_local_if_dtensor(d), utils.to_local_if_dtensor(d)
    assert type(local) is torch.Tensor and torch.equal(local, ref)


def test_transformer_blocks_run_without_the_mode(single_rank):
    from megatron_latent.config import ModelConfig
    from megatron_latent.models.gpt import build_gpt_model

    cfg = ModelConfig(name="t", arch="gpt-neox", num_layers=1, hidden_size=16, num_attention_heads=2,
                      ffn_hidden_size=32, vocab_size=64, seq_length=8)
    model = build_gpt_model(cfg)
    seen = []
    model.decoder.layers[0].register_forward_pre_hook(
        lambda *_: seen.append(len(torch.overrides._get_current_function_mode_stack())))
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, torch.arange(8).expand(2, 8), None)
    assert seen == [0]
    # ... and megatron's own attention (the fallback of models.attention), which allocates on the
    # device, gets the mode back.
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    inner = []
    with torch.overrides._pop_mode_temporarily():
        cuda_to_cpu.with_mode(lambda: inner.append(len(torch.overrides._get_current_function_mode_stack())))()
    assert inner == [1]
    assert DotProductAttention.forward.__wrapped__ is not None
