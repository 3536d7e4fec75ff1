"""Start the Serve application on an embedded local Ray:

    python -m serve --checkpoint CKPT [--checkpoint name=CKPT ...] [--index DIR] [--host 127.0.0.1] [--port 8000]

CKPT is anything clip_models.load accepts. Binds 127.0.0.1 unless told otherwise.
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

    from serve.app import ServeConfig, build_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="[name=]checkpoint; repeat for more")
    parser.add_argument("--index", help="image features from jobs/embed.py for POST /search")
    parser.add_argument("--index-metadata", help="JSONL of {image_id, ...} returned with search hits")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-replicas", type=int, default=2)
    args = parser.parse_args(argv)
    config = ServeConfig(checkpoints=parse_checkpoints(args.checkpoint), index=args.index,
                         index_metadata=args.index_metadata, max_replicas=args.max_replicas)
    ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name="clip", route_prefix="/")
    print(f"serving {', '.join(config.checkpoints)} on http://{args.host}:{args.port} (docs at /docs); Ctrl-C stops")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    cli.run(main)
