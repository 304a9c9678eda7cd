"""``maskrcnn export``: a model to one ONNX file that ``maskrcnn.load`` and ONNX Runtime run,
or (``--out model.xml``) that graph in OpenVINO's IR (``weights.openvino_model``).

The graph is ``MaskRCNN.detect`` on one image, traced (``torch.onnx.export(dynamo=False)``):

    inputs:  image         (1, 3, h, w) float32: the image normalised and resized as the
                           model's ``Preprocessor`` does it (not padded; the graph pads to the
                           size divisor itself); h and w are dynamic.
             score_thresh  () float32: detections need a class probability above this.
    outputs: boxes  (N, 4) float32 x1 y1 x2 y2 in the resized frame (h x w), by decreasing score
             scores (N,)   float32
             labels (N,)   int64, 1..num_classes
             masks  (N, M, M) float32 probabilities over each box (models with a mask head)

N runs from 0 to ``roi_heads.detections_per_img``. Outside the graph, in ``maskrcnn.weights.onnx_model``
and shared with the PyTorch path: decoding and resizing the image (``Preprocessor``), boxes back
to the original frame (``to_original_frame``) and pasting the masks (``Result.from_detections``).
NMS and RoIAlign become the ONNX operators ``NonMaxSuppression`` and ``RoiAlign`` (see
``ops.nms`` and ``ops.roi_align``); everything else is traced from the PyTorch code as it is.

The file's metadata (``metadata_props``) carries what a runtime needs besides the graph:
``maskrcnn.format``, ``maskrcnn.config`` (the resolved ``ModelConfig`` as JSON: preprocessing,
thresholds, class names, category ids), ``maskrcnn.class_names`` (JSON list, index = label,
0 = background), ``maskrcnn.score_thresh`` and ``maskrcnn.mask_thresh``.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import to_dict
from ..files import atomic_write
from ..model.mask_rcnn import MaskRCNN
from ..model.transform import padded_size
from ..structures import ImageBatch
from .checkpoint import file_kind, load
from .onnx_model import FORMAT
from .openvino_model import SUFFIX as IR_SUFFIX
from .openvino_model import ir_metadata, is_ir, weights_file, weights_size, write_ir

DEFAULT_OPSET = 17  # RoiAlign needs 16 to keep the half-pixel shift of aligned models
MIN_OPSET = 11  # NonMaxSuppression's and RoiAlign's forms used here
try:  # the newest opset of the TorchScript exporter (dynamo=False) of this torch: 20 in torch 2.13
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET
except ImportError:
    MAX_OPSET = DEFAULT_OPSET
INPUTS = ("image", "score_thresh")

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A model or an option that cannot be exported as asked."""


class DetectionGraph(nn.Module):
    """What the ONNX file computes (see the module docstring): pad, then ``model.detect``."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, score_thresh: Tensor) -> tuple[Tensor, ...]:
        h, w = image.shape[-2:]  # 0-dim tensors while traced: the padding follows the input
        d = self.model.preprocess.size_divisible
        x = F.pad(image, (0, padded_size(w, d) - w, 0, padded_size(h, d) - h))  # (1, 3, Hp, Wp)
        detections, _ = self.model.detect(ImageBatch(x, [(h, w)], [(h, w)]), score_thresh=score_thresh)
        det = detections[0]
        return (det.boxes, det.scores, det.labels) + ((det.masks,) if det.masks is not None else ())


def output_names(model: MaskRCNN) -> tuple[str, ...]:
    return ("boxes", "scores", "labels") + (("masks",) if model.roi_heads.has_mask else ())


def check_exportable(model: MaskRCNN, opset: int) -> None:
    """ExportError naming what stops ``model`` from exporting at ``opset`` faithfully."""
    check_opset(opset)
    if model.roi_heads.pooler != "align":
        raise ExportError(f"roi_heads.pooler={model.roi_heads.pooler!r}: only RoIAlign models export to ONNX")
    if model.roi_heads.aligned and opset < 16:
        raise ExportError(
            f"--opset {opset}: this model uses aligned RoIAlign (roi_heads.aligned=true), which ONNX "
            "RoiAlign has only from opset 16; an older opset would export the non-aligned one"
        )


def check_opset(opset: int) -> None:
    """ExportError unless ``opset`` is one this torch exports and this graph needs: checked
    before anything is loaded or traced (an unknown opset fails deep in the exporter)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset}: this export supports opsets {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})"
        )


def check_paths(weights: str | Path, out: str | Path, overwrite: bool) -> None:
    """ExportError unless ``out`` may be written: never the input file, and an existing file only
    with ``overwrite`` or when it is an earlier ``maskrcnn export`` output."""
    out = Path(out)
    ir = out.suffix.lower() == IR_SUFFIX
    # An IR is two files: the .bin beside the .xml is replaced too.
    for path in (out, weights_file(out)) if ir else (out,):
        if not path.exists():
            continue
        if path.is_dir():
            raise ExportError(f"--out {path} is a folder; name the .onnx or .xml file to write")
        if Path(weights).exists() and path.samefile(weights):
            raise ExportError(f"--out {path} is the checkpoint being exported; write the export under another name")
        ours = is_our_export(out) and (path == out or weights_size(out) == path.stat().st_size)
        if not overwrite and not ours:
            raise ExportError(
                f"--out {path} exists and is not {'part of an OpenVINO model' if ir else 'an ONNX file'} "
                "written by maskrcnn export; remove it or pass --overwrite to replace it"
            )


def is_our_export(path: Path) -> bool:
    """Whether ``path`` is an ONNX file, or an OpenVINO IR's .xml, with our ``maskrcnn.format``
    metadata (weights not read)."""
    if not path.is_file():
        return False
    if is_ir(path):
        return ir_metadata(path).get("maskrcnn.format") == FORMAT
    if file_kind(path) != "onnx":
        return False
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  not parseable: not ours
        return False
    return any(p.key == "maskrcnn.format" and p.value == FORMAT for p in proto.metadata_props)


def metadata(model: MaskRCNN) -> dict[str, str]:
    cfg = model.config
    return {
        "maskrcnn.format": FORMAT,
        "maskrcnn.config": json.dumps(to_dict(cfg)),
        "maskrcnn.class_names": json.dumps(cfg.label_names()),
        "maskrcnn.score_thresh": repr(float(cfg.roi_heads.score_thresh)),
        "maskrcnn.mask_thresh": repr(float(cfg.roi_heads.mask_thresh)),
    }


def example_image(height: int = 480, width: int = 640) -> Tensor:
    """A fixed pseudo-random image to trace with. Its content does not shape the graph: under
    export, NMS, RoIAlign and the FPN level assignment take no branch on data (``ops``)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn((1, 3, height, width), generator=g)


def export_model(model: MaskRCNN, out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (in eval mode, CPU, float32) as an ONNX file with its metadata to ``out``.

    Raises:
        ExportError: the model or ``opset`` cannot be exported faithfully.
        ImportError: the ``onnx`` package is missing (``pip install maskrcnn[onnx]``).
    """
    try:
        import onnx
    except ImportError:
        raise ImportError("export needs the onnx package: pip install 'maskrcnn[onnx]'") from None
    check_exportable(model, opset)
    # A copy: the caller's model keeps its device, dtype and mode (and its anchor cache stays
    # free of traced tensors).
    model = copy.deepcopy(model).to("cpu").float().eval()
    graph = DetectionGraph(model)
    names = output_names(model)
    dynamic = {"image": {2: "height", 3: "width"}, **{n: {0: "detections"} for n in names}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns for every Python number it sees; the graph is checked by the tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example_image(), torch.tensor(0.0)),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUTS),
            output_names=list(names),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata(model).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = __doc__ or ""
    data = proto.SerializeToString()
    path = atomic_write(out, lambda f: f.write(data))
    log.info("exported %s (opset %d, %.0f MB)", path, opset, len(data) / 1e6)
    return path


def export(weights: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, overwrite: bool = False) -> Path:
    """``maskrcnn export``: our checkpoint, a torchvision .pth or a Detectron2 model-zoo .pkl to ONNX,
    or to OpenVINO's IR when ``out`` ends in ``.xml`` (``model.xml`` and ``model.bin``).

    ``out`` is written atomically (temp file, then rename). It is never ``weights`` itself, and
    an existing file is replaced only if it is an earlier export or ``overwrite`` is set.

    Raises:
        ExportError: a bad opset, ``weights`` already an ONNX file, or an ``out`` refused above.
        CheckpointError: ``weights`` cannot be read.
    """
    check_opset(opset)
    if Path(weights).is_file() and file_kind(weights) in ("onnx", "openvino"):
        raise ExportError(f"{weights} is already an exported model; export from the PyTorch checkpoint it came from")
    check_paths(weights, out, overwrite)
    # Frozen BatchNorms folded into their convolutions: the graph holds one conv where it held a
    # conv, a multiply and an add (what the CI run of ci3 tested, and what INT8 quantises).
    model = load(weights, device="cpu", fold_bn=True)
    if Path(out).suffix.lower() != IR_SUFFIX:
        return export_model(model, out, opset)
    with tempfile.TemporaryDirectory() as tmp:  # the ONNX graph, then OpenVINO's conversion of it
        path = write_ir(export_model(model, Path(tmp) / "model.onnx", opset), Path(out))
    log.info("converted to OpenVINO IR: %s and %s", path, weights_file(path))
    return path
