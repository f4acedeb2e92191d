"""A STAND-IN for the CCIP model, for the demo and the tests (no download): random, fixed
weights with the real model's signature, exported to ONNX. Its numbers are plumbing, not
character identity.

    python -m trainers.lokr.observe.ccip_standin demo/ccip-standin

Writes ``model_feat.onnx`` (``input`` float32 (N,3,384,384) -> ``output`` (N,256): a strided
convolution, tanh, 4×4 average pool), ``model_metrics.onnx`` (``input`` (N,256) -> ``output``
(N,N): (1 - cosine similarity) / 2) and ``metrics.json`` (``threshold``), the layout of one
model folder of deepghs/ccip_onnx. Needs the ``onnx`` package (torch's exporter).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from hakubooru.errors import HakubooruError, run_command

THRESHOLD = 0.35  # its differences of unrelated pictures spread over about 0.2-0.7
FEATURES = 256


class _Features(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2023)
        self.conv = torch.nn.Conv2d(3, 16, 32, stride=32)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.copy_(torch.randn(16, generator=g) * 0.1)

    def forward(self, x):
        y = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4)
        return y.flatten(1)


class _Differences(torch.nn.Module):
    def forward(self, f):
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return (1 - f @ f.T) / 2


def write_standin(folder) -> Path:
    """Export the stand-in CCIP model into ``folder`` (created); returns it."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise HakubooruError("the stand-in CCIP model is exported with the onnx package: "
                             "pip install 'hakubooru[eval]'") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dyn = {"input": {0: "n"}, "output": {0: "n"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes; it needs no onnxscript
        torch.onnx.export(_Features().eval(), (torch.zeros(2, 3, 384, 384),), str(folder / "model_feat.onnx"),
                          input_names=["input"], output_names=["output"], dynamic_axes=dyn, dynamo=False)
        torch.onnx.export(_Differences(), (torch.ones(3, FEATURES),), str(folder / "model_metrics.onnx"),
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "n"}, "output": {0: "n", 1: "n"}}, dynamo=False)
    (folder / "metrics.json").write_text(json.dumps({"threshold": THRESHOLD, "stand_in": True}) + "\n")
    return folder


def main(argv=None) -> int:
    """``python -m trainers.lokr.observe.ccip_standin FOLDER``."""
    def run(args):
        if len(args) != 1:
            raise HakubooruError("usage: python -m trainers.lokr.observe.ccip_standin FOLDER")
        folder = write_standin(args[0])
        print(f"wrote a STAND-IN CCIP model (random weights; scores are plumbing, not identity) -> {folder}/")
        return 0
    return run_command(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
