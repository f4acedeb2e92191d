"""Per-phase memory: the meta-device byte counter against hand-counted tensors, and the GPU
step benchmark's CPU smoke path (phases on the tiny model)."""
from __future__ import annotations

import pytest
import torch

from trainers.lokr.observe.memory import LiveBytes, PhaseMeter

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


@pytest.mark.slow
def test_gpu_step_benchmark_cpu_smoke(capsys):
    from benchmarks.bench_gpu_step import main

    assert main(["--device", "cpu", "--tiny", "--steps", "1", "--no-baseline"]) == 0
    assert "LoKr bypass on, gradient checkpointing on" in capsys.readouterr().out


def test_a_fresh_counter_has_seen_nothing():
    """LiveBytes: ``peak`` is the largest total since the start; before any operation nothing
    was created, so it is 0 bytes (and nothing is live)."""
    counter = LiveBytes()
    assert counter.peak == 0 and counter.live == 0


def test_only_the_meta_device_is_counted_by_the_byte_counter():
    """PhaseMeter: on the meta device a LiveBytes counter measures the phases; on the CPU (no
    allocator statistics) there is no counter and a phase records no peak."""
    assert isinstance(PhaseMeter("meta").counter, LiveBytes)
    cpu = PhaseMeter("cpu", held_bytes=MIB)
    assert cpu.counter is None
    with cpu.phase("VAE"):
        torch.ones(1024)
    assert cpu.peaks == {} and cpu.table() == ""


def test_table_is_in_gib_in_phase_order():
    """PhaseMeter.table: one line per phase in the order of PHASES (not of measurement), the
    name left-aligned in 16 columns, then the peak in GiB (2^30 bytes), 8 wide, 2 decimals.
    Phases that allocate nothing peak at what was held: 3 GiB, and 3 GiB + 1 MiB = 3.0009765625
    GiB -> 3.00."""
    meter = PhaseMeter("meta", held_bytes=3 * 2 ** 30)
    with meter.counter:
        with meter.phase("backward"):
            pass
        with meter.phase("VAE"):
            x = torch.empty(256, 1024, device="meta")  # 1 MiB, alive at the end of the phase
    del x
    assert meter.peaks == {"backward": 3 * 2 ** 30, "VAE": 3 * 2 ** 30 + MIB}
    assert meter.table() == ("  VAE" + " " * 13 + "    3.00 GiB\n"
                             "  backward" + " " * 8 + "    3.00 GiB")


def test_meta_flash_attention_output_has_the_value_width():
    """Attention of 8 queries over 6 keys / values of width 5 gives 8 outputs of width 5
    (b, h, 8, 5), also on meta under flash_attention_memory."""
    import torch.nn.functional as F

    from trainers.lokr.observe.memory import flash_attention_memory

    q, k = torch.empty(1, 2, 8, 4, device="meta"), torch.empty(1, 2, 6, 4, device="meta")
    v = torch.empty(1, 2, 6, 5, device="meta")
    with flash_attention_memory():
        assert F.scaled_dot_product_attention(q, k, v).shape == (1, 2, 8, 5)
