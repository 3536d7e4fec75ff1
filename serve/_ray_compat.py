"""Ray Serve internals, behind one seam: the only module of the app that touches them.

Direct ingress (each Gateway replica serving HTTP on a port of its own) is switched on by
Ray's `RAY_SERVE_ENABLE_DIRECT_INGRESS` flag, and the replicas' ports are known only to
the Serve controller (`ray.serve.context._get_global_client()._controller`,
`get_target_groups`, the target groups' `app_name`/`protocol`/`targets[].port`). None of
that is public API. It is used only on a Ray within `TESTED` (major, minor); on another
Ray, or when a private name is gone, the app serves through the proxy only and one
warning says why, so a Ray upgrade shows up here, not as a failed start. Retest and
widen `TESTED` after upgrading Ray.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
TESTED = ((2, 60), (2, 60))  # inclusive (major, minor) range of Ray these internals were tested on
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
_warned: set[str] = set()


def ray_version() -> tuple[int, int]:
    """(major, minor) of the installed Ray ("2.60.0" -> (2, 60))."""
    import ray

    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def supported() -> bool:
    """Whether the installed Ray is in the range whose Serve internals were tested."""
    return TESTED[0] <= ray_version() <= TESTED[1]


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("Serve direct ingress unavailable (%s): serving through the proxy only", reason)


def _untested() -> str | None:
    """Why this Ray is not used for direct ingress, or None when it is a tested one."""
    if supported():
        return None
    import ray

    tested = " to ".join(f"{a}.{b}" for a, b in dict.fromkeys(TESTED))
    return f"ray {ray.__version__} is not the tested {tested}"


def enable_direct_ingress() -> bool:
    """Set Ray's direct-ingress flag (read by the Ray processes started afterwards); False,
    with a warning, on an untested Ray."""
    reason = _untested()
    if reason:
        _warn_once(reason)
        return False
    os.environ[DIRECT_INGRESS_ENV] = "1"
    return True


def direct_ingress_urls(app_name: str, host: str, proxy_port: int) -> list[str] | None:
    """The Gateway replicas' own HTTP addresses, asked of the Serve controller ([] while none is
    published yet); None when direct ingress is off, or (warned once) this Ray is untested or
    its controller internals have changed."""
    reason = _untested()
    if reason is None:
        try:
            import ray
            from ray.serve.context import _get_global_client

            controller = _get_global_client()._controller
            groups = ray.get(controller.get_target_groups.remote(app_name))
            return urls_from_target_groups(groups, app_name, host, proxy_port)
        except (AttributeError, ImportError, TypeError) as exc:
            reason = f"ray's Serve controller API changed: {type(exc).__name__}: {exc}"
    _warn_once(reason)
    return None


def urls_from_target_groups(target_groups, app_name: str, host: str, proxy_port: int) -> list[str] | None:
    """The Gateway replicas' own HTTP addresses among the controller's target groups; [] while
    direct ingress is on but no replica port is published yet; None when it is off (the only
    groups are the proxies', which carry no application name)."""
    groups = [g for g in target_groups if g.app_name == app_name
              and str(getattr(g.protocol, "value", g.protocol)).upper() == "HTTP"]
    if not groups:
        return None
    return [f"http://{host}:{port}" for port in sorted({t.port for g in groups for t in g.targets if t.port != proxy_port})]
