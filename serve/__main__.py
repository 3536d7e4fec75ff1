"""Start the Serve application on an embedded local Ray:

    python -m serve --checkpoint CKPT [--checkpoint name=CKPT ...] [--index DIR] [--index-images TSV]
                    [--host 127.0.0.1] [--port 8000] [--torch-threads N] [--no-direct-ingress]

CKPT is anything clip_models.load accepts; several are multiplexed over the Encoder replicas
and chosen per request with "model". Binds 127.0.0.1 unless told otherwise. With Serve's direct
ingress (the default when this starts its own Ray) the Gateway replica also serves HTTP on a
port of its own, printed at start: the faster address, without the proxy hop.
"""
from __future__ import annotations

import argparse
import time

from clip_platform import cli


def parse_checkpoints(values: list[str]) -> dict[str, str]:
    """["ckpt.pt", "muge=other.pt"] -> {"default": "ckpt.pt", "muge": "other.pt"}."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        out[name if sep else ("default" if "default" not in out else f"model{len(out)}")] = path if sep else value
    return out


def main(argv=None) -> None:
    import ray
    from ray import serve

    from serve.app import ServeConfig, build_app, enable_direct_ingress, gateway_urls

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="[name=]checkpoint; repeat for more")
    parser.add_argument("--index", help="image features from jobs/embed.py for POST /search")
    parser.add_argument("--index-metadata", help="JSONL of {image_id, ...} returned with search hits")
    parser.add_argument("--index-images", help="cn_clip {split}_imgs.tsv: the web page shows the hits' images")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--max-models-per-replica", type=int, default=ServeConfig.max_models_per_replica,
                        help="checkpoints one Encoder replica keeps loaded (least recently used go first)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads per Encoder replica (0: one per reserved CPU); on a CPU-only "
                             "machine with one replica, give it the number of cores")
    parser.add_argument("--no-direct-ingress", dest="direct_ingress", action="store_false",
                        help="serve HTTP through Serve's proxy only (the Gateway replica opens no port of its own)")
    args = parser.parse_args(argv)
    config = ServeConfig(checkpoints=parse_checkpoints(args.checkpoint), index=args.index,
                         index_metadata=args.index_metadata, index_images=args.index_images,
                         max_replicas=args.max_replicas, max_models_per_replica=args.max_models_per_replica,
                         torch_threads=args.torch_threads)
    if args.direct_ingress:
        enable_direct_ingress()  # read by the Ray processes ray.init starts below
    ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name="clip", route_prefix="/")
    proxy = f"http://{args.host}:{args.port}"
    direct = [url for url in gateway_urls("clip", args.host, args.port) if url != proxy]
    print(f"serving {', '.join(config.checkpoints)} on {proxy} (docs at /docs)"
          + (f"; direct ingress, no proxy hop: {', '.join(direct)}" if direct else "") + "; Ctrl-C stops")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    cli.run(main)
