"""Released checkpoints: where they live and how they reach the local cache
(resumable download, size and optional sha256 verification, a clear offline message)."""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
_CN_CLIP_URL = "https://clip-cn-beijing.oss-cn-beijing.aliyuncs.com/checkpoints/"
_QA_CLIP_URL = "https://huggingface.co/TencentARC/QA-CLIP/resolve/main/"  # TencentARC's model card links


@dataclass(frozen=True)
class Release:
    url: str  # where the checkpoint file is published
    sha256: str | None = None  # verified when known; the publishers give none for these files

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


def default_cache_dir() -> Path:
    """cn_clip's cache, so files users already downloaded are found."""
    return Path(os.environ.get("CLIP_MODELS_CACHE", Path.home() / ".cache" / "clip"))


def fetch(name: str, download_root: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """Path of the released checkpoint `name` in the cache, downloading it if missing."""
    release = RELEASES[name]
    target = Path(download_root or default_cache_dir()) / release.filename
    if target.is_file():
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
    if release.sha256 and _sha256(partial) != release.sha256:
        partial.unlink()
        raise RuntimeError(f"{release.url} failed its sha256 check; the partial file was removed, try again")
    partial.rename(target)
    return target


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
