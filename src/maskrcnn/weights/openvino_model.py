"""The exported graph in OpenVINO's format, run by OpenVINO's CPU plugin (issue 22).

``maskrcnn export --out model.xml`` writes the ONNX graph of ``maskrcnn export`` converted to
OpenVINO's IR: ``model.xml`` (the graph, with the ONNX file's metadata in its ``rt_info``, where
OpenVINO's converter puts it, so ``ovc model.onnx`` of our export loads as well) and
``model.bin`` (float32 weights: ``compress_to_fp16=False``, since half-precision weights would not
give the same detections). ``maskrcnn.load("model.xml")`` gives an ``OpenVinoModel``, which is an
``OnnxModel`` with OpenVINO in place of the ONNX Runtime session: the same resizing, boxes back to
the image and mask pasting around the graph, so ``predict``, ``evaluate`` and ``serve`` take it
unchanged. On a 2-core AMD EPYC (Zen 4) it predicted an 800 px photo in 0.92x ONNX Runtime's
time, and since PyTorch's heads run NNPACK (round 6) in 1.04x our PyTorch's
(``benchmarks/bench_openvino.py``; docs/benchmarks.md).

OpenVINO computes in float32 here (``INFERENCE_PRECISION_HINT``): its CPU default on processors
with bf16 is bf16, which moves scores by more than the parity tolerance.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from .onnx_model import OnnxModel

SUFFIX = ".xml"  # the graph; the weights are the .bin beside it
_HEAD_BYTES = 512  # an IR's <net> element is within its first lines


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ImportError("OpenVINO models need openvino: pip install 'maskrcnn[openvino]'") from None
    return openvino


def is_ir(path: str | Path) -> bool:
    """Whether ``path`` is an OpenVINO IR graph (an XML file with a ``<net>`` element), by content."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    return head.lstrip().startswith(b"<") and b"<net " in head


def ir_metadata(path: str | Path) -> dict[str, str]:
    """The ONNX file's metadata that OpenVINO's converter keeps in the IR's ``rt_info/framework``
    (``maskrcnn.format``, ``maskrcnn.config``, ...), read from the XML alone (no weights, no OpenVINO)."""
    try:
        framework = ElementTree.parse(path).getroot().find("rt_info/framework")
    except ElementTree.ParseError:
        return {}
    if framework is None:
        return {}
    return {item.tag: item.get("value", "") for item in framework if item.tag.startswith("maskrcnn.")}


def weights_file(xml: str | Path) -> Path:
    """The ``.bin`` that holds the weights of the IR graph ``xml``."""
    return Path(xml).with_suffix(".bin")


def weights_size(xml: str | Path) -> int | None:
    """The byte count the graph ``xml`` reads from its .bin (the end of its last constant), or
    None if the XML cannot be parsed."""
    try:
        root = ElementTree.parse(xml).getroot()
    except ElementTree.ParseError:
        return None
    ends = [int(d.get("offset", 0)) + int(d.get("size", 0)) for d in root.iter("data") if d.get("offset") is not None]
    return max(ends, default=0)


def check_weights(xml: Path) -> None:
    """ValueError unless the .bin beside ``xml`` is there and of the size the graph reads."""
    bin_path = weights_file(xml)
    if not bin_path.is_file():
        raise ValueError(f"{xml}: its weights {bin_path.name} are not beside it (an IR is the .xml and its .bin)")
    expected = weights_size(xml)
    if expected is not None and bin_path.stat().st_size != expected:
        raise ValueError(
            f"{xml}: {bin_path.name} holds {bin_path.stat().st_size:,} bytes, the graph reads {expected:,}: "
            "not this graph's weights (a truncated copy, or another model's)"
        )


class OpenVinoModel(OnnxModel):
    """An exported model in OpenVINO's IR, compiled for the CPU.

    Args:
        path: the ``.xml`` of ``maskrcnn export --out model.xml`` (its ``.bin`` beside it).
        config: the model config to use instead of the file's.
        threads: inference threads (None: OpenVINO's default, one per core).

    Raises:
        ValueError: the file is not an IR written by ``maskrcnn export``.
    """

    def open_graph(self, threads: int | None) -> dict[str, str]:
        ov = _openvino()
        check_weights(self.path)
        core = ov.Core()
        try:
            graph = core.read_model(str(self.path))
        except Exception as e:  # noqa: BLE001  OpenVINO raises its own types for bad files
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"cannot read OpenVINO model {self.path}: {first_line}") from None
        settings: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            settings["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(graph, "CPU", settings)
        self.request = self.compiled.create_infer_request()
        # The ONNX output names (OpenVINO may list an inner tensor's name of the same output first).
        wanted = {"boxes", "scores", "labels", "masks"}
        self.outputs = [name for out in self.compiled.outputs for name in out.get_names() if name in wanted]
        return ir_metadata(self.path)

    def run_graph(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        found = self.request.infer(feed)
        # Copies: the request reuses its output buffers on the next call.
        return {name: np.array(found[self.compiled.output(name)]) for name in self.outputs}

    def __repr__(self) -> str:
        return f"OpenVinoModel({str(self.path)!r}, num_classes={self.config.num_classes})"


def write_ir(onnx_path: Path, out: Path) -> Path:
    """Convert the ONNX file of ``maskrcnn export`` to IR at ``out`` (.xml) and its .bin (the
    converter carries the ONNX metadata into the XML, where ``ir_metadata`` reads it).

    Both files are written beside ``out`` under temporary names first; the .bin is moved into
    place before the .xml, so a reader never finds a new graph with the old weights."""
    ov = _openvino()
    graph = ov.convert_model(str(onnx_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}-") as tmp:
        staged = Path(tmp) / "model.xml"
        ov.save_model(graph, str(staged), compress_to_fp16=False)
        os.replace(weights_file(staged), weights_file(out))
        os.replace(staged, out)
    return out
