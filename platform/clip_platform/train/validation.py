"""Validation during training, as cn_clip's: every worker evaluates its share of the
validation split (cn_clip's seeded, padded order), loss and accuracy are summed over the
workers, and text->image / image->text R@1/5/10 are taken over the gathered features with
the evaluate job's hit rule (index.recall.compute_recall). With --ema-decay the averaged
weights are validated too (ema_* metrics)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..index.recall import compute_recall
from .config import TrainConfig
from .data import SampleDecoder, open_pairs, stream_batches, to_device
from .engine import Engine, gather_objects
from .objective import contrastive
from .plan import Position, validation_indices
from .run_log import RunLogger


class Validation:
    """--val-data for one worker: `run` validates the weights as they are now."""

    def __init__(self, config: TrainConfig, engine: Engine, rank: int, world_size: int, logger: RunLogger):
        self.config = config
        self.engine = engine
        self.rank, self.world_size = rank, world_size
        self.logger = logger
        self.pairs = open_pairs(config.val_data)

    def run(self, position: Position, ema, bad_records: list[str]) -> dict[str, float]:
        """The validation metrics (and the EMA weights' as ema_*); bad records are appended to
        `bad_records`."""
        result = self._validate(position, bad_records)
        if ema is not None:
            with ema.applied(self.engine.module):
                averaged = self._validate(position, bad_records, log_line=False)
            result.update({f"ema_{key}": value for key, value in averaged.items() if key != "step"})
            self.logger.info("EMA weights: " + " | ".join(f"{key}: {value:.4f}" for key, value in averaged.items()
                                                          if key != "step"))
        return result

    def _validate(self, position: Position, bad_records: list[str], log_line: bool = True) -> dict[str, float]:
        config = self.config
        self.engine.train(False)
        indices = validation_indices(len(self.pairs), config.valid_batch_size, self.world_size, self.rank,
                                     config.seed)
        decoder = SampleDecoder(self.engine.module.image_size, config.context_length)
        sums, seen = torch.zeros(4, dtype=torch.float64), {}
        with torch.no_grad():
            for batch in stream_batches(self.pairs, decoder, indices, config.valid_batch_size,
                                        config.valid_num_workers):
                images, tokens, valid = to_device(batch, self.engine.device, bad_records)
                image_features, text_features, scale = self.engine.forward(images, tokens)
                loss, acc = contrastive(image_features.float(), text_features.float(), scale.float(), valid,
                                        aggregate=False, with_grad=False)
                n = int(valid.sum())
                sums += torch.tensor([loss.item() * n, acc["i2t"] * n, acc["t2i"] * n, n], dtype=torch.float64)
                for i in np.flatnonzero(batch["valid"]):
                    seen[int(batch["index"][i])] = (int(batch["image_id"][i]), int(batch["text_id"][i]),
                                                    image_features[i].float().cpu(), text_features[i].float().cpu())
        if self.world_size > 1:
            dist.all_reduce(sums)
        result = {"valid_loss": sums[0].item() / sums[3].item(), "valid_i2t_acc": sums[1].item() / sums[3].item(),
                  "valid_t2i_acc": sums[2].item() / sums[3].item()}
        result.update(retrieval_recall(gather_objects(seen)), step=position.global_step)
        if log_line:
            self.logger.validation_line(result, position, self.engine.module, config.valid_batch_size)
        return result


def retrieval_recall(samples: dict[int, tuple]) -> dict[str, float]:
    """Text->image and image->text R@1/5/10 (percent) over the unique validation texts and
    images: each query's top-10 against its ground truth, by the evaluate job's hit rule."""
    texts, images = {}, {}
    for image_id, text_id, image_feature, text_feature in samples.values():
        texts.setdefault(text_id, [text_feature, set()])[1].add(image_id)
        images.setdefault(image_id, [image_feature, set()])[1].add(text_id)
    text_ids, image_ids = list(texts), list(images)
    scores = torch.stack([texts[t][0] for t in text_ids]) @ torch.stack([images[i][0] for i in image_ids]).t()
    result = {}
    for name, matrix, rows, cols, truth in (("t2i", scores, text_ids, image_ids, texts),
                                            ("i2t", scores.t(), image_ids, text_ids, images)):
        top = matrix.topk(min(10, len(cols)), dim=1).indices.tolist()
        reference = {row: sorted(truth[row][1]) for row in rows}
        predictions = {row: [cols[j] for j in top[r]] for r, row in enumerate(rows)}
        recall = compute_recall(reference, predictions)
        for k, value in ((1, recall.r1), (5, recall.r5), (10, recall.r10)):
            result[f"valid_{name}_r{k}"] = value * 100
    # clip-pytorch's report names: "Text R Mean" retrieves texts (i2t), "Image R Mean" images (t2i)
    result["valid_text_r_mean"] = sum(result[f"valid_i2t_r{k}"] for k in (1, 5, 10)) / 3
    result["valid_image_r_mean"] = sum(result[f"valid_t2i_r{k}"] for k in (1, 5, 10)) / 3
    result["valid_mean_recall"] = (result["valid_text_r_mean"] + result["valid_image_r_mean"]) / 2
    return result
