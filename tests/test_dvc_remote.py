"""DVC-tracked model folders, on the tiny checkpoint: `dvc repro` caches the checkpoint, export and target
folders (linked, not copied, from the cache), a forced rebuild leaves dvc.lock unchanged (byte-reproducible),
`dvc push` to a remote then `dvc pull` in a second clone restores them with a clean `dvc status`, and the
pulled folder speaks the same audio."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline_lib.config import compose

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TARGET = "parity_convert@onnx-int8"  # fetch, both exports, convert@onnx-int8 and its certificate
BUILT = ("artifacts/checkpoints/tiny", "artifacts/export/lm", "artifacts/export/decoder", "artifacts/onnx/int8/lm",
         "artifacts/onnx/int8/decoder", "artifacts/onnx/int8/certificate.json")


def _run(cmd, cwd, env, timeout=1800):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _git_commit(repo: Path, env: dict, message: str) -> None:
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo, env)


def _reflink_works(folder: Path) -> bool:
    a = folder / ".reflink-probe"
    a.write_bytes(b"x")
    try:
        return subprocess.run(["cp", "--reflink=always", str(a), str(a) + "2"], capture_output=True).returncode == 0
    finally:
        for p in (a, Path(str(a) + "2")):
            p.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def built(module_tmp, copy_repo):
    """A copy of the repository on the tiny checkpoint, with TARGET reproduced and dvc.lock committed."""
    dest = module_tmp.mktemp("dvc") / "repo"
    env = copy_repo(dest)
    conf = dest / "conf/config.yaml"
    conf.write_text(conf.read_text().replace("checkpoint: random-80m", "checkpoint: tiny"))
    parity = dest / "conf/parity/default.yaml"
    parity.write_text(re.sub(r"^(\s*)decode_steps: 64 ", r"\1decode_steps: 16 ", parity.read_text(), flags=re.M))
    (dest / "params.yaml").write_text(yaml.safe_dump(compose(conf_dir=dest / "conf"), sort_keys=False))
    (dest / "dvc.lock").unlink(missing_ok=True)  # the committed lock describes random-80m
    _run(["git", "init", "-q"], dest, env)
    _git_commit(dest, env, "clone")
    _run(["dvc", "repro", TARGET], dest, env)
    _git_commit(dest, env, "repro")
    return dest, env


def test_outs_are_cached_and_linked_not_copied(built):
    repo, _ = built
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o for st in lock["stages"].values() for o in st.get("outs", [])}
    for path in BUILT:
        assert path in outs and outs[path].get("md5"), f"{path}: not a cached out in dvc.lock"
        assert (repo / path).exists(), path
    if _reflink_works(repo):
        pytest.skip("this file system has reflinks: DVC links by reflink, which shares blocks but no inode")
    # The model files (what weighs) are the cache's own bytes. Tokenizer files copied beside several models
    # may stay copies: DVC moves one of identical files into the cache and leaves the others (3 MB each).
    models = [f for path in BUILT for f in (repo / path).rglob("*")
              if f.suffix in (".onnx", ".xml", ".bin", ".safetensors", ".pth")]
    assert len(models) >= 5, models
    for f in models:
        assert f.is_symlink() or f.stat().st_nlink > 1, f"{f}: a second copy of the cache, not a link"


def test_forced_rebuild_leaves_dvc_lock_unchanged(built):
    repo, env = built
    def artifact_hashes() -> dict[str, str]:  # metrics/ hold the timings and change: they are git's, not DVC's
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
                if o["path"].startswith("artifacts/")}

    before = artifact_hashes()
    assert set(BUILT) <= set(before)
    _run(["dvc", "repro", "-f", "-s", "fetch", "export_decoder", "export_lm", "convert@onnx-int8", TARGET], repo, env)
    assert artifact_hashes() == before


def test_push_then_pull_in_a_second_clone_speaks_the_same(built, tmp_path):
    from pipeline_lib.runtime.tts import SopranoTTS

    repo, env = built
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "--local", "-d", "tmp", str(remote)], repo, env)
    _run(["dvc", "push", TARGET, "--with-deps"], repo, env)
    assert any(remote.rglob("*")), "nothing pushed"
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "artifacts").exists()
    _run(["dvc", "remote", "add", "--local", "-d", "tmp", str(remote)], clone, env)
    _run(["dvc", "pull", TARGET, "--with-deps"], clone, env)
    status = _run(["dvc", "status", TARGET, "--with-deps"], clone, env)
    assert "up to date" in status, status
    for path in BUILT:
        assert (clone / path).exists(), path

    def speak(root: Path) -> np.ndarray:
        tts = SopranoTTS.from_dir(root / "artifacts/onnx/int8", num_threads=1, warm_up=False)
        return tts.synthesize("Hello there, this is a test.", max_new_tokens=24)["audio"]

    first, second = speak(repo), speak(clone)
    assert first.size > 0 and np.abs(first).max() > 0
    assert np.array_equal(first, second)


def test_exp_apply_restores_an_experiments_models(built):
    repo, env = built
    lm = repo / "artifacts/onnx/int8/lm/soprano_lm_step.onnx"
    base = lm.read_bytes()
    _run(["dvc", "exp", "run", "-n", "block64", "-S", "convert.onnx.int8.lm.block_size=64", "convert@onnx-int8"],
         repo, env)
    exp = lm.read_bytes()
    assert exp != base  # 8-bit blocks of 64 weights, not 128: another model
    _run(["git", "checkout", "--", "."], repo, env)
    _run(["dvc", "checkout", "convert@onnx-int8"], repo, env)
    assert lm.read_bytes() == base
    # The outs of stages this partial pipeline never ran are in no cache, so DVC reports them as missing
    # (exit 255) after restoring the rest; a full `dvc repro` caches every out.
    proc = subprocess.run(["dvc", "exp", "apply", "block64"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    missing = proc.stderr.split("missing", 1)[-1] if proc.returncode else ""
    assert not re.search(r"artifacts/(onnx/int8|export|checkpoints)", missing), proc.stderr[-3000:]
    assert lm.read_bytes() == exp  # from the cache: nothing was rebuilt
    _run(["git", "checkout", "--", "."], repo, env)
    _run(["dvc", "checkout", "convert@onnx-int8"], repo, env)
