"""Zero-shot classification during training (--zeroshot-data DIR --zeroshot-frequency N), as
open_clip's: the model being trained classifies an ELEVATER-layout folder (label_cn.txt,
test/<label id>/*) with the zero-shot job's classifier (encode/classifier.py: the Chinese prompt
set, cn_clip's fixed scale), and top-1/top-5 go to the log, metrics.jsonl, the curves and the
trackers.

Every worker classifies its share of the images (every world_size-th, in the folder's order)
and the counts are summed over the workers, so the figure is over the whole folder whatever
the number of workers. Images are read and decoded in the worker, in batches: the folder is
meant to be an evaluation set of thousands of images, not a corpus (use jobs/zeroshot.py
for that). Unreadable images are left out and counted, as the job does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..data import ImageFilesDatasource, read_labels, zeroshot_images
from ..encode.classifier import class_embeddings, decode_images, probabilities
from ..encode.templates import ZH_TEMPLATES


class ZeroShotEval:
    def __init__(self, data: str, rank: int, world_size: int, batch_size: int, context_length: int):
        self.classnames = read_labels(data)
        fs, root, infos = zeroshot_images(data, len(self.classnames))
        self.source = ImageFilesDatasource(fs, root, infos, labeled=True)
        self.paths = [info.path for info in infos][rank::world_size]
        self.num_images = len(infos)
        self.world_size = world_size
        self.batch_size = batch_size
        self.context_length = context_length

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """{"zeroshot_top1", "zeroshot_top5"} in percent over the folder's readable images, and
        "zeroshot_skipped" (unreadable ones)."""
        device = next(model.parameters()).device
        weights = class_embeddings(model, self.classnames, ZH_TEMPLATES, self.context_length)
        k = min(5, len(self.classnames))
        counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, images, skipped
        for start in range(0, len(self.paths), self.batch_size):
            bad = []
            rows = list(self.source.rows(self.paths[start:start + self.batch_size])(bad))
            counts[3] += len(bad)
            if not rows:
                continue
            names, labels, data = zip(*rows)
            batch = decode_images({"image_id": np.array(names, dtype=object), "label": np.array(labels),
                                   "image": np.array(data, dtype=object)}, model.image_size)
            ok = batch["ok"].astype(bool)
            counts[3] += int((~ok).sum())
            if not ok.any():
                continue
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).to(device)
            probs = probabilities(model.encode_image(images), weights)
            top = probs.topk(k, dim=1).indices.cpu()
            truth = torch.as_tensor(np.asarray(batch["label"])[ok].astype(np.int64))[:, None]
            counts[0] += (top[:, :1] == truth).any(dim=1).sum().item()
            counts[1] += (top == truth).any(dim=1).sum().item()
            counts[2] += len(truth)
        if self.world_size > 1:
            dist.all_reduce(counts)
        seen = max(counts[2].item(), 1.0)
        return {"zeroshot_top1": 100.0 * counts[0].item() / seen, "zeroshot_top5": 100.0 * counts[1].item() / seen,
                "zeroshot_skipped": int(counts[3].item())}
