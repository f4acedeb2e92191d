"""Per-phase memory: the meta-device byte counter against hand-counted tensors, and the GPU
step benchmark's CPU smoke path (phases on the tiny model)."""
from __future__ import annotations

import torch

from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)
from trainers.lokr.memory import LiveBytes, PhaseMeter

MIB = 2 ** 20


def test_live_bytes_counts_created_storages_while_alive():
    x = torch.empty(1024, 256, device="meta")  # made outside: not counted
    counter = LiveBytes()
    with counter:
        y = x * 2                     # 1024 * 256 * 4 bytes = 1 MiB
        v = y.view(-1)                # a view: no new bytes
        y.add_(1)                     # in place: no new bytes
        z = torch.empty(512, 256, dtype=torch.float16, device="meta") + 0  # 0.25 MiB
        assert counter.live == MIB + MIB // 4
        del y, v
        assert counter.live == MIB // 4
        del z
        assert counter.live == 0
    # at the "+ 0": y (1 MiB), the empty operand and the sum (0.25 MiB each) were alive together
    assert counter.peak == MIB + 2 * (MIB // 4)


def test_live_bytes_sees_saved_activations_and_gradients():
    w = torch.empty(256, 256, device="meta", requires_grad=True)   # 256 KiB, not counted
    x = torch.empty(1024, 256, device="meta")
    counter = LiveBytes()
    meter = PhaseMeter("meta", held_bytes=10 * MIB)
    with counter:
        meter.counter = counter
        with meter.phase("UNet forward"):
            h = (x @ w).relu()        # x @ w: 1 MiB, relu output: 1 MiB (kept for backward)
            loss = h.sum()
        with meter.phase("backward"):
            loss.backward()
    assert meter.peaks["UNet forward"] >= 10 * MIB + 2 * MIB - MIB  # relu's output stays saved
    assert w.grad is not None and counter.live >= 256 * 256 * 4  # the gradient is alive
    assert "UNet forward" in meter.table()


def test_gpu_step_benchmark_cpu_smoke(capsys):
    from benchmarks.bench_gpu_step import main

    assert main(["--device", "cpu", "--tiny", "--steps", "1", "--no-baseline"]) == 0
    assert "LoKr bypass on, gradient checkpointing on" in capsys.readouterr().out
