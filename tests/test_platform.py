"""The CPU backend: off at import, on at parallel start-up without CUDA, inert with CUDA, and it
maps exactly what megatron needs."""

import subprocess
import sys
import textwrap

import torch

from megatron_latent import platform

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
