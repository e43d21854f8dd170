"""Serving a trained model over HTTP: a LitServe ``LitAPI`` over :mod:`hymtl.inference`'s predictors.

One request is one image. Where each step runs:

* **the HTTP process** (uvicorn, forked by LitServe): :func:`read_upload` (a FastAPI dependency
  of ``POST /predict``) reads the body under the size limit (a ``Content-Length`` over it is
  refused with 413 before a byte of the body is read; a chunked body when it passes the limit),
  takes the image out of a multipart form (field ``image``), a raw ``image/*`` body or JSON
  ``{"image": "<base64>"}``, and prepares it in a worker thread (off the event loop):
  :class:`UploadDecoder` holds it as a sample's bytes (as a Parquet source's), applies training's
  file check (:func:`hymtl.data.images.check_sample`: empty, not an image, decompression bomb),
  decodes to RGB with EXIF orientation (:func:`hymtl.data.images.load_rgb`, reduced-scale JPEG
  decoding as in prediction) and applies
  the evaluation transforms of the model's preprocessing (:func:`hymtl.data.images.build_transforms`)
  — what ``hymtl.predict`` does to a file. A bad upload is answered there, 4xx with a one-line
  JSON reason (``{"detail": "..."}``), and never reaches a batch;
* **the inference worker** (LitServe, its own process): :class:`ClassifierAPI` loads the model
  with :func:`hymtl.inference.load_predictor` (same formats, trust rule, simplification and
  precision as ``hymtl.predict``), stacks the prepared images of concurrent requests into one
  batch (LitServe's ``max_batch_size`` / ``batch_timeout``) and runs ``predictor.logits`` and
  the task's ``probabilities``; :func:`decode_prediction` turns one image's probabilities into
  the answer through the task's decoding (top-k, or a multi-label model's labels over threshold).

Also: ``GET /`` a page to try the model (:data:`PAGE`), ``GET /info`` LitServe's info with
:func:`model_info` (class names, preprocessing, the model file's SHA-256, backend, precision),
``GET /health``, ``/docs``. :class:`GracefulLitServer` stops the HTTP servers before the queues
(requests in flight are answered) and :func:`run_until_stopped` turns SIGTERM into that stop.

No ``from __future__ import annotations`` here: LitServe reads ``decode_request``'s annotation
object to build the route (the ``Depends`` in :data:`Upload`).
"""

import base64
import binascii
import hashlib
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import litserve as ls
from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

log = logging.getLogger(__name__)

#: media types of a raw image body besides ``image/*``
RAW_TYPES = ("application/octet-stream",)


# --------------------------------------------------------------------------- the answer
class LabelScore(BaseModel):
    label: str
    probability: Optional[float]  # null: the model's output is not a number


class PredictionResponse(BaseModel):
    """``POST /predict``'s answer: the best label, the top-k (best first; a multi-label model: its
    labels over their thresholds), and how many images ran in the same batch as this one
    (dynamic batching, visible)."""

    label: Optional[str]
    probability: Optional[float]
    top: list[LabelScore]
    batch_size: int


def decode_prediction(predictor, probabilities, topk: int) -> dict[str, Any]:
    """One image's probabilities -> ``{"label", "probability", "top": [{"label", "probability"}]}``,
    best first: the labels the model's task decodes (:meth:`hymtl.inference.Predictor.decode`:
    the top ``topk`` classes of a multi-class model, the labels over their thresholds of a
    multi-label one; ``label`` is ``None`` when there is none), as ``hymtl.predict --format json``
    writes them (a probability that is not a number is ``None``)."""
    from hymtl.inference import _probability

    top = [{"label": label, "probability": _probability(p)}
           for label, p in predictor.decode(probabilities, min(topk, len(predictor.class_names)))]
    best = top[0] if top else {"label": None, "probability": None}
    return {"label": best["label"], "probability": best["probability"], "top": top}


# --------------------------------------------------------------------------- reading an upload
@dataclass
class PreparedImage:
    """An upload decoded and transformed in the HTTP process: what the worker batches."""

    #: numpy float32 (3, S, S), normalised. Not a torch tensor: LitServe's request queue is a
    #: multiprocessing manager's, and torch would pickle a tensor as a shared-memory handle
    pixels: Any


class UploadDecoder:
    """Bytes of an upload -> :class:`PreparedImage`, by ``hymtl.predict``'s rules (see the module
    docstring); ``HTTPException`` 422 with the file check's reason for an unusable image."""

    def __init__(self, preprocessing, max_body_bytes: int):
        from hymtl.data.images import build_transforms

        self.preprocessing = preprocessing
        self.transform = build_transforms(preprocessing, train=False)
        self.max_body_bytes = int(max_body_bytes)
        self._torch_ready_in: int | None = None  # the process whose torch threads are set up
        self._torch_ready_lock = threading.Lock()

    def _set_up_torch_threads(self) -> None:
        """The first upload of each HTTP process sets torch's thread pool up alone. The HTTP
        processes fork from the server, and torch rebuilds its inherited pool lazily, at the
        first thread's first operation; two uploads on two threads doing that at once can get no
        pool (``Invalid thread pool!``: a good image answered with a 422)."""
        if self._torch_ready_in == os.getpid():
            return
        import torch

        with self._torch_ready_lock:
            if self._torch_ready_in != os.getpid():
                torch.set_num_threads(1)  # rebuilds the pool; uploads run side by side on one thread each
                self._torch_ready_in = os.getpid()

    def prepare(self, data: bytes) -> PreparedImage:
        import torch

        from hymtl.data.images import check_sample, load_rgb
        from hymtl.data.samples import Sample
        from hymtl.errors import first_line

        upload = Sample("upload", 0, data)  # an image held in memory, as a Parquet source holds it
        reason = check_sample(upload)
        if reason is not None:
            raise HTTPException(422 if data else 400, reason)
        try:
            image = load_rgb(upload, self.preprocessing.resize_size)
        except Exception as exc:  # noqa: BLE001 - any decoder error: this upload is unusable
            raise HTTPException(422, f"cannot decode: {first_line(exc)}") from None
        self._set_up_torch_threads()
        try:
            pixels = self.transform(image)
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(422, f"cannot transform {image.width}x{image.height}: {first_line(exc)}") from None
        return PreparedImage(pixels.as_subclass(torch.Tensor).numpy())

    def prepare_json(self, body: bytes) -> PreparedImage:
        """``{"image": "<base64>"}`` (a ``data:...;base64,`` prefix allowed) -> :meth:`prepare`."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        text = payload.get("image") if isinstance(payload, dict) else None
        if not isinstance(text, str):
            raise HTTPException(400, 'JSON must be an object {"image": "<the image file in base64>"}')
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, '"image" is not valid base64') from None
        return self.prepare(data)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 when over ``limit`` bytes: by its ``Content-Length``
    before any of it is read, else (chunked) as soon as what arrived passes the limit."""
    declared = request.headers.get("content-length")
    too_big = f"the request body is over the limit of {limit:,} bytes (max_body_mb)"
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "invalid Content-Length")
        if int(declared) > limit:
            raise HTTPException(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes) -> bytes:
    """The bytes of the form field ``image`` (starlette's multipart parser over the read body)."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once():
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=4, max_fields=16,
                                     max_part_size=len(body) + 1).parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed multipart form: {exc.message}") from None
    field = form.get("image")
    if field is None or isinstance(field, str):
        raise HTTPException(400, "the multipart form has no file field 'image'")
    try:
        return await field.read()
    finally:
        await form.close()


async def read_upload(request: Request) -> PreparedImage:
    """FastAPI dependency of ``POST /predict``: the upload, read and prepared (see the module docstring)."""
    decoder: UploadDecoder = request.app.state.hymtl_upload_decoder
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json") and not (
            content_type.startswith("image/") or content_type in RAW_TYPES):
        raise HTTPException(415, f"send the image as multipart/form-data (field 'image'), as the body with "
                                 f"Content-Type image/*, or as JSON {{\"image\": base64}}; got "
                                 f"{content_type or 'no Content-Type'}")
    body = await read_body(request, decoder.max_body_bytes)
    if not body:
        raise HTTPException(400, "empty request body: no image")
    if content_type == "application/json":
        return await run_in_threadpool(decoder.prepare_json, body)
    if content_type == "multipart/form-data":
        body = await _multipart_image(request, body)
    return await run_in_threadpool(decoder.prepare, body)


#: ``decode_request``'s parameter type: LitServe hands the route's parameter to FastAPI, which
#: runs :func:`read_upload` in the HTTP process; the worker receives the :class:`PreparedImage`.
Upload = Annotated[PreparedImage, Depends(read_upload)]


# --------------------------------------------------------------------------- the model
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_info(predictor, sha256: str, topk: int) -> dict[str, Any]:
    """What ``GET /info`` says about the model (LitServe's ``model_metadata``)."""
    return {
        "source": str(predictor.source), "sha256": sha256, "backend": predictor.backend,
        "precision": getattr(predictor, "precision", None), "class_names": list(predictor.class_names),
        "preprocessing": predictor.preprocessing.as_dict(), "topk": topk, "task": predictor.task.name,
        "thresholds": predictor.thresholds,
        "simplified": str(getattr(predictor, "simplified", "")) or None,
    }


class ClassifierAPI(ls.LitAPI):
    """The inference worker: a :func:`hymtl.inference.load_predictor` predictor over batches of
    prepared images. ``sha256``: the model file's digest when the server started; a worker that
    finds another file there refuses to start (the file was replaced)."""

    def __init__(self, ckpt_path: str, sha256: str, trust_model: bool = False, precision: str = "auto",
                 topk: int = 1, threads: int | None = None, max_batch_size: int = 8, batch_timeout: float = 0.005):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.ckpt_path, self.sha256, self.trust_model = str(ckpt_path), sha256, trust_model
        self.precision, self.topk, self.threads = precision, topk, threads

    def setup(self, device) -> None:
        import torch

        from hymtl.inference import load_predictor

        # a SIGTERM or Ctrl-C to the whole process group (systemd, a terminal) must not end a batch
        # in flight: the server stops this worker once its HTTP servers have answered (GracefulLitServer)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.threads:  # several workers share the cores
            torch.set_num_threads(self.threads)
        if file_sha256(self.ckpt_path) != self.sha256:
            raise RuntimeError(f"{self.ckpt_path} changed after the server started: not loading it")
        self.predictor = load_predictor(self.ckpt_path, trust_model=self.trust_model, precision=self.precision)

    def decode_request(self, request: Upload):
        import torch

        return torch.from_numpy(request.pixels)

    def batch(self, inputs):
        import torch

        return torch.stack(inputs)

    def predict(self, x):
        single = x.dim() == 3  # max_batch_size=1: LitServe does not batch
        probabilities = self.predictor.probabilities(self.predictor.logits(x[None] if single else x))
        outputs = [(row, len(probabilities)) for row in probabilities]
        return outputs[0] if single else outputs

    def unbatch(self, output):
        return output

    def encode_response(self, output) -> PredictionResponse:
        probabilities, batch_size = output
        return {**decode_prediction(self.predictor, probabilities, self.topk), "batch_size": batch_size}


# --------------------------------------------------------------------------- settings
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServeSettings:
    """``conf/serve.yaml``, checked (:meth:`from_config`)."""

    ckpt_path: str
    host: str
    port: int
    topk: int
    max_batch_size: int
    batch_timeout: float
    workers: int
    request_timeout: float
    max_body_bytes: int
    precision: str
    trust_model: bool
    log_level: str

    @classmethod
    def from_config(cls, cfg) -> "ServeSettings":
        """Every setting checked: a :class:`~hymtl.errors.HymtlError` (one line) for the first bad one."""
        from omegaconf import OmegaConf

        from hymtl.config import checked_number
        from hymtl.errors import HymtlError, printable
        from hymtl.inference import checked_precision

        if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
            raise HymtlError("ckpt_path= is required (python -m hymtl.serve ckpt_path=MODEL)")
        host = str(cfg.host)
        if host not in HOSTS:
            raise HymtlError(f"host must be one of {', '.join(HOSTS)} (what LitServe binds to), got {printable(host)}")
        port = checked_number("port", cfg.port, "integer", 1)
        if not 1024 <= port <= 65535:  # LitServe's range
            raise HymtlError(f"port must be from 1024 to 65535, got {port}")
        batch_timeout = checked_number("batch_timeout", cfg.batch_timeout, "float", 0)
        request_timeout = checked_number("request_timeout", cfg.request_timeout, "float", 0, exclusive=True)
        if batch_timeout >= request_timeout:
            raise HymtlError(f"batch_timeout ({batch_timeout} s) must be shorter than request_timeout ({request_timeout} s)")
        if not isinstance(cfg.trust_model, bool):
            raise HymtlError(f"trust_model must be true or false, got {printable(cfg.trust_model)}")
        log_level = str(cfg.log_level).lower()
        if log_level not in LOG_LEVELS:
            raise HymtlError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {printable(cfg.log_level)}")
        max_body_mb = checked_number("max_body_mb", cfg.max_body_mb, "float", 0, exclusive=True)
        return cls(
            ckpt_path=str(Path(str(cfg.ckpt_path)).expanduser()), host=host, port=port,
            topk=checked_number("topk", cfg.topk, "integer", 1),
            max_batch_size=checked_number("max_batch_size", cfg.max_batch_size, "integer", 1),
            batch_timeout=batch_timeout, workers=checked_number("workers", cfg.workers, "integer", 1),
            request_timeout=request_timeout, max_body_bytes=int(max_body_mb * 1024 * 1024),
            precision=checked_precision(cfg.precision), trust_model=cfg.trust_model, log_level=log_level,
        )


def check_port_free(host: str, port: int) -> None:
    """A :class:`~hymtl.errors.HymtlError` now for a port another program holds (uvicorn would
    log it and exit 1 after the model is loaded and the workers started)."""
    import socket

    from hymtl.errors import HymtlError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise HymtlError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None


def build_server(settings: ServeSettings) -> tuple["GracefulLitServer", dict[str, Any]]:
    """The server for ``settings`` and what ``/info`` says of the model. The model is loaded here
    once (a bad file is the user's error now, not a worker's crash later; its class names,
    preprocessing and precision are what ``/info`` and the HTTP processes need) and again by each
    inference worker."""
    from hymtl.inference import load_predictor

    check_port_free(settings.host, settings.port)
    sha256 = file_sha256(settings.ckpt_path) if os.path.isfile(settings.ckpt_path) else ""
    predictor = load_predictor(settings.ckpt_path, trust_model=settings.trust_model, precision=settings.precision)
    info = model_info(predictor, sha256, settings.topk)
    import torch

    # the HTTP processes fork from here: each upload is prepared on one thread (concurrent uploads
    # run side by side), leaving the other cores to the inference worker
    torch.set_num_threads(1)
    api = ClassifierAPI(settings.ckpt_path, sha256, trust_model=settings.trust_model, precision=settings.precision,
                        topk=settings.topk, threads=max(1, (os.cpu_count() or 1) // settings.workers),
                        max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout)
    server = GracefulLitServer(api, accelerator="cpu", workers_per_device=settings.workers,
                               timeout=settings.request_timeout, model_metadata=info)
    add_routes(server, UploadDecoder(predictor.preprocessing, settings.max_body_bytes))
    return server, info


# --------------------------------------------------------------------------- the server
class GracefulLitServer(ls.LitServer):
    """LitServe's server, stopped in the order that answers the requests in flight.

    LitServe 0.2 closes the response queues before it stops the HTTP servers, so a request in
    flight at SIGTERM would never be answered. Here the HTTP servers go first (uvicorn's graceful
    shutdown: stop accepting, wait for the open requests, whose answers still arrive), then
    LitServe's own shutdown. Its worker monitor is let finish first: it would otherwise query the
    manager LitServe shuts down and print a traceback."""

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        servers = [w for w in uvicorn_workers.values() if w.is_alive()]
        for server in servers:
            server.terminate()
        for server in servers:
            server.join(timeout=self.uvicorn_graceful_timeout)
        for thread in threading.enumerate():
            if thread.name == "litserve-monitoring" and thread is not threading.current_thread():
                thread.join(timeout=self.monitor_internal + 1)
        for worker in self.inference_workers:  # nothing left to answer; they ignore SIGTERM (ClassifierAPI.setup)
            worker.kill()
            worker.join()
        super()._perform_graceful_shutdown(manager, {k: w for k, w in uvicorn_workers.items() if w.is_alive()},
                                           shutdown_reason)


def add_routes(server: ls.LitServer, decoder: UploadDecoder) -> None:
    """The page at ``GET /`` (in place of LitServe's "litserve running"), the upload decoder of the
    HTTP processes, and the request body forms of ``POST /predict`` in the OpenAPI docs."""
    from fastapi.routing import APIRoute

    app = server.app
    app.title, app.version = "hymtl.serve", "1"
    app.description = "A trained hymtl model: POST an image to /predict; GET / to try it in a browser."
    app.state.hymtl_upload_decoder = decoder
    app.router.routes = [r for r in app.router.routes
                         if not (isinstance(r, APIRoute) and r.path == "/" and "GET" in r.methods)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    binary = {"schema": {"type": "string", "format": "binary"}}
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.path == "/predict":
            route.summary = "Classify one image"
            route.description = ("The image as multipart/form-data (field `image`), as the raw body "
                                 "(`Content-Type: image/*`), or as JSON `{\"image\": \"<base64>\"}`. "
                                 "4xx with `{\"detail\": reason}` for a body that is not a usable image.")
            route.openapi_extra = {"requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                   "properties": {"image": binary["schema"]}}},
                "image/*": binary,
                "application/json": {"schema": {"type": "object", "required": ["image"],
                                                "properties": {"image": {"type": "string", "format": "byte"}}}},
            }}}


def run_until_stopped(server: ls.LitServer, **run_kwargs) -> bool:
    """``server.run(**run_kwargs)`` with SIGTERM as a graceful stop (:class:`GracefulLitServer`);
    True when SIGTERM ended it. Processes forked by LitServe inherit the handler: there it ignores
    the signal (a SIGTERM to the whole process group, as systemd sends, reaches them too), and the
    main process stops them in order."""
    main_pid = os.getpid()
    stopping = threading.Event()

    def request_stop() -> None:
        while getattr(server, "_shutdown_event", None) is None:  # SIGTERM while starting
            threading.Event().wait(0.05)
        server._shutdown_event.set()  # what LitServe's own /shutdown endpoint sets

    def on_sigterm(signum, frame) -> None:
        if os.getpid() != main_pid:  # LitServe's manager, or an HTTP server done with its own
            return  # graceful stop (uvicorn re-raises the signal): the main process ends them
        if not stopping.is_set():
            stopping.set()
            # not here: the main thread may be inside a call to LitServe's manager process
            threading.Thread(target=request_stop, name="hymtl-sigterm", daemon=True).start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.run(generate_client_file=False, **run_kwargs)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return stopping.is_set()


#: ``GET /``: choose or drop an image, see the top-k as bars (plain HTML and JavaScript, no CDN)
PAGE = Path(__file__).with_name("serve_page.html").read_text(encoding="utf-8")
