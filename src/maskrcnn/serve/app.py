"""The HTTP API of ``maskrcnn serve`` (FastAPI on uvicorn).

    POST /predict   an image, as multipart/form-data (any one file field) or as the raw request
                    body (Content-Type image/* or application/octet-stream). Query parameters:
                    score_thresh, tile, tile_overlap, polygons (bool), tolerance, overlay (bool),
                    image_id. Answers {"image": {file_name, width, height}, "results": [COCO
                    entries, as maskrcnn predict's predictions.json], "class_names": [...],
                    optional "polygons" (COCO rings per detection) and "overlay_png" (base64)}.
    GET  /health    {"status": "ok", "queued", "batches", "images"}
    GET  /model     classes, thresholds, the model's config and the server's limits
    GET  /          the web page (static/index.html)

At most ``max_queue`` requests are read and held at once; later ones wait, unread. Limits
answer 4xx and keep nothing: an upload over ``max_upload_mb`` (413, told as soon as
the count passes it, before the rest is read), an image over ``max_pixels`` (413, from the
header, before decoding), a body that is not an image (415), a truncated or corrupt image
(400), bad parameters (422). Uploads are held in memory only (a multipart part over 1 MB
spills to an anonymous temporary file, which the kernel removes with its last handle); a
client that disconnects before its answer has its job cancelled in the queue.
"""
# No "from __future__ import annotations": FastAPI reads the route signatures, whose types are imported lazily here.

import asyncio
import base64
import io
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np

from ..inference.options import PredictOptions
from .worker import BatchWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """How ``maskrcnn serve`` runs."""

    host: str = "127.0.0.1"  # listen address; 0.0.0.0 exposes the model to the network (use a proxy)
    port: int = 8000
    device: str = "cpu"  # where the model runs
    max_batch: int = 4  # requests run together at most
    max_wait_ms: float = 5.0  # how long the worker waits for more requests to join a batch
    max_queue: int = 16  # requests read, decoded and queued at once; later ones wait their turn unread
    max_upload_mb: float = 20.0  # largest request body, in MB (10^6 bytes)
    # An upload that sends nothing for this long is dropped (408): a stalled client would
    # otherwise hold one of the max_queue places for ever, and max_queue of them the server.
    read_timeout_s: float = 30.0
    max_pixels: int = 40_000_000  # largest image, in pixels (a 40 MP image decodes to 120 MB)
    precision: str = "fp32"  # as for predict: fp32, auto, bf16, fp16


def _missing() -> ValueError:
    return ValueError("maskrcnn serve needs fastapi, uvicorn and python-multipart: pip install 'maskrcnn[serve]'")


class Rejected(Exception):
    """A request refused with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> (H, W, 3) uint8 RGB, EXIF-oriented, as ``maskrcnn predict`` reads a file
    (``data.images.to_rgb``). Raises ``Rejected`` (415 not an image, 413 too many pixels, 400 corrupt)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..data.images import to_rgb

    if not data:
        raise Rejected(400, "empty upload: send an image file")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the limit below, told in the answer, replaces Pillow's warning
    try:
        try:
            img = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise Rejected(415, "not an image file that Pillow can read (JPEG, PNG, TIFF, WebP, BMP, ...)") from None
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise Rejected(
                    413, f"image is {w}x{h} = {w * h:,} pixels, more than this server's limit of {max_pixels:,}"
                )
            try:
                return to_rgb(ImageOps.exif_transpose(img))  # decodes: a truncated file fails here
            except (OSError, ValueError, SyntaxError) as e:
                raise Rejected(400, f"truncated or corrupt image: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


async def read_body(request: Any, limit: int, timeout_s: float) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes or says it will, and
    dropped (408) when the client sends nothing for ``timeout_s`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"upload of {int(declared):,} bytes is over this server's limit of {limit:,}")
    chunks, size = [], 0
    stream = request.stream().__aiter__()  # ClientDisconnect when the client goes away mid-upload
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise Rejected(408, f"the upload sent nothing for {timeout_s:g} s; send the whole image at once") from None
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"upload is over this server's limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Any, body: bytes) -> tuple[bytes, str]:
    """(the image's bytes, its file name) from a multipart form or a raw body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def once():  # the parser reads a stream: the body we already hold, in one piece
            yield body

        try:
            form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=20).parse()
        except MultiPartException as e:
            raise Rejected(400, f"malformed multipart upload: {e.message}") from None
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise Rejected(400, "the form holds no file: send the image as a file field (e.g. -F image=@photo.jpg)")
            fields = sorted({k for k, v in form.multi_items() if not isinstance(v, UploadFile)})
            if fields:  # e.g. -F score_thresh=0.9: options are query parameters, and would be ignored here
                raise Rejected(
                    422, f"form field {', '.join(fields)}: send options as query parameters (/predict?score_thresh=0.5)"
                )
            return await files[0].read(), files[0].filename or "upload"
        finally:
            await form.close()
    if kind.startswith("image/") or kind in ("application/octet-stream", ""):
        return body, request.query_params.get("filename", "upload")
    raise Rejected(
        415, f"Content-Type {kind} is not an image: send multipart/form-data, image/* or application/octet-stream"
    )


# The query parameters of POST /predict: the route's own, and filename (the raw-body upload's name).
PREDICT_PARAMS = frozenset(
    ("score_thresh", "tile", "tile_overlap", "polygons", "tolerance", "overlay", "image_id", "filename")
)
# COCO ids are non-negative; the web page and other JavaScript clients read them as doubles,
# which hold integers exactly up to 2**53 - 1.
MAX_IMAGE_ID = 2**53 - 1


def create_app(model: Any, options: ServeOptions = ServeOptions(), weights: str = "") -> Any:
    """The FastAPI application serving ``model``; its worker thread starts now and stops with the app."""
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, JSONResponse, Response
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect
    except ImportError:
        raise _missing() from None
    from contextlib import asynccontextmanager

    from ..config import to_dict
    from ..inference.predictor import model_precision
    from ..inference.tiling import check_options

    model_precision(model, options.precision)  # an unknown or unsupported precision: now, not per request
    worker = BatchWorker(model, options.max_batch, options.max_wait_ms / 1000, options.precision)
    limit = int(options.max_upload_mb * 1_000_000)
    # Requests beyond this many wait, unread, in the kernel's socket buffers: memory holds at most
    # max_queue uploads and decoded images (a thousand waiting 40 MP uploads would not fit).
    admitted = asyncio.Semaphore(options.max_queue)
    cfg = model.config
    names, categories = cfg.label_names(), cfg.label_categories()

    @asynccontextmanager
    async def lifespan(app: Any):
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="maskrcnn serve", lifespan=lifespan)
    app.state.worker = worker
    page = resources.files("maskrcnn.serve") / "static" / "index.html"

    @app.exception_handler(Rejected)
    async def rejected(request: Request, e: Rejected) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        """FastAPI's own parameter checks, told in one line like every other 4xx of this service."""
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(page), media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": worker.pending(), "batches": worker.batches, "images": worker.images}

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        classes = [{"label": k, "name": names[k], "category_id": categories[k]} for k in range(1, len(names))]
        return {
            "weights": weights,
            "classes": classes,
            "score_thresh": cfg.roi_heads.score_thresh,
            "mask_thresh": cfg.roi_heads.mask_thresh,
            "masks": cfg.masks,
            "config": to_dict(cfg),
            "limits": {"max_upload_bytes": limit, "max_pixels": options.max_pixels, "max_batch": options.max_batch},
        }

    @app.post("/predict")
    async def predict(
        request: Request,
        score_thresh: float | None = Query(None, ge=0.0, le=1.0, description="keep detections scoring at least this"),
        tile: int | None = Query(None, description="tile size in pixels, for large images"),
        tile_overlap: float = Query(0.2, description="fraction of a tile that neighbours share"),
        polygons: bool = Query(False, description="add each mask's outline as COCO polygons"),
        tolerance: float = Query(1.0, ge=0.0, description="polygon simplification, in pixels"),
        overlay: bool = Query(False, description="add the drawn detections as a base64 PNG"),
        image_id: int = Query(1, ge=0, le=MAX_IMAGE_ID, description="image_id of the COCO entries"),
    ) -> Any:
        repeated = sorted({k for k in request.query_params.keys() if len(request.query_params.getlist(k)) > 1})
        if repeated:  # which one counts would be a guess
            raise Rejected(422, f"query parameter {', '.join(repeated)} given more than once")
        unknown = sorted(set(request.query_params) - PREDICT_PARAMS)
        if unknown:  # a misspelt option (score_threshold=0.9) would otherwise be ignored without a word
            raise Rejected(
                422, f"unknown query parameter {', '.join(unknown)}: known are {', '.join(sorted(PREDICT_PARAMS))}"
            )
        pointless = [
            f"{name} applies with {needs}"
            for name, needs, given in (("tile_overlap", "tile", tile is not None), ("tolerance", "polygons", polygons))
            if name in request.query_params and not given
        ]
        if pointless:  # the caller expects an effect it would not get
            raise Rejected(422, "; ".join(pointless))
        try:
            check_options(tile, tile_overlap, False)
        except ValueError as e:
            raise Rejected(422, str(e)) from None
        async with admitted:  # the requests past this point bound the memory: their uploads and images
            try:
                body = await read_body(request, limit, options.read_timeout_s)
            except ClientDisconnect:
                log.info("client went away during the upload; nothing kept")
                return Response(status_code=400)  # nobody reads it
            data, file_name = await image_bytes(request, body)
            del body
            image = await run_in_threadpool(decode_image, data, options.max_pixels)
            del data
            future = worker.submit(
                image, PredictOptions(score_thresh=score_thresh, tile=tile, tile_overlap=tile_overlap)
            )
            del image
            waiting = asyncio.wrap_future(future)
            while not (await asyncio.wait({waiting}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    future.cancel()  # still queued: never runs; already running: its result is dropped
                    log.info("client went away while waiting; job cancelled")
                    return Response(status_code=400)
            result = waiting.result()
        if result.error is not None:
            return JSONResponse({"detail": result.error}, status_code=500)
        answer = await run_in_threadpool(_answer, result, file_name, image_id, polygons, tolerance, overlay)
        return JSONResponse(answer)

    return app


def _answer(
    result: Any, file_name: str, image_id: int, polygons: bool, tolerance: float, overlay: bool
) -> dict[str, Any]:
    """The JSON of one prediction (see the module docstring)."""
    h, w = result.image_size
    answer: dict[str, Any] = {
        "image": {"file_name": file_name, "width": w, "height": h},
        "results": result.to_coco(image_id),
        "class_names": list(result.class_names),
    }
    if polygons and result.rles is not None:
        from ..inference.polygons import coco_polygons, result_polygons

        answer["polygons"] = [coco_polygons(p) for p in result_polygons(result, tolerance)]
    if overlay:
        buffer = io.BytesIO()
        result.plot().save(buffer, format="PNG")
        answer["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return answer


def run(weights: str, options: ServeOptions = ServeOptions()) -> None:
    """Load ``weights`` (a file or ``hf://owner/name``) and serve it until Ctrl-C or SIGTERM."""
    try:
        import uvicorn
    except ImportError:
        raise _missing() from None
    from ..weights.checkpoint import load

    model = load(weights, device=options.device)
    app = create_app(model, options, weights=str(weights))
    log.info("serving %s on http://%s:%d (options: %s)", weights, options.host, options.port, asdict(options))
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")
