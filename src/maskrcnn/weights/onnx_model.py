"""An ONNX file from ``maskrcnn export``, run by ONNX Runtime in place of the PyTorch network.

``OnnxModel`` has the surface that ``predictor.predict_batches`` (the one inference loop) uses
from a ``MaskRCNN``: ``config``, ``device``, ``training``, ``eval``/``train`` and a call that
takes (3, H, W) images and returns ``ModelOutput`` with ``Detections`` in the original frame.
So ``model.predict``, ``maskrcnn predict`` and ``maskrcnn evaluate`` run it unchanged, and
everything around the graph is the PyTorch model's own code: image reading and normalising
(``data.images``), resizing (the model's ``Preprocessor``, built from the config in the file's
metadata), boxes back to the original frame (``to_original_frame``) and mask pasting
(``Result.from_detections``).

Shape shorthand: N detections, M mask size, h x w resized image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, from_dict
from ..model.build import build_preprocessor
from ..model.transform import to_original_frame
from ..structures import Detections, ModelOutput, Targets

FORMAT = "maskrcnn-onnx/1"  # the ``maskrcnn.format`` metadata of the files ``maskrcnn export`` writes


def _runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("running an ONNX model needs onnxruntime: pip install 'maskrcnn[onnx]'") from None
    return onnxruntime


class OnnxModel:
    """An exported model in an ONNX Runtime session (CPU).

    Args:
        path: a ``.onnx`` file written by ``maskrcnn export``.
        config: the model config to use instead of the file's (``maskrcnn.load`` passes the
            file's with threshold overrides applied).
        threads: intra-op threads of the session (None: ONNX Runtime's default, one per core).

    Raises:
        ValueError: the file is not an ONNX model written by ``maskrcnn export``.
    """

    training = False  # inference only: the graph computes no losses

    def __init__(self, path: str | Path, config: ModelConfig | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        metadata = self.open_graph(threads)
        self.config = config or read_config(self.path, metadata)
        self.preprocess = build_preprocessor(self.config.transform).eval()
        self.device = torch.device("cpu")

    def open_graph(self, threads: int | None) -> dict[str, str]:
        """Open ``self.path`` in the runtime and set ``self.outputs``; returns the file's
        ``maskrcnn.*`` metadata (another runtime replaces this and ``run_graph`` only)."""
        ort = _runtime()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  onnxruntime raises its own types for bad files
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"cannot read ONNX model {self.path}: {first_line}") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        return self.session.get_modelmeta().custom_metadata_map

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise ValueError(
                f"{self.path} is an exported ONNX model: it cannot be trained; train the PyTorch checkpoint"
            )
        return self

    def detect(self, image: Tensor, score_thresh: float) -> Detections:
        """The graph on one preprocessed image.

        Args:
            image: (3, h, w) float32, normalised and resized by ``self.preprocess``, not padded.
            score_thresh: detections need a class probability above this.

        Returns:
            ``Detections`` in the resized frame: boxes (N, 4), scores (N,), labels (N,) int64,
            masks (N, M, M) probabilities (None for a model without a mask head).
        """
        feed = {"image": image[None].float().contiguous().numpy(), "score_thresh": np.asarray(score_thresh, np.float32)}
        out = self.run_graph(feed)
        masks = out.get("masks")
        return Detections(
            boxes=torch.from_numpy(out["boxes"]),
            scores=torch.from_numpy(out["scores"]),
            labels=torch.from_numpy(out["labels"]).to(torch.int64),
            masks=None if masks is None else torch.from_numpy(masks),
        )

    def run_graph(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs by name for the inputs ``feed`` (another runtime replaces only this)."""
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))

    def __call__(
        self, images: list[Tensor], targets: list[Targets] | None = None, score_thresh: float | None = None
    ) -> ModelOutput:
        """``MaskRCNN.forward`` in eval mode: (3, H, W) images (float 0..1 or uint8) in,
        ``ModelOutput.detections`` in each image's original frame out. Images are preprocessed
        one by one (no padding to a common size) and run one by one through the graph."""
        if targets is not None:
            raise ValueError(
                f"{self.path} is an exported ONNX model: it computes no losses; validate with the PyTorch checkpoint"
            )
        thresh = self.config.roi_heads.score_thresh if score_thresh is None else float(score_thresh)
        detections = []
        with torch.inference_mode():
            for image in images:
                batch, _ = self.preprocess([image])
                h, w = batch.image_sizes[0]
                found = self.detect(batch.tensors[0, :, :h, :w], thresh)
                detections.extend(to_original_frame([found], batch))
        return ModelOutput(detections=detections)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, num_classes={self.config.num_classes})"


def read_config(path: Path, meta: dict[str, str]) -> ModelConfig:
    """The ``ModelConfig`` an exported file carries in its metadata."""
    if meta.get("maskrcnn.format") != FORMAT:
        found = meta.get("maskrcnn.format")
        raise ValueError(
            f"{path}: not a model written by maskrcnn export "
            f"(metadata maskrcnn.format is {found!r}, expected {FORMAT!r})"
        )
    try:
        return from_dict(ModelConfig, json.loads(meta["maskrcnn.config"]))
    except (KeyError, json.JSONDecodeError, ConfigError) as e:
        raise ValueError(f"{path}: bad maskrcnn.config metadata: {e}") from None
