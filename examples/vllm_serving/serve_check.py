"""Check that `vllm serve` picks up tome_plus: start the server with the `tome_plus` key (and,
with `--compare`, one without), send one chat request with an image as a base64 PNG data URL,
print the prompt tokens the server counted (the image's placeholders: the reduced count when
the plugin is active) and the answer, then stop the server(s).

    OMP_NUM_THREADS=1 .venv-vllm/bin/python examples/vllm_serving/serve_check.py --compare
    python examples/vllm_serving/serve_check.py --model llava-hf/llava-1.5-7b-hf --image-size 336x336 --compare
    python examples/vllm_serving/serve_check.py --model M --settings '{"method": "pitome", "keep": 0.5}' \\
        -- --tensor-parallel-size 2

Without `--model`, a tiny random-weight LLaVA-1.5 (tests/vllm_plugin/tiny.py) with a plain-text chat
template; arguments after `--` go to `vllm serve` as they are (the `vllm` command of this
python's environment). Exit status 0 when every server answered.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")  # the `vllm` command of this environment
TINY_TEMPLATE = ("<s>{% for message in messages %}{% if message['content'] is string %} {{ message['content'] }}"
                 "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}"
                 "{% else %} <image>{% endif %}{% endfor %}{% endif %}{% endfor %}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=300):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def healthy(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check(name, model, serve_args, image_url, text, log, timeout):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([VLLM, "serve", model, "--host", "127.0.0.1",
                                 "--port", str(port), *serve_args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    start = time.monotonic()
    try:
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() - start > timeout:
                why = f"exited ({proc.returncode})" if proc.poll() is not None else f"not ready in {timeout} s"
                with open(log, errors="replace") as f:
                    tail = "".join([line for line in f if "Route:" not in line][-30:])
                print(f"{name}: vllm serve {why}; {log}:\n{tail}")
                return False
            time.sleep(1)
        ready = time.monotonic() - start
        body = {"model": model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                          {"type": "text", "text": text}]}]}
        code, answer = post(url + "/v1/chat/completions", body)
        if code != 200:
            print(f"{name}: HTTP {code}: {answer}")
            return False
        print(f"{name}: ready in {ready:.0f} s; prompt tokens {answer['usage']['prompt_tokens']}; "
              f"answer {answer['choices'][0]['message']['content']!r}")
        return True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="folder or HF id (default: a tiny random LLaVA-1.5)")
    p.add_argument("--settings", type=json.loads, default={"method": "tome", "keep": 0.25})
    p.add_argument("--compare", action="store_true", help="also start a server without the key (vLLM's own)")
    p.add_argument("--image-size", default="200x120", help="WxH of the test image (noise)")
    p.add_argument("--text", help="the text part (default: 'w1 w2' for the tiny model, else a question)")
    p.add_argument("--timeout", type=int, default=600, help="seconds a server may take to start")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="tome_plus_serve_check_")
    serve_args = list(extra)
    if args.model is None:
        sys.path.insert(0, os.path.join(ROOT, "tests", "vllm_plugin"))
        import tiny
        model = tiny.save_llava(os.path.join(work, "tiny-llava"))
        template = os.path.join(work, "chat.jinja")
        with open(template, "w") as f:
            f.write(TINY_TEMPLATE)
        serve_args += ["--chat-template", template, "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
                       "--kv-cache-memory-bytes", str(128 << 20)]
        text = args.text or "w1 w2"
    else:
        model, text = args.model, args.text or "What is shown in this image?"
    import numpy as np
    from PIL import Image
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    ok = check(f"tome_plus {json.dumps(args.settings)}", model,
               serve_args + ["--hf-overrides", json.dumps({"tome_plus": args.settings})], image_url, text,
               os.path.join(work, "tome_plus.log"), args.timeout)
    if args.compare:
        ok &= check("unpatched", model, serve_args, image_url, text, os.path.join(work, "unpatched.log"), args.timeout)
    print(f"logs: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
