"""Records/s from cn_clip datasets (LMDB, TSV + JSONL) to decoded, model-ready
arrays: Ray Data (`read_pairs` -> `DecodeStage`) against a single-process
Python loop doing what cn_clip's LMDBDataset does per record, on the same files.

    python benchmarks/read.py [--num-images 2000] [--resolution 256] [--image-size 224] [--num-cpus N]

Prints one line per format with both rates and their ratio. The data is the
synthetic dataset (written to a temporary directory, or --data-dir). The loop
runs torch with one thread by default, as a cn_clip DataLoader worker does and
as each Ray task does; on a shared machine, note the load average printed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import clip_models
from clip_platform.data import DecodeStage, SyntheticConfig, count_pairs, make_synthetic, read_pairs
from clip_platform.data import lmdb_io
from clip_platform.data.readers import split_files
from clip_platform.data.records import b64decode_image, parse_image_line, parse_text_line


def loop_lmdb(split_dir: Path, image_size: int, context_length: int) -> int:
    """cn_clip's LMDBDataset.__getitem__, record after record, in this process."""
    transform = clip_models.image_transform(image_size)
    done = 0
    for _, _, text, image in lmdb_io.iter_pairs(split_dir, 0, lmdb_io.num_samples(split_dir), []):
        transform(clip_models.decode_image(image))
        clip_models.tokenize([clip_models.preprocess_text(text)], context_length)
        done += 1
    return done


def loop_tsv(data_dir: Path, split: str, image_size: int, context_length: int) -> int:
    """The same from TSV + JSONL: texts indexed by image id, images streamed line by line."""
    transform = clip_models.image_transform(image_size)
    images_path, texts_path = split_files(data_dir, split)
    texts: dict[int, list[str]] = {}
    with open(texts_path, "rb") as lines:
        for line in lines:
            record = parse_text_line(line)
            for image_id in record.image_ids:
                texts.setdefault(image_id, []).append(record.text)
    done = 0
    with open(images_path, "rb") as lines:
        for line in lines:
            image_id, b64 = parse_image_line(line)
            for text in texts.get(image_id, []):
                transform(clip_models.decode_image(b64decode_image(b64)))
                clip_models.tokenize([clip_models.preprocess_text(text)], context_length)
                done += 1
    return done


def through_ray(dataset, image_size: int, context_length: int, batch_size: int | None) -> int:
    """Records through Ray; the stage ships uint8 pixels, normalised here so both sides
    end with the same float32 arrays."""
    ds = dataset.map_batches(DecodeStage(image_size, context_length), batch_format="numpy", batch_size=batch_size)
    done = 0
    for batch in ds.iter_torch_batches(batch_size=256):
        clip_models.normalize_pixels(batch["image"])
        done += len(batch["image_id"])
    return done


def rate(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    records = fn(*args)
    return records / (time.perf_counter() - start), records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=256, help="stored image side")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (decode + resize to this)")
    parser.add_argument("--context-length", type=int, default=52)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="map_batches batch size (default: none, so Ray fuses decoding into the read tasks)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--loop-threads", type=int, default=1,
                        help="torch threads of the loop (1: one core, as a cn_clip DataLoader worker; Ray tasks "
                             "also run one thread each)")
    parser.add_argument("--data-dir", default=None, help="reuse/write the synthetic dataset here")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(args.loop_threads)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="read_bench_"))
    if not (data_dir / "lmdb" / "train").exists():
        make_synthetic(SyntheticConfig(str(data_dir), num_train=args.num_images, num_valid=16, num_test=0,
                                       resolution=args.resolution, lmdb=True, zeroshot_per_class=0))
    num_pairs = count_pairs(data_dir / "lmdb" / "train")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    print(f"{num_pairs} pairs of {args.resolution}px JPEGs -> image [3,{args.image_size},{args.image_size}] "
          f"+ tokens [{args.context_length}]; Ray: {args.num_cpus} CPUs; loop: one process, "
          f"{torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f} before the runs")
    split_dir = data_dir / "lmdb" / "train"
    cases = [
        ("LMDB", (loop_lmdb, split_dir, args.image_size, args.context_length),
         lambda: read_pairs(split_dir)),
        ("TSV+JSONL", (loop_tsv, data_dir, "train", args.image_size, args.context_length),
         lambda: read_pairs(data_dir, "train")),
    ]
    for name, loop_args, make_dataset in cases:
        # An untimed pass first: every worker imports torch and loads the tokenizer once.
        through_ray(make_dataset(), args.image_size, args.context_length, args.batch_size)
        loop_rate, loop_records = rate(*loop_args)
        ray_rate, ray_records = rate(through_ray, make_dataset(), args.image_size, args.context_length,
                                     args.batch_size)
        assert loop_records == ray_records == num_pairs, (loop_records, ray_records, num_pairs)
        print(f"{name:10s} loop {loop_rate:8.1f} records/s | Ray Data {ray_rate:8.1f} records/s | "
              f"ratio {ray_rate / loop_rate:5.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
