"""tome_plus's vLLM plugin behind vLLM's OpenAI-compatible server (`vllm serve`), on a tiny
random-weight LLaVA-1.5 (CLIP 64 px: 64 image tokens, 16 with keep=0.25), run in the vLLM
environment (`bash examples/vllm_serving/test.sh -k test_server`; skipped elsewhere).

One server with `--hf-overrides '{"tome_plus": ...}'` and one without (vLLM's own model), each a
subprocess on localhost started once for the module; requests go through the chat API with
images as base64 PNG data URLs, as users send them:

- 64 requests, images of mixed sizes (the processor resizes them to 64 x 64), some with two
  images, 8 at a time: every one answered, with the reduced count of placeholders;
- the same requests sent one at a time (caches reset) give the same token ids;
- a text-only request is answered; corrupt images, too many images, an image over vLLM's pixel
  limit and a decompression bomb get vLLM's own HTTP error, and the server goes on answering.
"""
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM tests run in vLLM's environment: bash examples/vllm_serving/test.sh")
requests = pytest.importorskip("requests")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402

SETTINGS = {"method": "tome", "keep": 0.25}
KEPT, FULL = 16, 64  # placeholders per image with SETTINGS / without
TEXT_TOKENS = 3  # "<s> wA wB" as the chat template renders a request
MAX_PIXELS = 4_000_000  # VLLM_MAX_IMAGE_PIXELS of the server (vLLM's default is ~179 M)
START_TIMEOUT = 240
SIZES = [(32, 48), (64, 64), (100, 60), (200, 200)]

VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")  # the `vllm` command of this environment

# plain text: "<s>", then every text part and "<image>" for every image part, space-separated
CHAT_TEMPLATE = ("<s>{% for message in messages %}{% if message['content'] is string %} {{ message['content'] }}"
                 "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}"
                 "{% else %} <image>{% endif %}{% endfor %}{% endif %}{% endfor %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` in its own process group, its log in a file."""

    def __init__(self, model, chat_template, log, settings=None, env=None):
        self.model, self.log, self.port = model, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [model, "--port", str(self.port), "--host", "127.0.0.1", "--enforce-eager", "--dtype", "float32",
                "--max-model-len", "256", "--limit-mm-per-prompt", json.dumps({"image": 2}), "--max-num-seqs", "8",
                "--chat-template", chat_template, "--seed", "0",
                # CPU: the KV cache's size, not a fraction of the machine's memory that other processes hold
                "--kv-cache-memory-bytes", str(128 << 20)]
        if settings is not None:
            args += ["--hf-overrides", json.dumps({"tome_plus": settings})]
        # the engine in a process of its own, as `vllm serve` runs it by default: the API server
        # (placeholder counts) and the engine (the reduction) each load the plugin
        environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                       "VLLM_SERVER_DEV_MODE": "1",  # /reset_prefix_cache, /reset_mm_cache, /reset_encoder_cache
                       **(env or {})}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([VLLM, "serve", *args], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment,
                                         start_new_session=True)
        self.started = time.monotonic()
        self.ready = None

    def tail(self, lines=60) -> str:
        try:
            with open(self.log, errors="replace") as f:
                text = [line for line in f if "Route:" not in line and '" 200 OK' not in line]
        except OSError:
            return "(no log)"
        return f"--- vllm serve log ({self.log}), last {lines} lines ---\n" + "".join(text[-lines:])

    def wait(self, timeout=START_TIMEOUT):
        """Block until /health answers 200 (once; the first failure is remembered)."""
        if self.ready is None:
            self.ready = self._wait(timeout)
        if self.ready is not True:
            pytest.fail(f"{self.ready}\n{self.tail()}", pytrace=False)
        return self

    def _wait(self, timeout):
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                return f"vllm serve exited with code {self.proc.returncode} before it was ready"
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(1)
        return f"vllm serve did not answer /health within {timeout} s"

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass

    def chat(self, parts, max_tokens=4, timeout=120):
        body = {"model": self.model, "messages": [{"role": "user", "content": parts}], "temperature": 0,
                "max_tokens": max_tokens, "return_token_ids": True,
                "ignore_eos": True}  # random weights: </s> may come first
        return requests.post(self.url + "/v1/chat/completions", json=body, timeout=timeout)

    def answer(self, parts, **kw):
        r = self.chat(parts, **kw)
        assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:500]}"
        j = r.json()
        choice = j["choices"][0]
        return {"text": choice["message"]["content"], "ids": choice["token_ids"],
                "prompt": j["usage"]["prompt_tokens"], "finish": choice["finish_reason"]}

    def reset_caches(self):
        for path in ("/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache"):
            requests.post(self.url + path, timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers start together (the imports overlap on the cores); each test waits for its own."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny.save_llava(str(root / "llava"))
    template = root / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    started = {"tome": Server(model, str(template), str(root / "tome.log"), SETTINGS,
                              env={"VLLM_MAX_IMAGE_PIXELS": str(MAX_PIXELS)}),
               "plain": Server(model, str(template), str(root / "plain.log"))}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def tome(servers):
    return servers["tome"].wait()


@pytest.fixture(scope="module")
def plain(servers):
    return servers["plain"].wait()


@pytest.fixture(autouse=True)
def log_on_failure(request, servers):
    """A failing test shows the servers' logs."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        for server in servers.values():
            if server.ready is not None and reporter is not None:
                reporter.write_line("\n" + server.tail())


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png(img) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A 1-bit black PNG of any size, written row by row (a 20000 x 20000 one is ~50 kB and never a
    raster here)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def image_part(png_bytes: bytes):
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes)}}


def request_parts(i: int):
    """Request i: two words, one image of SIZES[i % 4] (seed i); every fifth a second image."""
    w, h = SIZES[i % len(SIZES)]
    parts = [{"type": "text", "text": f"w{i % 150} w{(7 * i + 3) % 150}"}, image_part(png(tiny.image(w, h, i)))]
    if i % 5 == 0:
        parts.append(image_part(png(tiny.image(h, w, 1000 + i))))
    return parts


def images_in(parts):
    return sum(p["type"] == "image_url" for p in parts)


N, CONCURRENT, ALONE = 64, 8, 6


@pytest.fixture(scope="module")
def concurrent_answers(tome):
    requests_ = [request_parts(i) for i in range(N)]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda parts: tome.answer(parts), requests_))
    return requests_, answers


def test_concurrent_requests_with_mixed_image_sizes_are_all_answered(concurrent_answers):
    requests_, answers = concurrent_answers
    assert len(answers) == N
    for parts, a in zip(requests_, answers):
        assert a["finish"] == "length" and len(a["ids"]) == 4, a
        assert a["prompt"] == TEXT_TOKENS + KEPT * images_in(parts), a  # the reduced count, whatever the size
    assert len({tuple(a["ids"]) for a in answers}) > N // 2  # the answers depend on the request


def test_each_answer_equals_the_request_sent_alone(tome, concurrent_answers):
    requests_, answers = concurrent_answers
    tome.reset_caches()  # computed again: no prefix, processor or encoder cache from the batch
    picked = [0, 1, 10, 23, 42, 63]  # sizes 32x48, 64x64, 100x60, 200x200; two images in 0 and 10
    assert len(picked) == ALONE
    for i in picked:
        alone = tome.answer(requests_[i])
        assert (alone["ids"], alone["text"], alone["prompt"]) == (answers[i]["ids"], answers[i]["text"],
                                                                   answers[i]["prompt"]), i


def test_a_text_only_request_is_answered(tome):
    a = tome.answer([{"type": "text", "text": "w1 w2 w3"}])
    assert a["prompt"] == 4 and len(a["ids"]) == 4
    b = tome.answer("w1 w2 w3")  # content as a string
    assert b["ids"] == a["ids"]


def vllm_error(response):
    assert 400 <= response.status_code < 600, (response.status_code, response.text[:300])
    error = response.json()["error"]  # vLLM's own error body
    assert error["code"] == response.status_code
    return error["message"]


def still_serves(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    a = server.answer(request_parts(1))
    assert a["prompt"] == TEXT_TOKENS + KEPT and len(a["ids"]) == 4


@pytest.mark.parametrize("case", ["bad-base64", "not-an-image", "truncated-png", "empty", "three-images"])
def test_a_bad_image_gets_an_http_error_and_the_server_goes_on(tome, case):
    good = png(tiny.image(64, 64, 7))
    parts = {"bad-base64": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA!!notbase64"}}],
             "not-an-image": [image_part(b"these bytes are not an image")],
             "truncated-png": [image_part(good[:len(good) // 3])],
             "empty": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}],
             "three-images": [image_part(good)] * 3}[case]
    r = tome.chat([{"type": "text", "text": "w1"}, *parts])
    message = vllm_error(r)
    assert r.status_code == 400, message
    if case == "three-images":
        assert "At most 2 image(s)" in message
    still_serves(tome)


def test_an_image_over_the_pixel_limit_gets_an_http_error_and_the_server_goes_on(tome):
    message = vllm_error(tome.chat([image_part(blank_png(3000, 2000))]))  # 6 M pixels > VLLM_MAX_IMAGE_PIXELS
    assert f"maximum of {MAX_PIXELS} pixels" in message
    still_serves(tome)


def test_a_decompression_bomb_gets_an_http_error_and_the_server_goes_on(tome):
    bomb = blank_png(20000, 20000)  # 400 M pixels in ~50 kB
    assert len(bomb) < 100_000
    message = vllm_error(tome.chat([image_part(bomb)]))  # PIL's own check, before vLLM's: HTTP 500
    assert "pixels" in message
    still_serves(tome)


def test_a_large_image_under_the_limit_is_resized_and_answered(tome):
    a = tome.answer([{"type": "text", "text": "w1 w2"}, image_part(blank_png(1920, 1080))])
    assert a["prompt"] == TEXT_TOKENS + KEPT


def test_without_the_key_the_server_runs_vllms_own_model(plain, tome):
    a = plain.answer(request_parts(1))
    assert a["prompt"] == TEXT_TOKENS + FULL and len(a["ids"]) == 4
    text = [{"type": "text", "text": "w1 w2 w3"}]
    assert plain.answer(text) == tome.answer(text)  # no image: the same weights, the same answer


@pytest.mark.parametrize("shape", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_the_bench_script_runs_both_configurations(shape, tmp_path):
    """`examples/vllm_serving/bench.py` on a tiny shape, a handful of requests: both
    configurations run in their own processes and report, the patched prompt is the reduced one
    (its speed is the script's to print, not this test's to judge)."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "vllm_serving", "bench.py")
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, script, "--shape", shape, "--requests", "2", "--max-tokens", "2",
                           "--batch", "2", "--warmup", "1", "--latency-runs", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"unpatched", "method=tome,keep=0.25"}
    patched, unpatched = results["method=tome,keep=0.25"], results["unpatched"]
    assert unpatched["prompt_tokens"] - patched["prompt_tokens"] == 64 - 16  # one image, 64 tokens -> 16
    assert "/ unpatched" in done.stdout  # the ratio row
