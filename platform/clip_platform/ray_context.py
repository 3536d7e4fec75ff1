"""The Ray context of the jobs: connect once, say which node and how many CPUs, turn task failures
caused by bad input back into the user's error, and report progress as Ray metrics."""
from __future__ import annotations

import logging

from .cli import USER_ERRORS

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS), or start a local Ray;
    a session the caller already started (tests, notebooks) is reused."""
    import ray

    if not ray.is_initialized():
        ray.init()
        log.info("Ray resources: %s", ray.cluster_resources())


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): reports say which nodes did the work."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def largest_node_cpus() -> int:
    """CPUs of the largest live node: the threads one task may take (a FAISS training run)."""
    import ray

    return max(1, int(max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)))


def task_cpus(threads: int) -> int:
    """CPUs to reserve for a task that runs `threads` threads: as many as are free now, at
    least one. Reserving all of them would wait forever while another job (Serve replicas)
    holds some; the task's threads then share the node with it."""
    import ray

    return max(1, min(threads, int(ray.available_resources().get("CPU", 1))))


def get(refs):
    """ray.get, re-raising a task's user error (bad file, bad flag) as itself, so
    the job prints one readable line instead of a remote traceback."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        raise


class Gauges:
    """A job's progress as Ray metrics (the dashboard's Metrics view; Prometheus on each node's
    metrics export port, with Ray's `ray_` prefix): `Gauges("clip_train", {"loss": "..."},
    run="demo").set(loss=0.5)`. Made on first use, in the process that reports; a no-op outside
    Ray."""

    def __init__(self, prefix: str, descriptions: dict[str, str], **tags: str):
        self.prefix, self.descriptions, self.tags = prefix, descriptions, tags
        self._gauges: dict | None = None

    def set(self, **values: float) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._gauges is None:
            from ray.util.metrics import Gauge

            self._gauges = {name: Gauge(f"{self.prefix}_{name}", description, tag_keys=tuple(self.tags))
                            for name, description in self.descriptions.items()}
        for name, value in values.items():
            if name in self._gauges and value is not None:
                self._gauges[name].set(float(value), tags=self.tags)
