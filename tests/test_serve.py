"""``hymtl.serve``: the real server (LitServe, uvicorn, its worker processes) on 127.0.0.1 on a
free port, started and stopped by the tests, talked to over real HTTP; the page driven by
headless Chromium through the DevTools protocol."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from bad_corpus import write_decompression_bomb, write_truncated_jpeg
from conftest import REPO_ROOT, entry_command, make_image, stop_process

pytestmark = pytest.mark.slow  # each server starts a model in two processes

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=900,760"]
START_TIMEOUT = 300  # a contended 2-core machine starts the worker slowly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m hymtl.serve`` in its own process group (so a failed test can end all of it)."""

    def __init__(self, ckpt: Path, log: Path, *overrides: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hymtl.serve", f"ckpt_path={ckpt}", f"port={self.port}", *overrides],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}):\n{self.output()[-3000:]}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.close()
        pytest.fail(f"the server did not become healthy in {START_TIMEOUT} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its group (nothing, when it stopped well)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=30)


def live_group_members(pgid: int) -> list[str]:
    """The processes of group ``pgid`` that are not zombies (``/proc``): their command lines."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return members


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post(url: str, body: bytes, content_type: str | None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=dict(headers or {}))
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(field: str, data: bytes, filename: str = "image.jpg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Good images (a JPEG, a PNG with transparency, a large JPEG) and the faults."""
    root = tmp_path_factory.mktemp("serve_images")
    good = {"ants": make_image(root / "ants.jpg", (200, 40, 40), size=(120, 90), seed=1),
            "bees": make_image(root / "bees.jpg", (40, 40, 200), size=(90, 120), seed=2),
            "big": make_image(root / "big.jpg", (40, 160, 60), size=(1200, 900), seed=3)}
    Image.new("RGBA", (64, 48), (200, 40, 40, 128)).save(root / "alpha.png")
    good["alpha"] = root / "alpha.png"
    (root / "text.jpg").write_text("this is not an image\n")
    bad = {"text": root / "text.jpg", "truncated": write_truncated_jpeg(root / "truncated.jpg"),
           "bomb": write_decompression_bomb(root / "bomb.png")}
    return {**good, **{f"bad_{k}": v for k, v in bad.items()}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """One server for the module: batches of up to 8 within 0.3 s, bodies up to 1 MB, top 2."""
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    running = Server(tiny_checkpoint, log, "max_batch_size=8", "batch_timeout=0.3", "max_body_mb=1", "topk=2")
    yield running
    running.close()
    assert running.process.returncode == 0, running.output()[-3000:]
    assert "Traceback" not in running.output(), running.output()[-3000:]


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, images) -> dict[str, dict]:
    """What ``hymtl.predict``'s own code gives for each good image (top 2)."""
    from hymtl.inference import load_predictor, predict

    predictor = load_predictor(tiny_checkpoint, precision="auto")
    names = ["ants", "bees", "big", "alpha"]
    result = predict(predictor, [str(images[n]) for n in names], topk=2, batch_size=1, num_workers=0)
    return {n: dict(p.top) for n, p in zip(names, result.predictions)}


def assert_matches(answer: dict, expected_top: dict) -> None:
    assert [t["label"] for t in answer["top"]] == list(expected_top), (answer, expected_top)
    assert answer["label"] == next(iter(expected_top))
    for item in answer["top"]:  # bf16 kernels may differ a little with the batch's size
        assert item["probability"] == pytest.approx(expected_top[item["label"]], abs=0.02)


# --------------------------------------------------------------------------- the three input forms
def test_each_input_form_gives_predicts_answer(server, images, expected):
    for name in ("ants", "bees", "big", "alpha"):
        data = images[name].read_bytes()
        answers = [
            post(server.url + "/predict", *multipart("image", data)),
            post(server.url + "/predict", data, "image/png" if name == "alpha" else "image/jpeg"),
            post(server.url + "/predict", json.dumps({"image": base64.b64encode(data).decode()}).encode(),
                 "application/json"),
            post(server.url + "/predict", json.dumps(
                {"image": "data:image/jpeg;base64," + base64.b64encode(data).decode()}).encode(), "application/json"),
        ]
        for status, answer in answers:
            assert status == 200, answer
            assert_matches(answer, expected[name])
            assert answer["batch_size"] >= 1


def test_info_health_docs_and_page(server, tiny_checkpoint):
    status, body = get(server.url + "/info")
    model = json.loads(body)["model"]
    assert status == 200
    assert model["class_names"] == ["ants", "bees"]
    assert model["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert model["backend"] == "pytorch" and model["precision"] in ("32", "bf16")
    assert model["preprocessing"]["input_size"] == 224 and model["topk"] == 2
    assert get(server.url + "/health") == (200, b"ok")
    status, body = get(server.url + "/openapi.json")
    body_types = json.loads(body)["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body_types)
    assert get(server.url + "/docs")[0] == 200
    status, page = get(server.url + "/")
    assert status == 200 and b'type="file"' in page and b"/predict" in page


# --------------------------------------------------------------------------- faults
def _raw_post(url: str, headers: str, chunks: list[bytes]) -> tuple[int | None, dict | None]:
    """POST over a plain socket: the head, then ``chunks`` as long as the server reads them; the
    status and JSON of the answer, or ``(None, None)`` when the server closed the connection
    before answering (it refused the rest of the body)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=120) as connection:
        connection.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        try:
            for chunk in chunks:
                connection.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
                data = connection.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    if not answer:
        return None, None
    head, body = answer.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body[: _length(answer)])


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def fault_requests(images: dict[str, Path]) -> dict[str, tuple[int, bytes, str | None]]:
    """name -> (status expected, body, Content-Type)."""
    jpeg = images["ants"].read_bytes()
    return {
        "not an image": (422, images["bad_text"].read_bytes(), "image/jpeg"),
        "truncated image": (422, images["bad_truncated"].read_bytes(), "image/jpeg"),
        "decompression bomb": (422, images["bad_bomb"].read_bytes(), "image/png"),
        "empty body": (400, b"", "image/jpeg"),
        "empty JSON image": (400, b'{"image": ""}', "application/json"),
        "JSON that does not parse": (400, b'{"image": ', "application/json"),
        "JSON without image": (400, b'{"picture": "abc"}', "application/json"),
        "JSON list": (400, b'["abc"]', "application/json"),
        "bad base64": (400, b'{"image": "***not base64***"}', "application/json"),
        "multipart without the field": (400, *multipart("photo", jpeg)),
        "text body": (415, b"hello", "text/plain"),
        "no Content-Type": (415, jpeg, None),
    }


def test_faults_get_a_4xx_with_a_one_line_reason(server, images, expected):
    for name, (status_expected, body, content_type) in fault_requests(images).items():
        status, answer = post(server.url + "/predict", body, content_type)
        assert status == status_expected, (name, answer)
        assert set(answer) == {"detail"} and isinstance(answer["detail"], str), (name, answer)
        assert answer["detail"] and "\n" not in answer["detail"], (name, answer)
    # a body over max_body_mb (1 MB here) is refused from its Content-Length, before it is sent
    status, answer = _raw_post(server.url, f"Content-Type: image/jpeg\r\nContent-Length: {1024 * 1024 + 1}\r\n", [])
    assert status == 413 and "over the limit" in answer["detail"], answer
    # ... and without one (chunked) once what arrived passes the limit: 413, or the connection closed
    chunk = b"10000\r\n" + b"\xff" * 0x10000 + b"\r\n"
    status, answer = _raw_post(server.url, "Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n", [chunk] * 40)
    assert status in (413, None), answer
    # and the server goes on as before
    status, answer = post(server.url + "/predict", images["ants"].read_bytes(), "image/jpeg")
    assert status == 200
    assert_matches(answer, expected["ants"])


def test_concurrent_requests_are_batched_and_bad_ones_disturb_no_one(server, images, expected):
    faults = list(fault_requests(images).values())
    requests = []  # 24 requests: every third a bad upload
    for i in range(24):
        if i % 3 == 2:
            requests.append(("bad", faults[i % len(faults)]))
        else:
            name = ("ants", "bees", "big", "alpha")[i % 4]
            requests.append((name, (200, images[name].read_bytes(), "image/png" if name == "alpha" else "image/jpeg")))

    def send(item):
        name, (status_expected, body, content_type) = item
        return name, status_expected, *post(server.url + "/predict", body, content_type)

    batch_sizes = []
    for _ in range(3):  # batching depends on timing: up to three rounds to see a batch of two or more
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            results = list(pool.map(send, requests))
        for name, status_expected, status, answer in results:
            assert status == status_expected, (name, answer)
            if name != "bad":
                assert_matches(answer, expected[name])
                batch_sizes.append(answer["batch_size"])
        if max(batch_sizes) > 1:
            break
    assert max(batch_sizes) > 1, batch_sizes
    assert max(batch_sizes) <= 8  # max_batch_size


# --------------------------------------------------------------------------- SIGTERM
def test_sigterm_answers_the_requests_in_flight_then_exits(tiny_checkpoint, images, expected, tmp_path):
    # a long batch_timeout keeps the requests in flight (waiting for their batch) when SIGTERM comes
    running = Server(tiny_checkpoint, tmp_path / "server.log", "max_batch_size=64", "batch_timeout=3", "topk=2")
    try:
        data = images["bees"].read_bytes()
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(post, running.url + "/predict", data, "image/jpeg") for _ in range(4)]
            time.sleep(1.0)
            running.process.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=120) for f in futures]
        for status, answer in answers:
            assert status == 200, answer
            assert_matches(answer, expected["bees"])
        assert running.process.wait(timeout=90) == 0
        assert "hymtl.serve: stopped on SIGTERM" in running.output()
        assert "Traceback" not in running.output(), running.output()[-3000:]
        deadline = time.monotonic() + 30  # none of its processes is left (LitServe's helpers exit on their own)
        while live_group_members(running.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live_group_members(running.process.pid)
    finally:
        running.close()


def test_bad_settings_are_one_error_line_before_anything_starts(tiny_checkpoint, tmp_path):
    for overrides, message in (
        ([], "error: ckpt_path= is required"),
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "error: "),
        ([f"ckpt_path={tiny_checkpoint}", "port=80"], "error: port must be"),
        ([f"ckpt_path={tiny_checkpoint}", "host=example.org"], "error: host must be one of"),
        ([f"ckpt_path={tiny_checkpoint}", "batch_timeout=40"], "error: batch_timeout (40.0 s) must be shorter"),
    ):
        result = subprocess.run([*entry_command("hymtl.serve"), *overrides], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (overrides, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (overrides, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- the page, in Chromium
def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (CI installs the Debian packages chromium and chromium-driver: .ci/run)")
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    return found


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, websocket_url: str):
        from websockets.sync.client import connect

        self.socket = connect(websocket_url, max_size=64 * 1024 * 1024, open_timeout=60)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive between the answers
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.socket.close()


def _open_chromium(chromium: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Chromium with DevTools on a port it picks (written to DevToolsActivePort); its page's websocket."""
    process = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline and not (port_file.is_file() and port_file.read_text().strip()):
        if process.poll() is not None:
            pytest.fail(f"chromium exited ({process.returncode})")
        time.sleep(0.2)
    port = int(port_file.read_text().split()[0])
    while time.monotonic() < deadline:
        pages = [t for t in json.loads(get(f"http://127.0.0.1:{port}/json/list")[1]) if t["type"] == "page"]
        if pages:
            return process, pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    process.kill()
    pytest.fail("chromium opened no page")


def _wait_for(devtools: DevTools, expression: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = devtools.evaluate(expression)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not true within {timeout} s: {expression}")


@pytest.fixture(scope="module")
def real_server(real_checkpoint, tmp_path_factory):
    """A server of the ants/bees model (``conftest.real_checkpoint``: frozen ImageNet lite0, a few steps)."""
    running = Server(real_checkpoint, tmp_path_factory.mktemp("real_serve_log") / "server.log", "topk=2")
    yield running
    running.close()


@pytest.mark.realdata
def test_page_in_headless_chromium_shows_the_right_label(real_server, real_checkpoint, real_data, images, tmp_path):
    chromium = _chromium()
    from hymtl.inference import load_predictor, predict

    # a real bee photo that the model (and so hymtl.predict) gets right
    bees = sorted((real_data / "val" / "bees").glob("*.jpg"))[:12]
    result = predict(load_predictor(real_checkpoint, precision="auto"), [str(p) for p in bees], topk=2,
                     batch_size=1, num_workers=0)
    right = [p for p in result.predictions if p.top[0][0] == "bees"]
    assert right, [p.top for p in result.predictions]
    photo, top = Path(right[0].path), [label for label, _ in right[0].top]
    process, websocket_url = _open_chromium(chromium, tmp_path / "profile")
    devtools = DevTools(websocket_url)
    try:
        devtools.call("Page.enable")
        devtools.call("Page.navigate", url=real_server.url + "/")
        _wait_for(devtools, "document.readyState === 'complete' && document.getElementById('file') !== null")
        _wait_for(devtools, "document.getElementById('model').textContent.includes('sha256')")
        document = devtools.call("DOM.getDocument")
        node = devtools.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
        devtools.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(photo)])
        labels = _wait_for(devtools, "Array.from(document.querySelectorAll('#result .row'))"
                                     ".map(r => r.dataset.label + ' ' + r.querySelector('.pct').textContent)")
        status = devtools.evaluate("document.getElementById('status').textContent")
        assert [label.split()[0] for label in labels] == top == ["bees", "ants"], labels
        assert status == f"{photo.name}: bees"
        shot = tmp_path / "serve_page.png"
        shot.write_bytes(base64.b64decode(devtools.call("Page.captureScreenshot", format="png")["data"]))
        image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
        assert image.size[0] >= 800
        # the bar of the best label is drawn: the page's green somewhere
        assert any(pixel == (0x22, 0xaa, 0x66) for _, pixel in image.getcolors(maxcolors=1 << 20) or [])
        if os.environ.get("HYMTL_SCREENSHOT_DIR"):  # to look at it
            shutil.copy(shot, Path(os.environ["HYMTL_SCREENSHOT_DIR"]) / "serve_page.png")
        # a bad file shows its reason in the page, and the server goes on
        devtools.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(images["bad_text"])])
        _wait_for(devtools, "document.getElementById('status').className === 'error'")
        assert "not an image" in devtools.evaluate("document.getElementById('status').textContent")
    finally:
        devtools.close()
        stop_process(process, timeout=30)
