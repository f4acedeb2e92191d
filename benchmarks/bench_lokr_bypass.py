"""LoKr layer speed on SDXL's real layer shapes: LyCORIS's default forward (rebuild the full
delta weight w1 ⊗ w2, run it as a second layer) against ``bypass_mode`` (apply the Kronecker
factors to the input), forward + backward, next to the plain layer, in one run.

    python benchmarks/bench_lokr_bypass.py [--repeats 3] [--side 32]

Each case is one SDXL layer (full-matrix LoKr, the epsilon recipe's factor for its block
class) on the activations it sees at a 512² image (latent 64², the UNet's three levels 64²,
32², 16² tokens; ``--side`` = the latent side / 2). Both modes get the same weights and input,
w2 non-zero (as after training); outputs and gradients (input, w1, w2) must agree within
``TOL``, else the script says so and exits 1. Times are the median of ``--repeats`` runs
after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lycoris.modules.lokr import LokrModule  # noqa: E402

from trainers.lokr.config import load_config  # noqa: E402
from trainers.lokr.network.lokr import FULL_MATRIX_DIM  # noqa: E402

# Relative agreement of the two modes (max |a - b| / max |a|): fp32 sums in another order.
TOL = 1e-4


def cases(side: int) -> list[tuple[str, str, torch.nn.Module, tuple]]:
    """(name, block class, layer, input shape) of SDXL UNet/text-encoder layers, batch 1."""
    s1, s2, s3 = 2 * side, side, side // 2  # token grid of UNet levels 0, 1, 2
    lin = torch.nn.Linear
    conv = lambda c: torch.nn.Conv2d(c, c, 3, padding=1)  # noqa: E731
    return [
        ("attn1.to_q 640→640", "Attention", lin(640, 640, bias=False), (1, s2 * s2, 640)),
        ("attn1.to_q 1280→1280", "Attention", lin(1280, 1280, bias=False), (1, s3 * s3, 1280)),
        ("attn2.to_k 2048→1280 (text)", "Attention", lin(2048, 1280, bias=False), (1, 77, 2048)),
        ("ff GEGLU proj 1280→10240", "FeedForward", lin(1280, 10240), (1, s3 * s3, 1280)),
        ("ff out 5120→1280", "FeedForward", lin(5120, 1280), (1, s3 * s3, 5120)),
        ("ff GEGLU proj 640→5120", "FeedForward", lin(640, 5120), (1, s2 * s2, 640)),
        ("resnet conv 3x3 320", "ResnetBlock2D", conv(320), (1, 320, s1, s1)),
        ("resnet conv 3x3 640", "ResnetBlock2D", conv(640), (1, 640, s2, s2)),
        ("resnet conv 3x3 1280", "ResnetBlock2D", conv(1280), (1, 1280, s3, s3)),
        ("te2 mlp.fc1 1280→5120", "CLIPMLP", lin(1280, 5120), (3, 77, 1280)),
    ]


def lokr(layer, factor: int, bypass: bool, name: str) -> LokrModule:
    module = LokrModule(name, layer, multiplier=1.0, lora_dim=FULL_MATRIX_DIM, alpha=FULL_MATRIX_DIM,
                        factor=factor, full_matrix=True, bypass_mode=bypass)
    module.apply_to()
    return module


def fwd_bwd(module, x: torch.Tensor, params) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    out = module(x)
    out.square().mean().backward()
    return time.perf_counter() - start, out.detach(), [x.grad] + [p.grad for p in params]


def timed(module, x, params, repeats: int):
    fwd_bwd(module, x, params)  # warm-up
    runs = [fwd_bwd(module, x, params) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), runs[-1][1], runs[-1][2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=32, help="UNet level-1 token grid side (32 = 512² images)")
    args = parser.parse_args(argv)
    factors = load_config("epsilon")["lokr"]["factors"]
    print(f"LyCORIS LoKr, full matrix, epsilon factors; forward + backward, CPU, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}; tolerance {TOL:g} relative")
    print(f"{'layer':<30}{'factor':>7}{'plain s':>10}{'default s':>11}{'bypass s':>10}"
          f"{'default/plain':>15}{'bypass/plain':>14}{'max rel diff':>14}")
    totals = {"plain": 0.0, "default": 0.0, "bypass": 0.0}
    worst = 0.0
    for name, block, layer, shape in cases(args.side):
        g = torch.Generator().manual_seed(0)
        layer.requires_grad_(False)
        x = torch.randn(shape, generator=g)
        plain_s, _, _ = timed(layer, x, [], args.repeats)
        results = {}
        state = None
        for mode in ("default", "bypass"):
            base = type(layer)(*_ctor(layer))
            base.load_state_dict(layer.state_dict())
            base.requires_grad_(False)
            module = lokr(base, factors[block], mode == "bypass", name)
            if state is None:
                with torch.no_grad():  # trained-looking weights: w2 is zero at creation
                    module.lokr_w1.copy_(torch.randn(module.lokr_w1.shape, generator=g))
                    module.lokr_w2.copy_(0.01 * torch.randn(module.lokr_w2.shape, generator=g))
                state = {k: v.clone() for k, v in module.state_dict().items()}
            module.load_state_dict(state)
            results[mode] = timed(module, x, [module.lokr_w1, module.lokr_w2], args.repeats)
        diff = max([rel(results["default"][1], results["bypass"][1])]
                   + [rel(a, b) for a, b in zip(results["default"][2], results["bypass"][2])])
        worst = max(worst, diff)
        d, b = results["default"][0], results["bypass"][0]
        totals["plain"] += plain_s
        totals["default"] += d
        totals["bypass"] += b
        print(f"{name:<30}{factors[block]:>7}{plain_s:>10.4f}{d:>11.4f}{b:>10.4f}{d / plain_s:>14.2f}x"
              f"{b / plain_s:>13.2f}x{diff:>14.1e}")
    print(f"{'all cases':<30}{'':>7}{totals['plain']:>10.4f}{totals['default']:>11.4f}{totals['bypass']:>10.4f}"
          f"{totals['default'] / totals['plain']:>14.2f}x{totals['bypass'] / totals['plain']:>13.2f}x{worst:>14.1e}")
    faster = "bypass" if totals["bypass"] < totals["default"] else "default"
    print(f"faster: {faster} ({max(totals['default'], totals['bypass']) / min(totals['default'], totals['bypass']):.2f}x "
          f"over all cases); outputs and gradients {'agree' if worst <= TOL else 'DISAGREE'} (worst {worst:.1e})")
    return 0 if worst <= TOL else 1


def _ctor(layer):
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features, layer.bias is not None
    return layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding


if __name__ == "__main__":
    sys.exit(main())
