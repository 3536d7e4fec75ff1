"""Released checkpoints: where they live, how a name or a path becomes a local file
(`resolve`, `available_models`), how they reach the local cache (resumable download, a
clear offline message) and stay intact there.

The publishers give no checksums, so nothing proves a first download is the published
file beyond its length matching the server's Content-Length. What is verified is that
the cached file stays the file first downloaded (or first found in the cache, e.g.
copied there by hand): its size and sha256 are recorded then in a sidecar
`<file>.sha256` (JSON: size, sha256, mtime_ns), and every later use checks the size
(a stat) and, when the size or the modification time differs from the record, the
sha256 (a full read, 2-3 s per GB on the 2-core development machine: too slow for every
worker's every load). A mismatch is an error telling the user to delete the file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger(__name__)
_CN_CLIP_URL = "https://clip-cn-beijing.oss-cn-beijing.aliyuncs.com/checkpoints/"
_QA_CLIP_URL = "https://huggingface.co/TencentARC/QA-CLIP/resolve/main/"  # TencentARC's model card links


@dataclass(frozen=True)
class Release:
    url: str  # where the checkpoint file is published (without a published checksum)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


RELEASES = {
    "ViT-B-16": Release(_CN_CLIP_URL + "clip_cn_vit-b-16.pt"),
    "ViT-L-14": Release(_CN_CLIP_URL + "clip_cn_vit-l-14.pt"),
    "ViT-L-14-336": Release(_CN_CLIP_URL + "clip_cn_vit-l-14-336.pt"),
    "ViT-H-14": Release(_CN_CLIP_URL + "clip_cn_vit-h-14.pt"),
    "RN50": Release(_CN_CLIP_URL + "clip_cn_rn50.pt"),
    # QA-CLIP: same architectures and checkpoint layout as cn_clip, other weights.
    "QA-CLIP-RN50": Release(_QA_CLIP_URL + "QA-CLIP-RN50.pt"),
    "QA-CLIP-ViT-B-16": Release(_QA_CLIP_URL + "QA-CLIP-base.pt"),
    "QA-CLIP-ViT-L-14": Release(_QA_CLIP_URL + "QA-CLIP-large.pt"),
}


def available_models() -> list[str]:
    """Names of the released models `load` can download."""
    return list(RELEASES)


def resolve(name_or_path: str | os.PathLike, download_root: str | os.PathLike | None = None) -> Path:
    """A local checkpoint path for a released model name (downloaded if needed) or an existing path."""
    if str(name_or_path) in RELEASES:
        return fetch(str(name_or_path), download_root)
    path = Path(name_or_path)
    if path.exists():
        return path
    raise CheckpointError(
        f"model {str(name_or_path)!r} not found: not a file or directory, and not a released model "
        f"({', '.join(available_models())})"
    )


def default_cache_dir() -> Path:
    """cn_clip's cache, so files users already downloaded are found."""
    return Path(os.environ.get("CLIP_MODELS_CACHE", Path.home() / ".cache" / "clip"))


def fetch(name: str, download_root: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """Path of the released checkpoint `name` in the cache, downloading it if missing."""
    release = RELEASES[name]
    target = Path(download_root or default_cache_dir()) / release.filename
    if target.is_file():
        verify_cached(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        _download(release.url, partial, timeout)
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(
            f"could not download {name} from {release.url} ({exc}). On a machine with network access run\n"
            f"  curl -L -C - -o {target} {release.url}\n"
            f"and copy the file to {target} here (or set CLIP_MODELS_CACHE, or pass the file's path to load())."
        ) from exc
    partial.rename(target)
    record(target)
    return target


def sidecar_path(target: Path) -> Path:
    """Where the size and sha256 of the cached `target` are recorded."""
    return target.with_name(target.name + ".sha256")


def record(target: Path) -> dict:
    """Record `target`'s size, sha256 and mtime next to it (best effort on a read-only cache)."""
    stat = target.stat()
    entry = {"size": stat.st_size, "sha256": _sha256(target), "mtime_ns": stat.st_mtime_ns}
    _write_sidecar(target, entry)
    return entry


def verify_cached(target: Path) -> None:
    """Check the cached `target` against its record: size always, sha256 when the size or
    mtime changed. A file without a record (copied into the cache by hand, or by cn_clip)
    gets one now."""
    sidecar = sidecar_path(target)
    if not sidecar.exists():
        log.info("recording the size and sha256 of %s in %s", target, sidecar.name)
        record(target)
        return
    try:
        entry = json.loads(sidecar.read_text())
        size, sha256, mtime_ns = int(entry["size"]), str(entry["sha256"]), int(entry["mtime_ns"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the checksum record {sidecar} ({exc}); delete it to record "
                              f"{target} afresh, or delete both to download again") from None
    stat = target.stat()
    if stat.st_size != size:
        _mismatch(target, f"{stat.st_size} bytes, {size} when first downloaded")
    if stat.st_mtime_ns != mtime_ns:
        if _sha256(target) != sha256:
            _mismatch(target, "its sha256 differs from the one recorded when it was first downloaded")
        _write_sidecar(target, {"size": size, "sha256": sha256, "mtime_ns": stat.st_mtime_ns})


def _mismatch(target: Path, what: str):
    raise CheckpointError(f"the cached checkpoint {target} has changed since it was downloaded ({what}): it is "
                          f"damaged or was replaced. Delete {target} and {sidecar_path(target).name} and load "
                          f"it again to download it afresh")


def _write_sidecar(target: Path, entry: dict) -> None:
    sidecar = sidecar_path(target)
    tmp = None
    try:  # a temporary file renamed over the record: workers sharing the cache never read half of one
        fd, tmp = tempfile.mkstemp(prefix=f".{sidecar.name}.", dir=target.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(entry, out)
        os.replace(tmp, sidecar)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log.warning("cannot record the sha256 of %s in %s (%s): it will not be verified", target, sidecar, exc)


def _download(url: str, partial: Path, timeout: float) -> None:
    """Download into `partial`, resuming from its current size with an HTTP Range request."""
    done = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if done and response.status != 206:  # server ignored the range: start over
            done = 0
        total = done + int(response.headers.get("Content-Length") or 0)
        with open(partial, "ab" if done else "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\r{partial.name}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="", file=sys.stderr)
    print(file=sys.stderr)
    if total and partial.stat().st_size != total:
        raise OSError(f"incomplete download: {partial.stat().st_size} of {total} bytes (rerun to resume)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
