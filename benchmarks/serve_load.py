"""Load test of ``hymtl.serve`` on 127.0.0.1, beside ``hymtl.predict`` on the same images.

    .venv/bin/python benchmarks/serve_load.py --images ../shared/data/hymenoptera_data/val \\
        --clients 16 --requests 25 [--bad-every 10] [--ckpt MODEL]

In one run: ``python -m hymtl.predict`` over the images (its own summary line: images/s,
decoding included); then ``python -m hymtl.serve`` on a free port, a short warm-up, and
``--clients`` client threads that each send ``--requests`` images one after another (raw body,
``Content-Type: image/jpeg``, keep-alive connection): bounded, it stops by itself. Printed:
requests/s of the good requests over the whole load, p50/p95/p99 latency, errors (a good image
not answered 200, a bad one not answered 4xx, a broken connection), the mean batch size the
server reported, and the ratio to predict's images/s. ``--bad-every 10`` makes every tenth
request a bad upload (alternately not an image and a truncated JPEG); the rates and latencies are
those of the good ones. The load average before and after and the command line are printed too.

The clients run in this process and share the machine with the server (as a local load test
does). Without ``--ckpt`` the model is an untrained ``efficientnet_lite0`` saved after one
Lightning step (the speed does not depend on the weights; ``benchmarks/predict_rate.py``'s).
``--images`` is cycled to ``-n`` distinct files (without it, generated JPEGs). ``--quick`` is a
smoke run (2 clients x 3 requests, 16 images): not the benchmark.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # predict_rate's image and checkpoint makers
sys.path.insert(0, str(REPO))


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def predict_rate(ckpt: Path, folder: Path, out: Path, precision: str) -> tuple[float, str]:
    """``python -m hymtl.predict`` over ``folder``: its images/s and its summary line."""
    result = subprocess.run([sys.executable, "-m", "hymtl.predict", f"ckpt_path={ckpt}", f"inputs=[{folder}]",
                             "format=csv", f"out={out}", f"precision={precision}"],
                            cwd=REPO, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"error: hymtl.predict failed:\n{result.stderr[-2000:]}")
    line = next(l for l in reversed(result.stderr.splitlines()) if "images/s" in l)
    return float(re.search(r"\(([\d.]+) images/s", line).group(1)), line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "hymtl.serve", f"ckpt_path={ckpt}", f"port={port}", f"workers={args.workers}",
         f"max_batch_size={args.max_batch_size}", f"batch_timeout={args.batch_timeout}", f"precision={args.precision}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: the server exited ({process.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit("error: the server did not start in 600 s")


class Client(threading.Thread):
    """Sends its requests one after another on one keep-alive connection; records each answer."""

    def __init__(self, port: int, bodies: list[tuple[bytes, bool]], start: threading.Barrier):
        super().__init__(daemon=True)
        self.port, self.bodies, self.start_line = port, bodies, start
        self.results: list[tuple[bool, int, float, int]] = []  # good?, status, seconds, batch size

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        self.start_line.wait()
        for body, good in self.bodies:
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
                response = connection.getresponse()
                text = response.read()
                status = response.status
            except OSError:
                status, text = 0, b""
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            seconds = time.perf_counter() - started
            batch = re.search(rb'"batch_size":\s*(\d+)', text)
            self.results.append((good, status, seconds, int(batch.group(1)) if batch else 0))
        connection.close()


def run_load(port: int, images: list[bytes], bad: list[bytes], args) -> tuple[float, list]:
    """``args.clients`` x ``args.requests``: (wall seconds, every result)."""
    barrier = threading.Barrier(args.clients + 1)
    clients = []
    for c in range(args.clients):
        bodies = []
        for r in range(args.requests):
            i = c * args.requests + r
            is_bad = args.bad_every and i % args.bad_every == args.bad_every - 1
            bodies.append((bad[i % len(bad)], False) if is_bad else (images[i % len(images)], True))
        clients.append(Client(port, bodies, barrier))
    for client in clients:
        client.start()
    barrier.wait()
    started = time.perf_counter()
    for client in clients:
        client.join()
    return time.perf_counter() - started, [r for client in clients for r in client.results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="folder of images, cycled to -n files (default: generated JPEGs)")
    parser.add_argument("-n", type=int, default=400, help="distinct images (default 400)")
    parser.add_argument("--ckpt", help="model to serve (default: an untrained efficientnet_lite0 checkpoint)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--bad-every", type=int, default=0, help="every Nth request a bad upload (0: none)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 clients x 3 requests, 16 images")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.n = min(args.clients, 2), min(args.requests, 3), min(args.n, 16)
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"load average before: {loadavg()}", flush=True)

    from predict_rate import make_checkpoint, make_images

    with tempfile.TemporaryDirectory(prefix="hymtl-serve-load.") as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", args.n, args.images, 320)
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(tmp / "ckpt")
        rate, predict_line = predict_rate(ckpt, tmp / "images", tmp / "predictions.csv", args.precision)
        images = [Path(p).read_bytes() for p in paths]
        bad = [b"this is not an image\n" * 20, images[0][: len(images[0]) // 3]]  # not an image, truncated

        port = free_port()
        server = start_server(ckpt, port, args, tmp / "server.log")
        try:
            warm = argparse.Namespace(**{**vars(args), "clients": min(args.clients, 4), "requests": 2, "bad_every": 0})
            run_load(port, images, bad, warm)  # oneDNN builds its kernels for the batch shapes
            seconds, results = run_load(port, images, bad, args)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
        good = [r for r in results if r[0]]
        errors = sum(1 for g, status, _, _ in results if (status != 200 if g else not 400 <= status < 500))
        latencies = [s for g, status, s, _ in results if g and status == 200]
        batches = [b for g, status, _, b in results if g and b]
        served = len(latencies) / seconds

    print()
    print(f"{args.n} images ({args.images or 'generated 320x320 JPEGs'}), model {args.ckpt or 'untrained lite0'}, "
          f"precision={args.precision}; server: max_batch_size={args.max_batch_size}, "
          f"batch_timeout={args.batch_timeout}, workers={args.workers}")
    print()
    print("| row | images/s or requests/s | p50 s | p95 s | p99 s | errors | mean batch | x predict |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| hymtl.predict (files, batch 32) | {rate:.1f} | | | | | | 1.00 |")
    bad_note = f", a bad upload in every {args.bad_every}" if args.bad_every else ""
    print(f"| hymtl.serve, {args.clients} clients x {args.requests} requests{bad_note} | {served:.1f} | "
          f"{percentile(latencies, 50):.3f} | {percentile(latencies, 95):.3f} | {percentile(latencies, 99):.3f} | "
          f"{errors} | {sum(batches) / max(1, len(batches)):.1f} | {served / rate:.2f} |")
    print()
    print(f"hymtl.predict: {predict_line}")
    print(f"good requests {len(good)}, answered 200: {len(latencies)}; bad uploads {len(results) - len(good)}; "
          f"load {seconds:.2f} s")
    print(f"load average after: {loadavg()}")
    if args.quick:
        print("(--quick: a smoke run, not the benchmark)")


if __name__ == "__main__":
    main()
