"""Shared test fixtures: the ../shared folder and the torchvision-format parity checkpoint."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKRCNN_SHARED", REPO.parent / "shared"))
TV_PARITY = SHARED / "fixtures" / "tv_parity"
KUDZU = SHARED / "data" / "kudzu_bug"


def need(path: Path) -> Path:
    """Skip the calling test with a clear reason when a shared file or folder is absent."""
    if not path.exists():
        pytest.skip(f"shared material not found: {path} (expected ../shared beside the repo, or set MASKRCNN_SHARED)")
    return path


@pytest.fixture(scope="session")
def tv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity checkpoint, built once per machine from the fixture's recipe (digest-checked)."""
    need(TV_PARITY / "weights_rule.py")
    cache = Path(os.environ.get("MASKRCNN_TEST_CACHE", Path.home() / ".cache" / "maskrcnn-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "tv_parity_r50.pth"
    if not path.exists():
        spec = importlib.util.spec_from_file_location("weights_rule", TV_PARITY / "weights_rule.py")
        rule = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rule)  # type: ignore[union-attr]
        tmp = path.with_suffix(".tmp")
        rule.write_checkpoint(str(tmp), TV_PARITY)  # raises if the digest differs
        tmp.replace(path)
    return path
