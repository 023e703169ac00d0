"""The runtime installs light: `pip install '.[serve]'` into a clean venv (no torch, NNCF, DVC or transformers
there), then `soprano-onnx speak` from a release bundle and `soprano-onnx serve --model BUNDLE` answers a
speech request and serves its web page. Needs PyPI (CI has it); the install time and the venv's size are printed (-s to see them)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline_lib import certificate, registry

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
HEAVY = ("torch", "nncf", "dvc", "transformers", "openvino")
# The venv's processes see only what it installed: no PYTHONPATH pointing at a source tree.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def light_venv(module_tmp):
    venv = module_tmp.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    src = module_tmp.mktemp("src") / "soprano-onnx"  # a clean source tree: no build leftovers of ours
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file() and not name.startswith(("metrics/", "reports/")):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, src / name)
    start = time.perf_counter()
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{src}[serve]"], capture_output=True, text=True,
                          timeout=1200, env=ENV)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    size = subprocess.run(["du", "-sh", str(venv)], capture_output=True, text=True).stdout.split()[0]
    print(f"light install: pip install '.[serve]' took {seconds:.0f} s; venv {size}")
    return venv


@pytest.fixture(scope="module")
def bundle(tiny_export, module_tmp):
    """A release bundle of the tiny export (onnx-fp32), with a stand-in certificate."""
    from pipeline_lib.release import build_bundle

    tmp = module_tmp.mktemp("bundle")
    root = tmp / "artifacts"
    for which in (registry.LM_DIR, registry.DECODER_DIR):
        shutil.copytree(tiny_export, root / "onnx/fp32" / which)
    t = registry.choice("onnx-fp32").lm
    certificate.write(root / "onnx/fp32", certificate.build(
        t, {"name": "tiny", "source": "random", "random_weights": True}, certificate.model_files(root / "onnx/fp32"),
        reference="test", limits={}, metrics={}))
    return build_bundle(root, ["onnx-fp32"], tmp / "bundle", "onnx-fp32")


def test_no_heavy_package_is_importable(light_venv):
    code = ("import importlib.util, json, sys; print(json.dumps({m: importlib.util.find_spec(m) is not None "
            "for m in sys.argv[1:]}))")
    found = json.loads(subprocess.run([str(light_venv / "bin/python"), "-c", code, *HEAVY], capture_output=True,
                                      text=True, check=True, env=ENV).stdout)
    assert found == {m: False for m in HEAVY}, found
    proc = subprocess.run([str(light_venv / "bin/python"), "-c", "import torch"], capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


def test_speak_and_serve_a_bundle(light_venv, bundle, tmp_path):
    exe = str(light_venv / "bin/soprano-onnx")
    wav = tmp_path / "hello.wav"
    proc = subprocess.run([exe, "speak", "Hello there.", "-o", str(wav), "--model", str(bundle), "--max-new-tokens", "16"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wav.read_bytes()[:4] == b"RIFF" and wav.stat().st_size > 2000

    port = _free_port()
    server = subprocess.Popen([exe, "serve", "--model", str(bundle), "--port", str(port)], cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)
        body = json.dumps({"model": "soprano", "input": "Hello there.", "voice": "soprano", "response_format": "wav",
                           "max_new_tokens": 16}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/speech", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            audio = r.read()
            assert r.status == 200
        assert audio[:4] == b"RIFF" and len(audio) > 2000
        # the web page is package data: it must be in the installed package, not only in the source tree
        for path, kind in (("/", "text/html"), ("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
                assert r.status == 200 and kind in r.headers["content-type"], (path, r.headers["content-type"])
    finally:
        server.terminate()  # the server this test started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
