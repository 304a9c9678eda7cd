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

from maskrcnn.download import (
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
