"""The server's OpenAPI document, checked by a tool nobody here wrote: schemathesis (4.x, its CLI)
generates requests from GET /openapi.json against a live server on the tiny checkpoint and checks
every response against the document (no 5xx; status codes, content types, headers and JSON bodies
as documented). Any finding fails the test.

Bounded: the server caps max_new_tokens at 8 and input at 40 characters (both in the document, so
schemathesis generates within them), each operation gets at most MAX_EXAMPLES generated cases and
the run a wall-clock limit. The server's own counters say what was generated: at least 200
requests, and at least 20 speech requests that synthesised audio (soprano_tokens_total grows).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from test_server import running, wait_ready  # noqa: E402

from pipeline_lib.server.app import create_app  # noqa: E402
from pipeline_lib.server.settings import Settings  # noqa: E402

MAX_EXAMPLES = 60
RUN_LIMIT_S = 240
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance")


def _schemathesis() -> str:
    exe = Path(sys.executable).with_name("schemathesis")
    return str(exe) if exe.is_file() else (shutil.which("schemathesis") or pytest.skip("no schemathesis CLI"))


def counters(url: str) -> dict[str, float]:
    """soprano_http_requests_total by (route, code), /metrics itself left out, and soprano_tokens_total."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.match(r'soprano_http_requests_total\{code="(\d+)",route="([^"]*)"\} (\S+)', line)
        if m and m.group(2) != "/metrics":
            out[f"{m.group(2)} {m.group(1)}"] = float(m.group(3))
        elif line.startswith("soprano_tokens_total "):
            out["tokens"] = float(line.split()[1])
    return out


@pytest.fixture(scope="module")
def url(tiny_export: Path) -> Iterator[str]:
    from pipeline_lib.runtime.tts import SopranoTTS

    tts = SopranoTTS.from_dir(tiny_export, num_threads=1)
    app = create_app(Settings(tts=tts, max_input_chars=40, max_new_tokens=8, max_queue=64))
    with running(app) as u:
        wait_ready(u)
        yield u


def test_schemathesis_finds_nothing_and_drives_real_speech(url: str, tmp_path: Path) -> None:
    before = counters(url)
    t0 = time.monotonic()
    proc = subprocess.run(
        [_schemathesis(), "run", f"{url}/openapi.json", "--checks", ",".join(CHECKS),
         "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES), "--seed", "20261207",
         "--workers", "1", "--request-timeout", "60", "--suppress-health-check", "all", "--no-color",
         "--generation-database", "none"],  # the same cases every run, nothing written to the repository
        capture_output=True, text=True, timeout=RUN_LIMIT_S, cwd=tmp_path,
    )
    elapsed = time.monotonic() - t0
    after = counters(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    requests = sum(v for k, v in delta.items() if k != "tokens")
    speech_ok = delta.get("/v1/audio/speech 200", 0.0)
    report = (f"schemathesis exit {proc.returncode} in {elapsed:.0f} s; server saw {requests:.0f} requests, "
              f"{speech_ok:.0f} speech 200s, {delta.get('tokens', 0):.0f} tokens; by route/status: "
              f"{ {k: v for k, v in delta.items() if v} }\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
    print(report)
    assert proc.returncode == 0, report
    assert requests >= 200, report
    assert speech_ok >= 20, report
    assert delta.get("tokens", 0.0) >= speech_ok, report  # each of them made audio tokens
    assert not [k for k, v in delta.items() if v and k.split()[-1].startswith("5")], report
