"""Every CLI command with bad input: one `error:` line naming the problem, a non-zero exit, and never
a Python traceback. Each case runs `python -m pipeline_lib.cli` in a fresh process, in a scratch
folder holding an empty folder (`emptydir`), a file that is not UTF-8 (`bad.txt`) and the tiny
export (`{M}`) and checkpoint (`{C}`). Paths under /sys cannot be created even by root, whom
`os.access` lets through: the commands must find that out before the work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# /sys refused: root passes os.access and finds out by creating a file; any other user is told by os.access.
UNWRITABLE_SYS = ("cannot create a file in /sys", "/sys is not writable")

# (command line, a piece of the error it must print, or a tuple of pieces one of which it must print)
CASES: list[tuple[str, str | tuple[str, ...]]] = [
    # speak
    ("speak Hi. -o /sys/out.wav --model {M}", UNWRITABLE_SYS),
    ("speak Hi. -o out.mp4 --model {M}", "extension '.mp4'"),
    ("speak Hi. -o out --model {M}", "extension '(none)'"),
    ("speak Hi. -o /nonexistent/dir/out.wav --model {M}", "mkdir -p /nonexistent/dir"),
    ("speak Hi. -o emptydir.wav --model {M}", "is a folder"),
    ("speak Hi. -o out.wav --model /nonexistent", "model folder not found"),
    ("speak Hi. -o out.wav --model emptydir", "LM step model not found"),
    ("speak -o out.wav --model {M} --text-file /nonexistent.txt", "cannot read the text file"),
    ("speak -o out.wav --model {M} --text-file bad.txt", "not valid UTF-8"),
    ("speak -o out.wav --model {M}", "no text"),
    ("speak '' -o out.wav --model {M}", "text is empty"),
    ("speak Hi. -o out.wav --model {M} --threads 0", "--threads"),
    ("speak Hi. -o out.wav --model {M} --max-new-tokens 100000", "max_new_tokens"),
    ("speak Hi. -o out.wav --model {M} --max-new-tokens 1", "no audio"),
    ("speak Hi. -o out.wav --model {M} --temperature -1", "temperature"),
    ("speak Hi. -o out.wav --model {M} --top-p nan", "top_p"),
    ("speak Hi. -o out.wav --model {M} --seed -1", "seed"),
    ("speak Hi. -o out.wav --model {M} --precision bogus", "bogus"),
    ("speak Hi. -o out.wav --model {M} --stream --chunk-size 0", "--chunk-size"),
    ("speak Hi. -o out.wav --model {M} --objective stream", "--objective"),
    # serve
    ("serve --model {M} --port 70000", "--port"),
    ("serve --model {M} --port -1", "--port"),
    ("serve --model {M} --port abc", "--port"),
    ("serve --model {M} --port {BUSY}", "cannot listen"),
    ("serve --model {M} --host no.such.host.invalid --port {FREE}", "cannot listen"),
    ("serve --model /nonexistent", "model folder not found"),
    ("serve --model emptydir --port {FREE}", "the model failed to load"),
    ("serve --model {M} --threads 0", "--threads"),
    ("serve --model {M} --max-queue 0", "--max-queue"),
    ("serve --model {M} --max-new-tokens 513", "--max-new-tokens"),
    ("serve --model {M} --drain-seconds -1", "--drain-seconds"),
    ("serve --model {M} --backend openvino --precision onnx-int8", "--precision"),
    # export
    ("export --checkpoint /nonexistent --out x", "not a directory"),
    ("export --checkpoint a/b/c --out x", "not a directory"),
    ("export --checkpoint emptydir --out x", "config.json"),
    ("export --checkpoint {C} --out /sys/x", UNWRITABLE_SYS),
    ("export --checkpoint {C} --out bad.txt", "not a folder"),
    ("export --checkpoint {C} --out x --opset 5", "--opset"),
    # convert
    ("convert --export /nonexistent --backend onnx --precision int8 --out x", "does not exist"),
    ("convert --export {M} --backend cuda --precision int8 --out x", "unknown backend"),
    ("convert --export {M} --backend onnx --precision int3 --out x", "unknown precision"),
    ("convert --export {M} --backend onnx --precision int8 --out /sys/x", UNWRITABLE_SYS),
    ("convert --export {M} --backend onnx --precision int8 --out {M}/sub", "inside the export folder"),
    ("convert --export emptydir --backend onnx --precision int8 --out x", "export config not found"),
    ("convert --export {M} --backend openvino --precision int8 --out x --checkpoint /nonexistent", "--checkpoint"),
    # bench
    ("bench --backend onnx", "needs --lm"),
    ("bench --backend onnx --lm {M}", "needs --decoder"),
    ("bench --backend onnx --lm /nonexistent --decoder /nonexistent", "/nonexistent"),
    ("bench --backend onnx --lm {M} --decoder {M} --num-threads 0", "--threads"),
    ("bench --backend onnx --lm {M} --decoder {M} --num-tokens 0", "--num_tokens"),
    ("bench --backend onnx --lm {M} --decoder {M} --repeats 0", "--repeats"),
    ("bench --backend onnx --lm {M} --decoder {M} --json /sys/x.json", UNWRITABLE_SYS),
    ("bench --backend onnx --lm {M} --decoder {M} --json emptydir", "is a folder"),
    ("bench --backend torch --lm /nonexistent", "config.json"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scratch(module_tmp) -> Path:
    d = module_tmp.mktemp("cli")
    (d / "emptydir").mkdir()
    (d / "emptydir.wav").mkdir()
    (d / "bad.txt").write_bytes(b"\xff\xfe")
    return d


@pytest.mark.parametrize("line, wanted", CASES, ids=[c[0].replace(" ", "_")[:80] for c in CASES])
def test_bad_input_is_one_error_line_without_traceback(line: str, wanted: str | tuple[str, ...], scratch: Path, tiny_export: Path,
                                                       tiny_checkpoint: Path) -> None:
    import shlex

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = shlex.split(line.format(M=tiny_export, C=tiny_checkpoint, BUSY=busy.getsockname()[1], FREE=_free_port()))
        proc = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", *argv], cwd=scratch, capture_output=True,
                              text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    assert any(w in errors[0] for w in ((wanted,) if isinstance(wanted, str) else wanted)), proc.stderr
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in scratch.iterdir()), "a temporary file was left"


# A runtime-only install (`pip install .`) lacks the serve extra: the command says which package, no traceback.
BLOCK = "import sys; sys.modules.update({m: None for m in sys.argv[1].split(',')}); sys.argv[1:2] = []; " \
        "from pipeline_lib.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("blocked, line, wanted", [
    ("soundfile", "speak Hi. -o out.mp3 --model {M} --max-new-tokens 8", "'soundfile' is not installed"),
    ("av", "speak Hi. -o out.aac --model {M} --max-new-tokens 8", "'av' is not installed"),
    ("uvicorn", "serve --model {M} --port {FREE}", "'uvicorn' is not installed"),
], ids=["speak-mp3", "speak-aac", "serve"])
def test_a_missing_extra_is_one_error_line(blocked: str, line: str, wanted: str, scratch: Path,
                                           tiny_export: Path) -> None:
    import shlex

    argv = shlex.split(line.format(M=tiny_export, FREE=_free_port()))
    proc = subprocess.run([sys.executable, "-c", BLOCK, blocked, *argv], cwd=scratch, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and wanted in errors[0] and "[serve]" in errors[0], proc.stderr
    assert "wrote" not in proc.stdout and not list(scratch.glob("out.*"))
