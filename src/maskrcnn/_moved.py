"""Old module paths of modules that moved into folders, kept importable with a warning.

``import maskrcnn.checkpoint`` (and ``from maskrcnn.predictor import predict``, ...) still works
for one release: a finder placed before the normal one answers those names with the module at
its new path, the same module object (so patching either name patches both), and warns once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

# old name -> new name; removed in 0.3
MOVED = {
    "maskrcnn.checkpoint": "maskrcnn.weights.checkpoint",
    "maskrcnn.torchvision_compat": "maskrcnn.weights.torchvision",
    "maskrcnn.detectron2_compat": "maskrcnn.weights.detectron2",
    "maskrcnn.download": "maskrcnn.weights.download",
    "maskrcnn.export": "maskrcnn.weights.export",
    "maskrcnn.onnx_model": "maskrcnn.weights.onnx_model",
    "maskrcnn.predictor": "maskrcnn.inference.predictor",
    "maskrcnn.results": "maskrcnn.inference.results",
    "maskrcnn.masks": "maskrcnn.inference.masks",
    "maskrcnn.tiling": "maskrcnn.inference.tiling",
    "maskrcnn.video": "maskrcnn.inference.video",
    "maskrcnn.visualize": "maskrcnn.inference.visualize",
    "maskrcnn.engine": "maskrcnn.train",
    "maskrcnn.engine.inference": "maskrcnn.inference.outputs",
    "maskrcnn.engine.evaluate": "maskrcnn.evaluation.coco",
    "maskrcnn.engine.train": "maskrcnn.train.trainer",
    "maskrcnn.engine.train_config": "maskrcnn.train.config",
    "maskrcnn.engine.schedules": "maskrcnn.train.schedules",
    "maskrcnn.engine.pretrain": "maskrcnn.train.pretrain",
    "maskrcnn.engine.distributed": "maskrcnn.train.distributed",
    "maskrcnn.engine.run_output": "maskrcnn.train.run_output",
    "maskrcnn.engine.demo": "maskrcnn.train.demo",
    "maskrcnn.engine.state": "maskrcnn.train.state",
    "maskrcnn.engine.validate": "maskrcnn.train.validate",
    "maskrcnn.engine.datasets": "maskrcnn.train.datasets",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {MOVED[spec.name]}; the old name goes in 0.3", DeprecationWarning, stacklevel=2
        )
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__  # the import system sets __spec__ to ours next: put it back in exec_module
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
