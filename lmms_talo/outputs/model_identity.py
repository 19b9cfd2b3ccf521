"""What a probe answer was computed with, down to every weight: the model's files, the code and the
libraries that turn a request into an answer, and the device that ran it.

The probe store reuses stored answers under this identity, so it must change whenever an answer
could: a checkpoint folder retrained or edited in place (a projector stage, a LoRA merge, a hub
update), a chat template, tokenizer or processor file, a source install of lmms-talo or of the
harness, a library that preprocesses images or text, another GPU or CPU model.

Weights are identified by their files' content. A file in a Hugging Face hub snapshot is a link to
a blob named by its own SHA-256 (for LFS files), so it costs nothing to identify. Any other file is
hashed once and remembered by (path, size, mtime, ctime, inode) in `file_hashes.json` under the lmms-talo cache,
so a 15 GB checkpoint is read once, not once per run. A model with no files behind it (built in
memory) is identified by a digest of every parameter and buffer.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

# Files of a checkpoint folder that cannot change an answer.
# (.txt files count: merges.txt and vocab.txt are tokenizers.)
IGNORED_FILES = re.compile(r"(^|/)(\.|README|LICENSE|NOTICE|USE_POLICY)|\.(md|png|jpe?g|gif)$", re.IGNORECASE)
HUB_BLOB = re.compile(r"^[0-9a-f]{64}$")  # an LFS blob's name is its SHA-256
CHUNK = 1 << 24

# Libraries whose releases can change an answer or its score, beside the harness.
KEYED_LIBRARIES = (
    "lmms-talo",
    "transformers",
    "torch",
    "torchvision",
    "tokenizers",
    "pillow",
    "accelerate",
    "numpy",
    "qwen-vl-utils",
    "flash-attn",
)


def cache_root() -> Path:
    """The lmms-talo cache: LMMS_TALO_CACHE, else $XDG_CACHE_HOME/lmms_talo (~/.cache/lmms_talo)."""
    explicit = os.environ.get("LMMS_TALO_CACHE")
    return Path(explicit) if explicit else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmms_talo"


class FileHasher:
    """SHA-256 of files, remembered by (resolved path, size, mtime, ctime, inode) in a JSON file; `bytes_read`
    counts what this instance actually read (0 when every file was known)."""

    def __init__(self, cache: Path | None = None):
        self.cache = cache or cache_root() / "file_hashes.json"
        self.bytes_read = 0
        self._known: dict[str, str] | None = None
        self._new: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        if self._known is None:
            try:
                self._known = json.loads(self.cache.read_text())
            except (OSError, ValueError):
                self._known = {}
        return self._known

    @staticmethod
    def _key(path: Path) -> str:
        stat = path.stat()  # ctime and inode too: an in-place edit within mtime's resolution still shows
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"

    def digest(self, path: Path) -> str:
        target = Path(os.path.realpath(path))
        if HUB_BLOB.match(target.name) and target.parent.name == "blobs":
            return target.name
        key = self._key(target)
        known = self._load().get(key) or self._new.get(key)
        if known:
            return known
        sha = hashlib.sha256()
        with open(target, "rb") as handle:
            while chunk := handle.read(CHUNK):
                sha.update(chunk)
                self.bytes_read += len(chunk)
        self._new[key] = sha.hexdigest()
        return self._new[key]

    def save(self) -> None:
        """Add this instance's new hashes to the cache file (merged under a lock with other processes')."""
        if not self._new:
            return
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.cache) + ".lock"):
                try:
                    merged = json.loads(self.cache.read_text())
                except (OSError, ValueError):
                    merged = {}
                merged.update(self._new)
                tmp = self.cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(merged))
                tmp.replace(self.cache)
        except OSError:
            return  # a read-only cache costs a re-hash next time, never a wrong identity


def checkpoint_folder(name_or_path: str) -> Path | None:
    """The folder the model was loaded from: a local path, or the hub cache's snapshot of a hub id."""
    if name_or_path and Path(name_or_path).is_dir():
        return Path(name_or_path)
    if not name_or_path:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not in the hub cache, or not a hub id
        return None


def folder_digest(folder: Path, hasher: FileHasher) -> dict[str, str]:
    """file name -> content SHA-256 of every file of the folder that can change an answer: weights,
    config, tokenizer and processor files, chat template, generation config, remote code. Subfolders
    are not read: a checkpoint's files lie at its top (training folders often keep others below)."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not IGNORED_FILES.search(path.name):
            files[path.name] = hasher.digest(path)
    return files


def tensors_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, by name: for a model with no files behind it."""
    sha = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        sha.update(name.encode())
        sha.update(str(tensor.dtype).encode())
        if tensor.device.type == "meta":  # offloaded without files: its shape is all there is
            sha.update(str(tuple(tensor.shape)).encode())
            continue
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def weights_identity(model: torch.nn.Module, hasher: FileHasher | None = None) -> dict:
    """{"source": "files", "folder", "files": {path: sha256}} for a model loaded from a folder or the
    hub cache, else {"source": "tensors", "sha256"}. A model edited after loading (weights changed in
    memory) is the caller's to identify by tensors."""
    hasher = hasher or FileHasher()
    folder = checkpoint_folder(getattr(model.config, "_name_or_path", "") or "")
    if folder is not None:
        files = folder_digest(folder, hasher)
        if any(name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) for name in files):
            hasher.save()
            return {"source": "files", "folder": str(folder), "files": files}
    return {"source": "tensors", "sha256": tensors_digest(model)}


def device_models(model: torch.nn.Module) -> list[str]:
    """The processor models the parameters live on: a GPU's name, or the CPU's (numerics differ by kernel)."""
    names = set()
    for device in {p.device for p in model.parameters()}:
        if device.type == "cuda":
            names.add(f"cuda: {torch.cuda.get_device_name(device)}")
        else:
            names.add(f"{device.type}: {cpu_model()}" if device.type == "cpu" else device.type)
    return sorted(names)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _is_local_install(dist: metadata.Distribution) -> bool:
    """An editable or source-folder install: its version string does not change with its code."""
    text = dist.read_text("direct_url.json")
    return bool(text) and "dir_info" in json.loads(text)


@functools.cache
def source_digest(distribution: str) -> str | None:
    """A digest of an installed distribution's own Python, YAML and template files: the version of a
    source install (lmms-talo always, any keyed library installed from a folder or editable)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    roots = []
    for name in (dist.read_text("top_level.txt") or distribution.replace("-", "_")).split():
        spec = importlib.util.find_spec(name)
        if spec is not None:
            roots += [Path(p) for p in spec.submodule_search_locations or []] or [Path(spec.origin)]
    sha = hashlib.sha256()
    for root in sorted(set(roots)):
        paths = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in paths:
            if path.suffix in (".py", ".yaml", ".jinja") and path.is_file() and "__pycache__" not in path.parts:
                sha.update(path.name.encode() if root == path else path.relative_to(root).as_posix().encode())
                sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def library_versions(harness: str | None) -> dict:
    """The installed releases whose changes can change an answer or its score; lmms-talo's and any
    source install's with a digest of its code (`name@source`)."""
    versions: dict[str, Any] = {}
    for name in (*KEYED_LIBRARIES, *([harness] if harness else [])):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
            continue
        versions[name] = dist.version
        if name == "lmms-talo" or _is_local_install(dist):
            versions[f"{name}@source"] = source_digest(name)
    return versions
