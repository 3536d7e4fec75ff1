"""Training pairs/s from a dataset (cn_clip LMDB, webdataset tar shards) to decoded,
model-ready arrays, in the sample plan's shuffled order: the training read path (the data
plane's `open_pairs` -> `PlannedPairsDatasource` -> `SampleDecoder`, in Ray tasks) against
a single-process Python loop doing what cn_clip's LMDBDataset does per record, on the
same pairs.

    python benchmarks/read.py [--num-images 2000] [--resolution 256] [--image-size 224] [--num-cpus N]

Prints one line per format with both rates and their ratio. The data is the synthetic
dataset (written to a temporary directory, or --data-dir), and the same pairs written
as webdataset shards. The loop runs torch with one thread by default, as a cn_clip
DataLoader worker does and as each Ray task does; on a shared machine, note the load
average printed.
"""
from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

import clip_models
from clip_platform.data import SyntheticConfig, make_synthetic, open_pairs
from clip_platform.data import lmdb_io
from clip_platform.train.data import SampleDecoder, stream_batches


def loop(split_dir: Path, order: np.ndarray, image_size: int, context_length: int) -> int:
    """cn_clip's LMDBDataset.__getitem__, record after record in plan order, in this process."""
    transform = clip_models.image_transform(image_size)
    with lmdb_io.pair_reader(split_dir) as read:
        for index in order.tolist():
            _, _, text, image = read(index)
            transform(clip_models.decode_image(image))
            clip_models.tokenize([clip_models.preprocess_text(text)], context_length)
    return len(order)


def through_ray(path: str, order: np.ndarray, image_size: int, context_length: int, batch_size: int,
                concurrency: int) -> int:
    """The training stream; it ships uint8 pixels, normalised here so both sides end
    with the same float32 arrays."""
    import torch

    done = 0
    for batch in stream_batches(open_pairs(path), SampleDecoder(image_size, context_length), order, batch_size,
                                concurrency):
        clip_models.normalize_pixels(torch.from_numpy(batch["image"]))
        done += int(batch["valid"].sum())
    return done


def write_shards(split_dir: Path, out: Path, per_shard: int = 500) -> str:
    """The LMDB split's pairs as img2dataset-style tar shards; returns their brace pattern."""
    import io

    out.mkdir(parents=True, exist_ok=True)
    total = lmdb_io.num_samples(split_dir)
    with lmdb_io.pair_reader(split_dir) as read:
        for number, start in enumerate(range(0, total, per_shard)):
            with tarfile.open(out / f"{number:05d}.tar", "w") as tar:
                for index in range(start, min(total, start + per_shard)):
                    _, _, text, image = read(index)
                    for extension, data in (("jpg", image), ("txt", text.encode())):
                        info = tarfile.TarInfo(f"{index:09d}.{extension}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return f"{out}/{{00000..{number:05d}}}.tar"


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
    parser.add_argument("--batch-size", type=int, default=64, help="training micro-batch")
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
    split_dir = data_dir / "lmdb" / "train"
    if not split_dir.exists():
        make_synthetic(SyntheticConfig(str(data_dir), num_train=args.num_images, num_valid=16, num_test=0,
                                       resolution=args.resolution, lmdb=True, zeroshot_per_class=0))
    shards = write_shards(split_dir, data_dir / "shards")
    num_pairs = lmdb_io.num_samples(split_dir)
    order = np.random.default_rng(0).permutation(num_pairs)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)

    print(f"{num_pairs} pairs of {args.resolution}px JPEGs in a shuffled plan order -> image "
          f"[3,{args.image_size},{args.image_size}] + tokens [{args.context_length}]; Ray: {args.num_cpus} CPUs; "
          f"loop: one process, {torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f}")
    ray_args = (order, args.image_size, args.context_length, args.batch_size, args.num_cpus)
    for name, path in (("LMDB", str(split_dir)), ("webdataset", shards)):
        through_ray(path, order[:args.batch_size], *ray_args[1:])  # untimed: workers import torch once
        loop_rate, loop_records = rate(loop, split_dir, order, args.image_size, args.context_length)
        ray_rate, ray_records = rate(through_ray, path, *ray_args)
        assert loop_records == ray_records == num_pairs, (loop_records, ray_records, num_pairs)
        print(f"{name:10s} loop {loop_rate:8.1f} pairs/s | training stream {ray_rate:8.1f} pairs/s | "
              f"ratio {ray_rate / loop_rate:5.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
