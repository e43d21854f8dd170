"""Serve a trained model over HTTP: ``python -m hymtl.serve ckpt_path=RUN/checkpoints/best.ckpt``.

Built on LitServe (:mod:`hymtl.serving`): a ``LitAPI`` over :mod:`hymtl.inference`'s
predictors, so a checkpoint, an ``.onnx`` or (``trust_model=true`` only) a TorchScript file is
read, simplified and run at ``precision`` exactly as ``hymtl.predict`` runs it, and an upload is
checked, decoded and prepared by ``hymtl.predict``'s file rules and the model's evaluation
transforms.

* ``POST /predict``: one image as a multipart upload (field ``image``), as the raw body
  (``Content-Type: image/*``) or as JSON ``{"image": "<base64>"}``; the answer is JSON with the
  best label, the ``topk`` labels with probabilities and the size of the batch it ran in.
  Concurrent requests are batched (``max_batch_size``, ``batch_timeout``); a body over
  ``max_body_mb`` is refused (413) before it is read; a body that is not a usable image gets a
  4xx with a one-line JSON reason and the server goes on.
* ``GET /``: a page to try the model; ``GET /info``: class names, preprocessing, the model
  file's SHA-256, backend, precision; ``GET /health``; ``GET /docs``: the OpenAPI docs.

SIGTERM stops it: no new connections, the requests in flight are answered, then a line says so
and the process exits 0 (Ctrl-C too). A bad setting or model file is one ``error: ...`` line and
exit code 2 before anything listens.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from hymtl.cli import hymtl_main, run_entry


def run(cfg: DictConfig) -> bool:
    """The entry point's work: check the settings, load the model, serve until stopped; returns
    whether SIGTERM stopped it."""
    from hymtl.serving import ServeSettings, build_server, run_until_stopped

    settings = ServeSettings.from_config(cfg)
    server, info = build_server(settings)
    where = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"serving {info['source']} ({len(info['class_names'])} classes, {info['backend']}"
        f"{' ' + info['precision'] if info['precision'] else ''}) at http://{where}:{settings.port}/ "
        f"(POST /predict, docs at /docs); batches of up to {settings.max_batch_size} within "
        f"{settings.batch_timeout * 1000:g} ms, {settings.workers} worker{'s' if settings.workers > 1 else ''}; "
        "SIGTERM or Ctrl-C stops it",
        file=sys.stderr, flush=True,
    )
    by_sigterm = run_until_stopped(server, host=settings.host, port=settings.port, log_level=settings.log_level,
                                   num_api_servers=settings.workers)
    print(f"hymtl.serve: stopped{' on SIGTERM' if by_sigterm else ''}: requests in flight were answered, "
          "no new ones taken", file=sys.stderr, flush=True)
    return by_sigterm


@hymtl_main("serve")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; one ``error: ...`` line and exit code 2 on bad input."""
    run_entry(run, cfg)


if __name__ == "__main__":
    main()
