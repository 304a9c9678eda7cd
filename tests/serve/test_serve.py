"""``maskrcnn serve`` over real HTTP on 127.0.0.1: the same answers as ``maskrcnn predict``,
batching, per-request options, and every limit answered with a clear 4xx that keeps nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_util
from scipy.ndimage import binary_fill_holes

from maskrcnn.cli import main
from maskrcnn.inference.options import PredictOptions
from maskrcnn.serve.app import ServeOptions, create_app
from maskrcnn.serve.worker import BatchWorker
from maskrcnn.weights.checkpoint import load

from .helpers import RunningServer

MAX_UPLOAD_MB = 0.5
MAX_PIXELS = 200_000
READ_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tiny_ckpt):  # noqa: F811
    app = create_app(
        load(tiny_ckpt),
        ServeOptions(
            max_batch=4,
            max_wait_ms=20,
            max_upload_mb=MAX_UPLOAD_MB,
            max_pixels=MAX_PIXELS,
            read_timeout_s=READ_TIMEOUT_S,
        ),
        weights="tiny.pth",
    )
    with RunningServer(app) as url:
        yield url, app.state.worker


def _png(h: int, w: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _post(url: str, data: bytes, params: dict | None = None, **kw) -> requests.Response:
    return requests.post(
        f"{url}/predict", data=data, headers={"Content-Type": "image/png"}, params=params, timeout=60, **kw
    )


def test_answers_equal_maskrcnn_predicts_files(server, tiny_ckpt, tmp_path):  # noqa: F811
    url, _ = server
    (tmp_path / "in").mkdir()
    png = _png(90, 120, seed=1)
    (tmp_path / "in" / "a.png").write_bytes(png)
    assert (
        main(["predict", "--weights", str(tiny_ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"])
        == 0
    )
    expected = json.loads((tmp_path / "out" / "predictions.json").read_text())
    image_id = json.loads((tmp_path / "out" / "images.json").read_text())[0]["id"]
    assert len(expected) > 0
    raw = _post(url, png, {"image_id": image_id})
    form = requests.post(
        f"{url}/predict", files={"image": ("a.png", png, "image/png")}, params={"image_id": image_id}, timeout=60
    )
    for r in (raw, form):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["image"]["width"] == 120 and got["image"]["height"] == 90
        assert [e["segmentation"] for e in got["results"]] == [e["segmentation"] for e in expected]
        assert [e["category_id"] for e in got["results"]] == [e["category_id"] for e in expected]
        np.testing.assert_allclose([e["bbox"] for e in got["results"]], [e["bbox"] for e in expected], atol=1e-4)
        np.testing.assert_allclose([e["score"] for e in got["results"]], [e["score"] for e in expected], atol=1e-6)
    assert form.json()["image"]["file_name"] == "a.png"
    names = {"circle", "square", "triangle"}
    assert set(raw.json()["class_names"]) <= names


def test_polygons_fill_back_to_the_masks_and_the_overlay_is_a_png(server):
    url, _ = server
    png = _png(90, 120, seed=2)
    got = _post(url, png, {"polygons": "true", "tolerance": 0, "overlay": "true"}).json()
    masks = [mask_util.decode(e["segmentation"]).astype(bool) for e in got["results"]]
    assert len(got["polygons"]) == len(masks) and any(m.sum() > 20 for m in masks)
    for mask, rings in zip(masks, got["polygons"]):
        if mask.sum() < 20:  # a sliver's outline has no area to compare
            continue
        # pycocotools rasterises the rings on its own: an independent reader of the polygons.
        # COCO rings have no holes (maskrcnn.inference.polygons drops them): filled, they cover the mask
        # and stay within the mask with its holes filled.
        filled = mask_util.decode(mask_util.merge(mask_util.frPyObjects(rings, 90, 120))).astype(bool)
        assert not (mask & ~filled).any() and not (filled & ~binary_fill_holes(mask)).any()
    overlay = Image.open(io.BytesIO(base64.b64decode(got["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (120, 90)
    original = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    drawn = np.asarray(overlay.convert("RGB")).astype(int)
    union = np.any(masks, axis=0)
    assert (np.abs(drawn - original).sum(-1)[union] > 0).mean() > 0.9  # the masks are tinted


def test_requests_that_arrive_together_run_in_fewer_batches_with_the_same_answers(server):
    url, worker = server
    images = [_png(60 + 10 * (i % 2), 80, seed=10 + i) for i in range(8)]
    alone = [_post(url, png).json()["results"] for png in images]
    before = worker.batches
    answers: list = [None] * 8

    def call(i: int) -> None:
        answers[i] = _post(url, images[i]).json()["results"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worker.batches - before < 8  # some requests shared a worker call
    for got, ref in zip(answers, alone):
        assert [e["segmentation"] for e in got] == [e["segmentation"] for e in ref]
        np.testing.assert_allclose([e["score"] for e in got], [e["score"] for e in ref], atol=1e-5)


def test_a_request_sets_its_own_score_threshold_and_tiling(server, tiny_ckpt):  # noqa: F811
    url, _ = server
    png = _png(90, 120, seed=3)
    everything = _post(url, png).json()["results"]
    cut = float(np.median([e["score"] for e in everything]))
    kept = _post(url, png, {"score_thresh": cut}).json()["results"]
    assert kept == [e for e in everything if e["score"] >= cut] and 0 < len(kept) < len(everything)
    big = _png(150, 180, seed=4)
    # The untrained model scores every class ~1/4: this threshold keeps a few dozen (merging
    # 200 tile detections takes seconds).
    options = {"tile": 128, "tile_overlap": 0.25, "score_thresh": 0.251}
    tiled = _post(url, big, options)
    assert tiled.status_code == 200 and tiled.json()["image"]["width"] == 180
    # The request's tiling reached the model: the answer is the tiled run's, not the whole image's.
    array = np.asarray(Image.open(io.BytesIO(big)))
    by_tiles = load(tiny_ckpt).predict(array, tile=128, tile_overlap=0.25, score_thresh=0.251).to_coco(1)
    assert len(by_tiles) > 0
    assert [e["segmentation"] for e in tiled.json()["results"]] == [e["segmentation"] for e in by_tiles]
    assert tiled.json()["results"] != _post(url, big, {"score_thresh": 0.251}).json()["results"]


def test_health_model_and_page(server):
    url, _ = server
    health = requests.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["queued"] == 0
    info = requests.get(f"{url}/model").json()
    assert [c["name"] for c in info["classes"]] == ["circle", "square", "triangle"]
    assert info["score_thresh"] == 0.0 and info["config"]["backbone"]["name"] == "resnet18"
    assert info["limits"]["max_pixels"] == MAX_PIXELS
    page = requests.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "/predict" in page.text


def _temp_files() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("too_big", 413, "over this server's limit"),
        ("too_big_chunked", 413, "over this server's limit"),
        ("too_many_pixels", 413, "pixels"),
        ("not_an_image", 415, "not an image"),
        ("truncated", 400, "truncated"),
        ("empty", 400, "empty"),
        ("text_body", 415, "Content-Type text/plain"),
        ("form_without_file", 400, "no file"),
        ("bad_threshold", 422, "score_thresh"),
        ("bad_tile", 422, "tile"),
        ("bad_flag", 422, "polygons"),  # FastAPI's own type check: one line too (a breaker found a list)
        ("negative_image_id", 422, "image_id"),
        ("huge_image_id", 422, "image_id"),
        ("misspelt_option", 422, "unknown query parameter score_threshold"),
        ("repeated_option", 422, "query parameter score_thresh given more than once"),
        ("option_as_form_field", 422, "form field score_thresh: send options as query parameters"),
        ("overlap_without_tile", 422, "tile_overlap applies with tile"),
        ("tolerance_without_polygons", 422, "tolerance applies with polygons"),
    ],
)
def test_bad_uploads_get_a_clear_4xx_and_leave_nothing(server, case, status, words):
    url, worker = server
    before, done_before = _temp_files(), worker.images
    png = _png(90, 120)
    big = os.urandom(int(MAX_UPLOAD_MB * 1_000_000) + 10)
    if case == "too_big":
        r = _post(url, big)
    elif case == "too_big_chunked":  # no Content-Length: refused while counting
        r = requests.post(
            f"{url}/predict",
            data=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
    elif case == "too_many_pixels":  # 600 x 400 = 240,000 > 200,000; a flat PNG is small on the wire
        buffer = io.BytesIO()
        Image.new("RGB", (600, 400)).save(buffer, format="PNG")
        r = _post(url, buffer.getvalue())
    elif case == "not_an_image":
        r = _post(url, b"%PDF-1.4 this is not a picture")
    elif case == "truncated":
        r = _post(url, png[: len(png) // 2])
    elif case == "empty":
        r = _post(url, b"")
    elif case == "text_body":
        r = requests.post(f"{url}/predict", data=png, headers={"Content-Type": "text/plain"})
    elif case == "form_without_file":
        r = requests.post(f"{url}/predict", files={"note": (None, "hello")})  # a text field only
    elif case == "bad_threshold":
        r = _post(url, png, {"score_thresh": 1.5})
    elif case == "bad_flag":
        r = _post(url, png, {"polygons": "maybe"})
    elif case == "negative_image_id":
        r = _post(url, png, {"image_id": -1})
    elif case == "huge_image_id":  # past 2**53 - 1 a JavaScript client reads another id
        r = _post(url, png, {"image_id": 2**53})
    elif case == "misspelt_option":
        r = _post(url, png, {"score_threshold": 0.9})
    elif case == "repeated_option":  # which of the two would count is a guess
        r = _post(url, png, [("score_thresh", 0.5), ("score_thresh", 0.9)])
    elif case == "option_as_form_field":  # was ignored: the default threshold applied
        r = requests.post(f"{url}/predict", files={"image": ("a.png", png)}, data={"score_thresh": "0.9"}, timeout=60)
    elif case == "overlap_without_tile":
        r = _post(url, png, {"tile_overlap": 0.5})
    elif case == "tolerance_without_polygons":
        r = _post(url, png, {"tolerance": 2})
    else:
        r = _post(url, png, {"tile": 3})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail, detail
    assert worker.images == done_before and worker.pending() == 0
    assert _temp_files() == before


def test_stalled_uploads_are_dropped_and_the_server_goes_on(server):
    """More stalled clients than the server holds at once (max_queue, 16) froze it for every
    later request (a tester's 18 connections, 150 s): each is now answered 408 after
    read_timeout_s without a byte, and a normal request is answered after them."""
    import socket

    url, worker = server
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(18):
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            + b"\x89PNG" * 25
        )
        socks.append(sock)
    started = time.monotonic()
    r = _post(url, _png(60, 80))  # waits behind the stalled ones until they time out
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 4 * READ_TIMEOUT_S + 10
    answers = []
    for sock in socks:
        answers.append(sock.recv(4096).split(b"\r\n", 1)[0])
        sock.close()
    assert all(a.endswith(b"408 Request Timeout") for a in answers), answers
    assert worker.pending() == 0


def test_a_client_that_disconnects_mid_upload_leaves_nothing_and_the_server_goes_on(server):
    url, worker = server
    port = int(url.rsplit(":", 1)[1])
    done_before, before = worker.images, _temp_files()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 300000\r\n\r\n")
            s.sendall(_png(90, 120)[:5000])
        # and a multipart upload cut inside its file part
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                b'Content-Length: 400000\r\n\r\n--zz\r\nContent-Disposition: form-data; name="image"; '
                b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n' + os.urandom(200000)
            )
    time.sleep(0.5)
    assert _post(url, _png(60, 80)).status_code == 200  # still serving
    assert worker.images == done_before + 1 and worker.pending() == 0
    assert _temp_files() == before


class _GatedModel:
    """Stands in for the model in the worker: records what it is given, and waits for a gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[tuple[int, float | None]] = []

    def predict(self, images, **options):  # PredictOptions' fields, as model.predict takes them
        self.gate.wait(10)
        self.calls.append((len(images), options["score_thresh"]))
        return [f"result {int(im[0, 0, 0])}" for im in images]


def test_the_worker_skips_cancelled_jobs_and_batches_by_options():
    model = _GatedModel()
    worker = BatchWorker(model, max_batch=8, max_wait_s=0.05)

    def image(v):
        return np.full((4, 4, 3), v, np.uint8)

    first = worker.submit(image(0), PredictOptions())  # the worker takes it and waits at the gate
    time.sleep(0.2)
    jobs = [worker.submit(image(v), PredictOptions(score_thresh=0.5 if v % 2 else None)) for v in range(1, 6)]
    assert jobs[1].cancel()  # its client went away while it was queued
    model.gate.set()
    assert first.result(10) == "result 0"
    assert [j.result(10) for j in jobs if j is not jobs[1]] == ["result 1", "result 3", "result 4", "result 5"]
    worker.close()
    # One call for the first job, then the four live ones in two calls: thresholds 0.5 (1, 3, 5) and None (4).
    assert sorted(model.calls, key=str) == sorted([(1, None), (3, 0.5), (1, None)], key=str)


def test_a_failing_model_answers_every_waiting_job_and_the_worker_lives():
    class Broken:
        calls = 0

        def predict(self, images, **kw):
            Broken.calls += 1
            if Broken.calls == 1:
                raise RuntimeError("out of memory")
            return ["ok"] * len(images)

    worker = BatchWorker(Broken(), max_batch=2)
    failed: Future = worker.submit(np.zeros((2, 2, 3), np.uint8), PredictOptions())
    with pytest.raises(RuntimeError, match="out of memory"):
        failed.result(10)
    assert worker.submit(np.zeros((2, 2, 3), np.uint8), PredictOptions()).result(10) == "ok"
    worker.close()


class _HeldModel:
    """The tiny model, held at a gate before each call: a busy server that tests can time."""

    def __init__(self, model) -> None:
        self.model, self.config, self.device = model, model.config, model.device
        self.gate = threading.Event()
        self.seen: list[tuple[int, int]] = []  # (H, W) of each image run

    def predict(self, images, **kw):
        self.gate.wait(30)
        self.seen += [im.shape[:2] for im in images]
        return self.model.predict(images, **kw)


def test_a_client_that_disconnects_while_queued_is_never_run(tiny_ckpt):  # noqa: F811
    held = _HeldModel(load(tiny_ckpt))
    app = create_app(held, ServeOptions(max_batch=1))
    with RunningServer(app) as url:
        port = int(url.rsplit(":", 1)[1])
        first: list = []
        busy = threading.Thread(target=lambda: first.append(_post(url, _png(60, 80))))
        busy.start()  # runs first and waits at the gate
        time.sleep(0.5)
        quitter = _png(70, 90)  # told apart by its size
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: "
                + str(len(quitter)).encode()
                + b"\r\n\r\n"
                + quitter
            )
            time.sleep(0.5)  # fully sent and queued behind the first
        time.sleep(1.0)  # the server polls for a disconnect every 0.25 s
        held.gate.set()
        busy.join(30)
        assert first[0].status_code == 200
        assert _post(url, _png(50, 60)).status_code == 200
        assert held.seen == [(60, 80), (50, 60)]  # the abandoned (70, 90) request never ran
        assert requests.get(f"{url}/health").json()["queued"] == 0


def test_requests_past_max_queue_wait_unread_and_then_run(tiny_ckpt):  # noqa: F811
    held = _HeldModel(load(tiny_ckpt))
    app = create_app(held, ServeOptions(max_batch=1, max_queue=1))
    with RunningServer(app) as url:
        answers: list = []
        threads = [
            threading.Thread(target=lambda i=i: answers.append(_post(url, _png(60 + 10 * i, 80)))) for i in range(2)
        ]
        for t in threads:
            t.start()
            time.sleep(0.5)
        # One request is at the model's gate; the other was not even read, so nothing is queued.
        queued = app.state.worker.pending()
        held.gate.set()  # before asserting: a failure must not leave the server waiting at the gate
        assert queued == 0
        for t in threads:
            t.join(30)
        assert sorted(r.status_code for r in answers) == [200, 200] and sorted(held.seen) == [(60, 80), (70, 80)]


def test_without_the_serve_extra_the_error_names_it(tiny_ckpt, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'maskrcnn\[serve\]'"):
        create_app(load(tiny_ckpt))


def test_the_serve_command_starts_answers_and_stops_on_sigterm(tiny_ckpt, tmp_path, capsys):  # noqa: F811
    import signal
    import subprocess
    from pathlib import Path

    from .helpers import free_port

    assert main(["serve", "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maskrcnn.cli",
            "serve",
            "--weights",
            str(tiny_ckpt),
            "--port",
            str(port),
            "--max-upload-mb",
            "0.001",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                info = requests.get(f"{url}/model", timeout=1).json()
                break
            except requests.RequestException:
                time.sleep(0.1)
        assert info["limits"]["max_upload_bytes"] == 1000  # the flag reached the app
        assert _post(url, _png(60, 80)).status_code == 413
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    # uvicorn shuts down gracefully (the app's shutdown closes the worker), then re-raises the signal.
    assert server.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err and "Finished server process" in err
