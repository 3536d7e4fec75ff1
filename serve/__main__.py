"""Start the Serve application on an embedded local Ray:

    python -m serve --checkpoint CKPT [--checkpoint name=CKPT ...] [--index DIR] [--index-images TSV]
                    [--host 127.0.0.1] [--port 8000] [--torch-threads N] [--no-direct-ingress]

CKPT is anything clip_models.load accepts; several are multiplexed over the Encoder replicas
and chosen per request with "model". Binds 127.0.0.1 unless told otherwise. With Serve's direct
ingress (the default when this starts its own Ray) the Gateway replica also serves HTTP on a
port of its own, printed at start: the faster address, without the proxy hop.
"""
from __future__ import annotations

import time

from clip_platform import cli, config


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
    from serve.config import check_inputs

    parser = config.parser(ServeConfig, __doc__)
    parser.add_argument("--checkpoint", action="append", required=True, help="[name=]checkpoint; repeat for more")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy (default: 8000)")
    parser.add_argument("--no-direct-ingress", dest="direct_ingress", action="store_false", default=True,
                        help="serve HTTP through Serve's proxy only (the Gateway replica opens no port of its own)")
    args = parser.parse_args(argv)
    serve_config = config.from_args(ServeConfig, args, {"checkpoints": parse_checkpoints(args.checkpoint)})
    check_inputs(serve_config)  # before Ray starts: a bad checkpoint or path is one line, exit 2
    if args.direct_ingress:
        enable_direct_ingress()  # read by the Ray processes ray.init starts below
    ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(serve_config), name="clip", route_prefix="/")
    proxy = f"http://{args.host}:{args.port}"
    direct = [url for url in gateway_urls("clip", args.host, args.port) if url != proxy]
    print(f"serving {', '.join(serve_config.checkpoints)} on {proxy} (docs at /docs)"
          + (f"; direct ingress, no proxy hop: {', '.join(direct)}" if direct else "") + "; Ctrl-C stops")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    cli.run(main)
