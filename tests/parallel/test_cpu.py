"""The CPU shim for megatron-core: device rewriting, per-thread mode, RNG tracker on CPU generators.

Shim installation patches process globals, so every test that installs it runs in a forked child
(``run_ranks``) and the pytest parent stays unpatched.
"""
from __future__ import annotations

import threading

import megatron.core.parallel_state  # noqa: F401  (imported once here so forked ranks start fast)
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch

from megatron_lpreg.parallel import cpu
from megatron_lpreg.parallel.spawn import run_ranks

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is inert on CUDA machines")


@cpu_only
def test_mode_rewrites_cuda_devices_and_keeps_values() -> None:
    base = torch.arange(6, dtype=torch.float32)
    with cpu.CpuDeviceMode():
        made = [
            torch.zeros(2, device="cuda"), torch.empty(2, device=torch.device("cuda", 0)),
            torch.ones(2, device=0), base.to("cuda"), base.to(torch.device("cuda")),
            base.to("cuda", torch.float64), base.new_zeros(3, device="cuda"), base.cuda(),
            torch.empty(2, pin_memory=True),
        ]
        names = (base.type(), base.bfloat16().type(), base.half().type(), base.long().type())
    assert all(t.device.type == "cpu" for t in made)
    assert torch.equal(made[3], base) and made[5].dtype == torch.float64 and torch.equal(made[5], base.double())
    assert names == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.HalfTensor",
                     "torch.cuda.LongTensor")
    # Outside the mode nothing is rewritten: CUDA requests fail as usual on this machine.
    assert base.type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(2, device="cuda")


@cpu_only
def test_mode_is_active_in_autograd_backward() -> None:
    class NeedsCudaInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return x * 2

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            return grad * torch.full_like(grad, 2.0, device="cuda")

    x = torch.tensor([1.0, -3.0], requires_grad=True)
    with cpu.CpuDeviceMode():
        NeedsCudaInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([2.0, 2.0]))


def _threads_need_their_own_mode(rank: int, world: int) -> tuple[bool, bool, bool]:
    assert cpu.enter_cpu_mode() and cpu.enter_cpu_mode()  # idempotent in this thread
    main_ok = torch.zeros(1, device="cuda").device.type == "cpu"
    results = {}

    def worker(enter: bool) -> None:
        if enter:
            cpu.enter_cpu_mode()
        try:
            results[enter] = torch.zeros(1, device="cuda").device.type == "cpu"
        except (RuntimeError, AssertionError):
            results[enter] = False

    for enter in (False, True):
        thread = threading.Thread(target=worker, args=(enter,))
        thread.start()
        thread.join()
    return main_ok, results[False], results[True]


@cpu_only
def test_mode_is_per_thread() -> None:
    assert run_ranks(_threads_need_their_own_mode, 1) == [(True, False, True)]


def _shim_and_tracker(rank: int, world: int, seed: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    assert not cpu.cpu_shim_installed()
    assert cpu.install_cpu_shim() and cpu.install_cpu_shim() and cpu.cpu_shim_installed()
    cpu.enter_cpu_mode()
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.rand(3)
    with tracker.fork():
        forked = torch.rand(4)
    with tracker.fork():
        forked_again = torch.rand(2)
    after = torch.rand(3)
    ps.destroy_model_parallel()
    torch.cuda.synchronize()
    return {
        "device": str(torch.cuda.current_device()), "tracker": type(tracker).__name__,
        "before": before, "after": after, "forked": forked, "forked_again": forked_again,
    }


@cpu_only
def test_shim_rng_tracker_uses_cpu_generators() -> None:
    seed = 7
    results = run_ranks(_shim_and_tracker, 2, seed)
    default = torch.Generator().manual_seed(seed)
    expected_default = torch.rand(6, generator=default)
    for tp_rank, got in enumerate(results):
        assert got["device"] == "cpu" and got["tracker"] == "CpuRNGStatesTracker"
        # The default stream is untouched by the forked regions ...
        assert torch.equal(torch.cat([got["before"], got["after"]]), expected_default)
        # ... and the model-parallel stream continues across regions from seed + 2718 + tp_rank (megatron's rule).
        tp_stream = torch.rand(6, generator=torch.Generator().manual_seed(seed + 2718 + tp_rank))
        assert torch.equal(torch.cat([got["forked"], got["forked_again"]]), tp_stream)
    assert not torch.equal(results[0]["forked"], results[1]["forked"])


@pytest.mark.gpu
def test_shim_refuses_on_cuda() -> None:
    assert cpu.install_cpu_shim() is False and cpu.enter_cpu_mode() is False


@cpu_only
@pytest.mark.parametrize("how", ["tensor", "function"])
def test_backward_through_mode_matches_plain_backward(how: str) -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    x = torch.tensor([0.5, -2.0])
    (w @ x).pow(2).sum().backward()
    expected, w.grad = w.grad.clone(), None
    with cpu.CpuDeviceMode():
        y = (w @ x).pow(2)
        if how == "tensor":
            y.backward(torch.ones(2), retain_graph=True)
        else:
            torch.autograd.backward([y], grad_tensors=[torch.ones(2)], inputs=[w])
    assert torch.equal(w.grad, expected)
