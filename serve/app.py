"""The Ray Serve application: a FastAPI ingress (`Gateway`, gateway.py) in front of batched,
model-multiplexed replicas (the `Encoder` deployment, encoder.py), with an optional search index.

    python -m serve --checkpoint CKPT [--index DIR] [--host 127.0.0.1] [--port 8000]
    serve run serve/config.yaml          # import_path serve.app:app_builder

Several checkpoints are served side by side with Ray Serve model multiplexing: the Gateway
checks the request's `model` against the configured names and calls the Encoder with
`multiplexed_model_id=name`; Serve routes it to a replica that already holds that model,
and each replica keeps at most `max_models_per_replica` of them (LRU).

HTTP reaches the Gateway through Serve's proxy, or with Serve's direct ingress on
(`enable_direct_ingress`, the default of `python -m serve`) straight on the Gateway replica's own port.
This module builds the application; config.py holds its settings, schemas.py the request
bodies, images.py image decoding and the image store, search.py the index's search replicas,
limits.py the bounds on request bodies.
"""
from __future__ import annotations

import time

from . import _ray_compat
from .config import ServeConfig, check_inputs, index_model
from .encoder import EncoderDeployment
from .gateway import Gateway, api
from .search import SearchDeployment, shard_groups

__all__ = ["ServeConfig", "api", "app_builder", "build_app", "enable_direct_ingress", "gateway_urls"]


def build_app(config: ServeConfig):
    """The bound application: Gateway -> Encoder (and -> a Search deployment per group of index
    shards), with autoscaling and bounded queues. Raises ValueError for an index of another model."""
    # Clients are bounded at the Gateway; a request makes one Encoder call per max_batch_size
    # items, so the Encoder's queue is bounded by the Gateway's limits.
    logging_config = {"enable_access_log": config.access_log}
    # A fixed replica count needs no autoscaling metrics (they cost CPU at every request).
    replicas = {"num_replicas": config.min_replicas} if config.min_replicas == config.max_replicas else {
        "autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                               "target_ongoing_requests": config.target_ongoing_requests}}
    encoder = EncoderDeployment.options(
        ray_actor_options={"num_gpus": config.num_gpus, "num_cpus": config.num_cpus}, logging_config=logging_config,
        **replicas,
        max_ongoing_requests=max(config.max_ongoing_requests, 2 * config.max_batch_size), max_queued_requests=-1,
    ).bind(config)
    searchers = []
    if config.index and config.search_replicas:
        from clip_platform.index.search import read_manifest

        groups = shard_groups(len(read_manifest(config.index)["shards"]), config.search_groups)
        searchers = [SearchDeployment.options(name=f"Search{g}" if len(groups) > 1 else "Search",
                                    num_replicas=config.search_replicas, logging_config=logging_config,
                                    ray_actor_options={"num_cpus": config.search_cpus},
                                    max_ongoing_requests=config.max_ongoing_requests).bind(config.index, shards)
                     for g, shards in enumerate(groups)]
    return Gateway.options(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=config.max_ongoing_requests,
                           max_queued_requests=config.max_queued_requests, logging_config=logging_config,
                           ).bind(encoder, config, searchers, index_model(config))


def enable_direct_ingress() -> bool:
    """Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS, Ray 2.60): each Gateway replica
    serves HTTP itself on a port of its own (30000+), so a request skips the proxy actor and the
    Ray calls that carry it to the Gateway (its scope, then its body fetched back from the proxy,
    then the response streamed back): ~9 ms of CPU per request on 2 cores, ~2.5 ms left. Ray's
    processes read the flag when they start: call this before ray.init starts a local Ray (on a
    cluster, set the variable for `ray start`). The proxy keeps serving the usual port as well.
    False (proxy only, warned) on a Ray whose Serve internals were not tested: see _ray_compat."""
    return _ray_compat.enable_direct_ingress()


def gateway_urls(app_name: str, host: str, proxy_port: int, timeout_s: float = 60) -> list[str]:
    """Where to send HTTP: each Gateway replica's own address under direct ingress (asked of the
    Serve controller), else the proxy's. Call after serve.run."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = _ray_compat.direct_ingress_urls(app_name, host, proxy_port)
        if urls or urls is None or time.monotonic() > deadline:
            return urls or [f"http://{host}:{proxy_port}"]
        time.sleep(0.25)


def app_builder(args: dict):
    """For `serve run serve/config.yaml`: args are ServeConfig fields."""
    config = ServeConfig(**args)
    check_inputs(config)
    return build_app(config)
