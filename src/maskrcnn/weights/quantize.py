"""INT8 ONNX models: static quantisation of an exported model with a calibration folder.

``maskrcnn export --weights W --out model-int8.onnx --int8 --calib DIR`` exports the float32
graph (``maskrcnn.weights.export``) and hands it to ONNX Runtime's static quantiser
(``onnxruntime.quantization.quantize_static``): the convolutions' weights become int8 (one scale
per output channel) and their activations uint8, with ranges measured on the images of ``DIR``
(each run through the model's own preprocessing, as ``predict`` feeds the graph). Only the
convolutions are quantised (``Conv``: backbone, FPN, RPN head, mask head); the box head's
fully connected layers, RoIAlign, NMS and the box arithmetic stay float32, so the detection
logic is the float model's. The file keeps the export's metadata (the model config), so
``maskrcnn.load`` and ``maskrcnn predict`` run it as any export, and records the calibration
in ``maskrcnn.int8``.

What it costs and saves is measured in docs/benchmarks.md (``benchmarks/bench_onnx.py --int8``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import IMAGE_SUFFIXES, load_rgb, to_tensor
from ..files import atomic_write
from .export import DEFAULT_OPSET, ExportError, check_opset, check_paths
from .onnx_model import OnnxModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Options:
    """How ``quantize`` calibrates; the defaults are what docs/benchmarks.md measured."""

    calib: Path  # folder of calibration images (photos like those the model will see)
    max_images: int = 32  # calibrate on at most this many (sorted by name); ranges settle after ~20
    method: str = "minmax"  # activation ranges: "minmax", "entropy" or "percentile" (ORT's CalibrationMethod)
    per_channel: bool = True  # one weight scale per output channel (a per-tensor scale loses small filters)
    reduce_range: bool = False  # 7-bit weights: avoids int16 overflow in u8s8 kernels without VNNI (AVX2)

    def __post_init__(self) -> None:
        if self.max_images < 1:
            raise ValueError(f"calibration needs at least one image, got max_images={self.max_images}")
        if self.method not in _METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of {', '.join(_METHODS)}")


_METHODS = ("minmax", "entropy", "percentile")


def calibration_images(folder: Path, limit: int) -> list[Path]:
    """The first ``limit`` image files of ``folder`` by name; a one-line ValueError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--calib {folder}: not a folder of images")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise ValueError(f"--calib {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
    return found[:limit]


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader``: the graph's inputs for each image,
    preprocessed as ``OnnxModel.detect`` feeds them ((1, 3, h, w) normalised, resized, unpadded)."""

    def __init__(self, model: OnnxModel, paths: list[Path]) -> None:
        self.model, self.paths = model, iter(paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self.paths, None)
        if path is None:
            return None
        with torch.inference_mode():
            batch, _ = self.model.preprocess([to_tensor(load_rgb(path))])
        h, w = batch.image_sizes[0]
        image = batch.tensors[0, :, :h, :w][None].float().contiguous().numpy()  # (1, 3, h, w)
        return {"image": image, "score_thresh": np.asarray(self.model.config.roi_heads.score_thresh, np.float32)}


def quantize(fp32: Path, out: Path, options: Int8Options) -> Path:
    """Write an INT8 copy of the exported model ``fp32`` to ``out`` (atomically).

    Raises:
        ValueError: ``options.calib`` has no images, or ``fp32`` is not a ``maskrcnn export`` file.
        ImportError: onnxruntime or onnx is missing (``pip install 'maskrcnn[onnx]'``).
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ImportError("INT8 export needs onnxruntime and onnx: pip install 'maskrcnn[onnx]'") from None
    paths = calibration_images(options.calib, options.max_images)
    model = OnnxModel(fp32, threads=None)  # reads the config; refuses files that are not our exports
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference and graph clean-up first, as ORT's quantiser asks (it quantises what
        # it can type; skip_symbolic_shape: the graph's detection count is data-dependent).
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            _Reader(model, paths),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            calibrate_method=methods[options.method],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        proto = onnx.load(str(quantized))
    source = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    kept = {p.key for p in proto.metadata_props}
    for key, value in source.items():
        if key not in kept:
            proto.metadata_props.add(key=key, value=value)
    record = {**asdict(options), "calib": str(options.calib), "images": len(paths)}
    proto.metadata_props.add(key="maskrcnn.int8", value=json.dumps(record))
    data = proto.SerializeToString()
    path = atomic_write(out, lambda f: f.write(data))
    log.info("INT8 model %s (%.0f MB), calibrated on %d images of %s", path, len(data) / 1e6, len(paths), options.calib)
    return path


def export_int8(
    weights: str | Path, out: str | Path, options: Int8Options, opset: int = DEFAULT_OPSET, overwrite: bool = False
) -> Path:
    """``maskrcnn export --int8 --calib DIR``: our checkpoint, a torchvision .pth or a Detectron2
    .pkl to an INT8 ONNX file (the float32 export is made in a temporary folder first).

    Raises:
        ExportError: as ``maskrcnn.weights.export.export`` (bad opset, ``out`` refused).
        ValueError: no calibration images.
    """
    from .export import export

    check_opset(opset)
    check_paths(weights, out, overwrite)
    calibration_images(options.calib, options.max_images)  # fail before the minute of export
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export(weights, Path(tmp) / "fp32.onnx", opset)
        return quantize(fp32, Path(out), options)


def int8_record(path: str | Path) -> dict[str, Any] | None:
    """The calibration an INT8 file records (``maskrcnn.int8`` metadata), or None for a float model."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == "maskrcnn.int8":
            return json.loads(p.value)
    return None


__all__ = ["Int8Options", "calibration_images", "export_int8", "int8_record", "quantize", "ExportError"]
