"""download(): against a real local HTTP server, counting the requests it serves."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from maskrcnn.weights.download import (
    PUBLISHED,
    DownloadError,
    cache_dir,
    download,
    expected_hash,
    published_url,
)

PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: more than one read chunk
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Server:
    url: str
    root: Path
    requests: list[str]

    def serve(self, name: str, data: bytes = PAYLOAD) -> str:
        (self.root / name).write_bytes(data)
        return f"{self.url}/{name}"


@pytest.fixture()
def server(tmp_path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", root, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_download_then_reuse_cache(server, tmp_path) -> None:
    url = server.serve("weights.pth")
    dest = tmp_path / "cache"
    path = download(url, dest, sha256=DIGEST)
    assert path == dest / "weights.pth" and path.read_bytes() == PAYLOAD
    assert server.requests == ["/weights.pth"]
    assert download(url, dest, sha256=DIGEST[:10].upper()) == path  # prefix, any case
    assert server.requests == ["/weights.pth"]  # served from the cache
    assert sorted(p.name for p in dest.iterdir()) == ["weights.pth"]


def test_hash_prefix_from_file_name(server, tmp_path) -> None:
    good = server.serve(f"model-{DIGEST[:8]}.pth")
    assert download(good, tmp_path / "a").read_bytes() == PAYLOAD
    bad = server.serve("model-deadbeef.pth")
    with pytest.raises(DownloadError, match="deadbeef") as info:
        download(bad, tmp_path / "b")
    assert DIGEST in str(info.value) and bad in str(info.value)
    assert list((tmp_path / "b").iterdir()) == []


def test_sha_mismatch_leaves_nothing(server, tmp_path) -> None:
    url = server.serve("weights.pth")
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path / "cache", sha256=wrong)
    message = str(info.value)
    assert url in message and wrong in message and DIGEST in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_cached_file_is_replaced(server, tmp_path) -> None:
    url = server.serve("weights.pth")
    dest = tmp_path / "cache"
    dest.mkdir()
    (dest / "weights.pth").write_bytes(b"truncated")
    assert download(url, dest, sha256=DIGEST).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_http_404(server, tmp_path) -> None:
    url = f"{server.url}/missing-0123abcd.pth"
    with pytest.raises(DownloadError, match="404") as info:
        download(url, tmp_path / "cache")
    assert url in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_connection_refused(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(DownloadError, match="could not download") as info:
        download(url, tmp_path / "cache", timeout=5)
    assert url in str(info.value)


def test_default_cache_dir(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"
    path = download(server.serve("w.bin"), progress=False)
    assert path == tmp_path / "home" / "w.bin"
    monkeypatch.delenv("MASKRCNN_HOME")
    assert cache_dir() == Path.home() / ".cache" / "maskrcnn"


def test_bad_sha_argument(tmp_path) -> None:
    with pytest.raises(ValueError, match="hex"):
        download("http://127.0.0.1:1/w.pth", tmp_path, sha256="xyz")


def test_published_table() -> None:
    assert expected_hash(Path(PUBLISHED["maskrcnn_resnet50_fpn_coco"]).name) == "bf2d0c1e"
    assert expected_hash(Path(PUBLISHED["maskrcnn_resnet50_fpn_v2_coco"]).name) == "73cbd019"
    assert expected_hash("resnet50.pth") is None
    assert published_url("maskrcnn_resnet50_fpn_coco").endswith("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    assert published_url("maskrcnn_resnet50_fpn_v2_coco").endswith("maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth")
    with pytest.raises(ValueError, match="did you mean maskrcnn_resnet50_fpn_coco"):
        published_url("maskrcnn_resnet50_fpn_cocoo")


def test_detectron2_names(server, tmp_path, monkeypatch, capsys) -> None:
    """The model zoo names point at MODEL_ZOO.md's files; ``maskrcnn download NAME`` fetches one
    (from a local server standing in for dl.fbaipublicfiles.com) and the package reads it."""
    import pickle

    import numpy as np

    from maskrcnn.cli import main
    from maskrcnn.weights import download as download_module
    from maskrcnn.weights.checkpoint import read_weights

    assert published_url("detectron2_mask_rcnn_R_50_FPN_3x").endswith(
        "mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl"
    )
    assert published_url("detectron2_mask_rcnn_R_101_FPN_3x").endswith(
        "mask_rcnn_R_101_FPN_3x/138205316/model_final_a3ec72.pkl"
    )
    assert published_url("detectron2_mask_rcnn_X_101_32x8d_FPN_3x").endswith("139653917/model_final_2d9806.pkl")
    assert expected_hash("model_final_f10217.pkl") is None  # no digest to check: fetched as is
    state = {
        "backbone.bottom_up.res2.0.conv2.weight": np.zeros((64, 64, 3, 3), np.float32),
        "backbone.bottom_up.res2.0.conv3.weight": np.zeros((256, 64, 1, 1), np.float32),
        **{f"backbone.bottom_up.res4.{b}.conv1.weight": np.zeros((1, 1, 1, 1), np.float32) for b in range(6)},
        "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 4), np.float32),
        "roi_heads.box_predictor.bbox_pred.weight": np.zeros((320, 4), np.float32),
    }
    url = server.serve("model_final_f10217.pkl", pickle.dumps({"model": state, "__author__": "Detectron2 Model Zoo"}))
    monkeypatch.setitem(download_module.PUBLISHED, "detectron2_mask_rcnn_R_50_FPN_3x", url)
    assert main(["download", "detectron2_mask_rcnn_R_50_FPN_3x", "--dir", str(tmp_path / "cache"), "--quiet"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "cache" / "model_final_f10217.pkl"
    config, _ = read_weights(path)
    assert config.backbone.name == "resnet50" and config.backbone.stride_in_1x1
