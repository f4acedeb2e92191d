"""CCIP (deepghs' character-identity model) through dghs-imgutils, from local files only.

imgutils' ``imgutils.metrics`` functions fetch the model from the Hub (``deepghs/ccip_onnx``,
``<model>/model_feat.onnx``, ``model_metrics.onnx``, ``metrics.json``) on first use. Here the
model is a folder holding those three files (``--ccip-model``), or imgutils' own Hub cache when
it already has them (never downloaded). The features are computed as imgutils'
``ccip_batch_extract_features`` does (its ``_preprocess_image``: RGB, bilinear resize to
384×384, CLIP mean/std; input ``input`` float32 (N,3,384,384) -> output ``output`` (N,D)),
the differences as ``ccip_batch_differences`` (input ``input`` (N,D) -> output ``output``
(N,N)), and "same character" as ``ccip_same``: difference <= ``metrics.json``'s
``threshold`` (imgutils' default threshold).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from hakubooru.errors import HakubooruError

DEFAULT_MODEL = "ccip-caformer-24-randaug-pruned"  # imgutils' default
REPO = "deepghs/ccip_onnx"
FILES = ("model_feat.onnx", "model_metrics.onnx", "metrics.json")
SIZE = 384
GET = (f"huggingface-cli download {REPO} --include '{DEFAULT_MODEL}/*' --local-dir ccip "
       f"and pass --ccip-model ccip/{DEFAULT_MODEL}")


def require_imgutils():
    """imgutils' CCIP module, or one line naming the extra to install."""
    try:
        import onnxruntime  # noqa: F401
        from imgutils.metrics import ccip
    except ImportError as e:
        raise HakubooruError(f"eval needs dghs-imgutils and onnxruntime ({e.name} is missing): "
                             "pip install 'hakubooru[eval]' && pip install --no-deps "
                             "dghs-imgutils==0.19.0 (docs/eval.md says why)") from None
    return ccip


def resolve(path: str | None) -> Path:
    """The CCIP model folder: ``path``, else imgutils' Hub cache if it holds the default model."""
    if path is not None:
        folder = Path(path)
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            raise HakubooruError(f"CCIP model {folder} lacks {', '.join(missing)}: {GET}")
        return folder
    from huggingface_hub import hf_hub_download
    try:
        paths = [hf_hub_download(REPO, f"{DEFAULT_MODEL}/{f}", local_files_only=True) for f in FILES]
    except Exception:  # huggingface_hub's "not in the cache" errors vary between versions
        raise HakubooruError(f"no CCIP model: {GET}") from None
    return Path(paths[0]).parent


class CCIP:
    """The two ONNX sessions and the threshold of one CCIP model folder."""

    def __init__(self, folder: Path):
        ccip = require_imgutils()
        from imgutils.utils import open_onnx_model

        self._preprocess = ccip._preprocess_image
        self.folder = folder
        try:
            self.threshold = float(json.loads((folder / "metrics.json").read_text())["threshold"])
            self._feat = open_onnx_model(str(folder / "model_feat.onnx"))
            self._metric = open_onnx_model(str(folder / "model_metrics.onnx"))
        except Exception as e:  # onnxruntime raises its own exception types
            raise HakubooruError(f"cannot open the CCIP model in {folder}: {str(e).splitlines()[0]}") from None

    def features(self, images) -> np.ndarray:
        """(N, D) float32 features of PIL images or encoded image bytes."""
        from PIL import Image

        data = []
        for im in images:
            if isinstance(im, (bytes, bytearray)):
                im = Image.open(io.BytesIO(im))
            data.append(self._preprocess(im.convert("RGB"), size=SIZE))
        output, = self._feat.run(["output"], {"input": np.stack(data).astype(np.float32)})
        return output

    def differences(self, generated: np.ndarray, references: np.ndarray) -> np.ndarray:
        """(G, R) differences of each generated feature to each reference feature."""
        both = np.concatenate([generated, references]).astype(np.float32)
        output, = self._metric.run(["output"], {"input": both})
        return output[:len(generated), len(generated):]
