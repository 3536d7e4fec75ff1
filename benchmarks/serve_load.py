"""Bounded load test of the Serve text-embedding endpoint on loopback, against the offline
batch throughput of the same model on the same machine, measured in the same run.

    python benchmarks/serve_load.py [--model ViT-B-16] [--rows 64x1x400 32x16x64] [--replicas 2] [--profile]
                                    [--via-proxy]

Each row is CLIENTSxTEXTSxREQUESTS: that many concurrent keep-alive clients send a fixed number
of POST /embed/text requests of that many texts each. The offline baseline is the best texts/s
of tokenize + encode_text over batch sizes 16..128 in this one process (all cores), measured before
Ray starts and again after it stops (the machine's speed drifts; the better figure counts). Prints texts/s,
the ratio HTTP / offline (target >= 0.70), p50/p95/p99 latency and errors per row; --profile adds
the CPU seconds each process (client, proxy, Gateway, Encoder, Ray's own) spent during each row.

Requests go to the Gateway replica's own HTTP port (Serve's direct ingress, as `python -m serve`
starts it); --via-proxy sends them through Serve's HTTP proxy actor instead.

    python benchmarks/serve_load.py --search-index DIR [--search-clients 32] [--search-requests 4000]
                                    [--memory-limit 4GiB] [--search-groups 0]

--search-index loads POST /search instead, over an index built by jobs/build_index.py (e.g. the
one `benchmarks/index.py --rows 2000000` leaves in its --workdir), by `image_id` (more like
this: the stored vector, fanned out to every Search group and merged), so the figures are the
search path's, not the text encoder's. Each Serve replica process is moved into a memory cgroup
of its own (v1, /sys/fs/cgroup/memory, root) limited to --memory-limit. Prints QPS, p50/p99 and
errors, and per replica its resident memory (psutil RSS and the cgroup's peak) against the
index's size on disk; the baseline is the same searches in this process, one at a time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import clip_models

TARGET = 0.70


@dataclass(frozen=True)
class Row:
    clients: int  # concurrent clients, each with a keep-alive connection
    texts: int  # texts per request
    requests: int  # requests in the row (fixed count)

    @classmethod
    def parse(cls, spec: str) -> "Row":
        clients, texts, requests = (int(x) for x in spec.lower().split("x"))
        return cls(clients, texts, requests)


def corpus(n: int) -> list[str]:
    return [f"第{i}张图片：一只在草地上奔跑的金色小狗" for i in range(n)]


def offline_texts_per_s(model, texts: list[str], batch: int) -> float:
    """texts/s of tokenize + encode_text in batches padded to the longest (what a replica does)."""
    with torch.inference_mode():
        model.encode_text(clip_models.tokenize(texts[:batch], pad_to_longest=True))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            model.encode_text(clip_models.tokenize(texts[i:i + batch], pad_to_longest=True))
    return len(texts) / (time.perf_counter() - start)


def best_offline(model, texts: list[str], batch_sizes=(16, 32, 64, 128)) -> tuple[float, int]:
    return max((offline_texts_per_s(model, texts, b), b) for b in batch_sizes)


async def load(url: str, row: Row, texts: list[str], on_start=lambda: None) -> tuple[float, list[float], int]:
    """(elapsed s, latencies of successful requests, errors) for one row; on_start() runs after
    the warm-up, when the clock starts."""
    bodies = [{"texts": [texts[(i * row.texts + j) % len(texts)] for j in range(row.texts)]}
              for i in range(row.requests)]
    return await post_all(url, bodies, row.clients, lambda body, data: len(data["embeddings"]) == len(body["texts"]),
                          min(row.clients, max(1, 64 // row.texts)), on_start)


async def post_all(url: str, bodies: list[dict], clients: int, ok, warm_up: int,
                   on_start=lambda: None) -> tuple[float, list[float], int]:
    """POST every body from `clients` concurrent keep-alive clients after `warm_up` uncounted
    ones; (elapsed s, latencies of the replies ok(body, data) accepts, errors)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    pending = iter(bodies)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        async def client():
            nonlocal errors
            for body in pending:
                start = time.perf_counter()
                try:
                    async with session.post(url, json=body) as reply:
                        data = await reply.json()
                        good = reply.status == 200 and ok(body, data)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                    good = False
                if good:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        async def warm(body):
            async with session.post(url, json=body) as reply:
                await reply.read()

        await asyncio.gather(*[warm(b) for b in bodies[:warm_up]])  # not counted
        on_start()
        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        return time.perf_counter() - start, latencies, errors


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far: this process (client and Ray driver), each Ray/Serve
    process by role, and every other process on the machine (other people's work)."""
    import psutil

    roles = {"ray::ServeReplica:clip:Encoder": "Encoder", "ray::ServeReplica:clip:Gateway": "Gateway",
             "ray::ServeReplica:clip:Search": "Search", "ray::ProxyActor": "proxy",
             "ray::ServeController": "controller"}
    out: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] == os.getpid():
                role = "client+driver"
            elif proc.info["name"] in ("raylet", "gcs_server"):
                role = "raylet+GCS"
            elif cmdline.startswith("ray::") or "site-packages/ray/" in cmdline:
                role = next((name for key, name in roles.items() if cmdline.startswith(key)), "other Ray")
            else:
                role = "not this benchmark"
            times = proc.cpu_times()
            out[role] = out.get(role, 0.0) + times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CGROUP = Path("/sys/fs/cgroup/memory")


def replica_processes() -> dict[str, "psutil.Process"]:
    """The Serve replica processes of the app "clip" by deployment (ray::ServeReplica:clip:NAME)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::ServeReplica:clip:"):
            found[f"{cmdline.split()[0].rsplit(':', 1)[1]}/{proc.info['pid']}"] = proc
    return found


def hold_in_cgroups(processes: dict, limit_bytes: int) -> dict[str, Path]:
    """Each process into a memory cgroup of its own limited to `limit_bytes` (cgroup v1), after its
    start: what it maps and allocates from then on (the index pages a search touches) is held to
    the limit; pages charged before move with it where the kernel still can. {} when cgroups
    cannot be used here."""
    if not (CGROUP / "cgroup.procs").exists() or os.geteuid() != 0:
        print("no writable memory cgroup (v1, root): replicas run without a memory limit")
        return {}
    groups = {}
    for name, proc in processes.items():
        group = CGROUP / "clip-serve-bench" / name.replace("/", "-")
        group.mkdir(parents=True, exist_ok=True)
        try:
            (group / "memory.move_charge_at_immigrate").write_text("3")
        except OSError:  # newer kernels dropped it: pages charged before the move stay with the parent
            pass
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "cgroup.procs").write_text(str(proc.pid))
        groups[name] = group
    return groups


def release_cgroups(timeout_s: float = 30) -> None:
    """Remove the benchmark's cgroups once their processes have exited (after Ray stopped)."""
    parent = CGROUP / "clip-serve-bench"
    deadline = time.monotonic() + timeout_s
    while parent.is_dir() and time.monotonic() < deadline:
        for group in [g for g in parent.iterdir() if g.is_dir()] + [parent]:
            try:
                group.rmdir()
            except OSError:  # a process is still inside
                pass
        time.sleep(0.5)


def directory_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def search_benchmark(args, base: str, index_dir: str, ids: "np.ndarray") -> None:
    """/search by image_id at args.search_clients, replicas in memory cgroups; the report."""
    import numpy as np

    from clip_platform.index import open_index
    from clip_platform.index.config import parse_bytes

    rng = np.random.default_rng(0)
    queries = rng.choice(ids, args.search_requests).tolist()
    bodies = [{"image_id": int(i), "top_k": 10} for i in queries]
    groups = hold_in_cgroups(replica_processes(), parse_bytes(args.memory_limit))
    cpu_before = cpu_by_role()
    elapsed, latencies, errors = asyncio.run(post_all(
        base + "/search", bodies, args.search_clients, lambda body, data: len(data["results"]) == body["top_k"],
        args.search_clients))
    cpu = {role: seconds - cpu_before.get(role, 0.0) for role, seconds in cpu_by_role().items()}
    memory = {name: (proc.memory_info().rss, int((groups[name] / "memory.max_usage_in_bytes").read_text())
                     if name in groups else None) for name, proc in replica_processes().items()}
    index = open_index(index_dir)
    sample = np.asarray(queries[:200])
    _, vectors = index.vectors(sample)
    start = time.perf_counter()
    for row in vectors:
        index.search(row[None], 10)
    offline = len(sample) / (time.perf_counter() - start)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    size = directory_bytes(index_dir)
    print(f"index {index_dir}: {index.ntotal} vectors x {index.dim}, {len(index.shards)} shard(s), "
          f"{size / 2**30:.2f} GiB on disk; offline (this process, one query at a time): {offline:.0f} QPS")
    print(f"/search by image_id, {args.search_clients} clients, {args.search_requests} requests: "
          f"{len(latencies) / elapsed:.1f} QPS, p50 {q[49] * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms, {errors} errors")
    # The cgroup's peak counts from the move into it, after start-up: what searching added.
    print(f"{'replica':<28} {'RSS MiB':>8} {'cgroup peak MiB':>15} {'RSS / index on disk':>20}")
    for name, (rss, peak) in sorted(memory.items()):
        print(f"{name:<28} {rss / 2**20:>8.0f} {peak / 2**20 if peak else float('nan'):>15.0f} {rss / size:>20.3f}")
    print(f"memory limit per replica: {args.memory_limit}" if groups else "no memory limit")
    print("CPU ms per request by process: " + ", ".join(
        f"{role} {1e3 * seconds / args.search_requests:.1f}" for role, seconds in sorted(cpu.items(), key=lambda x: -x[1])
        if seconds > 0.01 * elapsed))


def main() -> None:
    import ray
    from ray import serve

    from serve.app import ServeConfig, build_app, enable_direct_ingress, gateway_urls

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="a model name (random weights) for create_model")
    parser.add_argument("--rows", nargs="+", type=Row.parse, default=[Row(64, 1, 400), Row(32, 16, 64)],
                        help="CLIENTSxTEXTSxREQUESTS, e.g. 64x1x400 (32-128 clients)")
    parser.add_argument("--replicas", type=int, default=2,
                        help="Encoder replicas sharing the machine's cores (default 2 x 1 thread: single-threaded "
                             "replicas lose less to preemption by the proxy and Gateway than one 2-thread replica)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads per Encoder replica (default: the cores divided among the replicas)")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="texts per Encoder batch (ServeConfig's default is 64, for GPUs): on one CPU thread a "
                             "batch of 32 takes ~1.5 s, and with 64 clients a cap of 32 keeps one replica from "
                             "taking every queued text while the other waits")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=ServeConfig.batch_wait_timeout_s)
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="turn Serve's per-request access log off")
    parser.add_argument("--profile", action="store_true", help="CPU seconds per process during each row")
    parser.add_argument("--via-proxy", action="store_true",
                        help="send requests through Serve's HTTP proxy actor instead of Serve's direct ingress "
                             "(the Gateway replica serving HTTP itself)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="more environment for Ray's processes (e.g. Serve feature flags); repeat for more")
    parser.add_argument("--search-index", help="an index directory: load POST /search by image_id instead")
    parser.add_argument("--search-clients", type=int, default=32, help="concurrent /search clients (default 32)")
    parser.add_argument("--search-requests", type=int, default=4000, help="/search requests (default 4000)")
    parser.add_argument("--search-groups", type=int, default=0, help="ServeConfig.search_groups (0: one per shard)")
    parser.add_argument("--search-replicas", type=int, default=1,
                        help="ServeConfig.search_replicas (0: the Gateway searches the index itself)")
    parser.add_argument("--memory-limit", default="4GiB", help="memory cgroup limit per Serve replica (default 4GiB)")
    args = parser.parse_args()
    if args.search_index:
        return main_search(args)
    if not args.via_proxy:
        enable_direct_ingress()
        # An ingress replica stays up this long after serve.shutdown for load balancers to drop it
        # (30 s by default); nothing balances here.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    for item in args.env:
        name, _, value = item.partition("=")
        os.environ[name] = value  # before Ray starts: its processes inherit this environment
    sys.stdout.reconfigure(line_buffering=True)  # Ray's shutdown can end the process before a buffer flush

    torch.manual_seed(0)
    model = clip_models.create_model(args.model).eval()
    texts = corpus(2048)
    offline, best_batch = best_offline(model, texts[:256])
    print(f"{args.model} (random weights), {os.cpu_count()} CPU cores, torch {torch.get_num_threads()} threads")
    print(f"offline tokenize+encode_text before Serve starts: {offline:.1f} texts/s (best batch {best_batch})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = clip_models.save_checkpoint(model, Path(tmp) / "model.pt")
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        threads = args.torch_threads or max(1, os.cpu_count() // args.replicas)
        config = ServeConfig(checkpoints={"m": str(checkpoint)}, min_replicas=args.replicas,
                             max_replicas=args.replicas, torch_threads=threads,
                             num_cpus=(os.cpu_count() - 0.5) / args.replicas,  # the Gateway reserves 0.5
                             max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                             access_log=args.access_log, max_ongoing_requests=max(r.clients for r in args.rows),
                             max_queued_requests=max(r.requests for r in args.rows))
        serve.run(build_app(config), name="clip", route_prefix="/")
        print(f"Serve: {args.replicas} Encoder replica(s), torch_threads {config.torch_threads}, max_batch_size "
              f"{config.max_batch_size}, batch_wait_timeout_s {config.batch_wait_timeout_s}, "
              f"access_log {config.access_log}")
        base = gateway_urls("clip", "127.0.0.1", port)[0]  # one Gateway replica
        print(f"HTTP: {base} ({'proxy' if base.endswith(f':{port}') else 'direct ingress, Gateway replica'})"
              + (f", env {' '.join(args.env)}" if args.env else ""))
        url = base + "/embed/text"
        for row in args.rows:
            before: dict[str, float] = {}
            elapsed, latencies, errors = asyncio.run(load(url, row, texts, lambda: before.update(cpu_by_role())))
            cpu = {k: v - before.get(k, 0.0) for k, v in cpu_by_role().items()}
            results.append((row, elapsed, latencies, errors, cpu))
        serve.shutdown()
        ray.shutdown()
    after = offline_texts_per_s(model, texts[:256], best_batch)
    print(f"offline again after Serve stopped: {after:.1f} texts/s (batch {best_batch}); the baseline is the better one")
    offline = max(offline, after)
    print(f"{'clients':>7} {'texts/req':>9} {'requests':>8} {'texts/s':>8} {'ratio':>6} {'>=0.70':>6} "
          f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6}")
    for row, elapsed, latencies, errors, cpu in results:
        rate = row.requests * row.texts / elapsed
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
        met = "yes" if rate / offline >= TARGET and errors == 0 else "NO"
        print(f"{row.clients:>7} {row.texts:>9} {row.requests:>8} {rate:>8.1f} {rate / offline:>6.2f} {met:>6} "
              f"{q[49] * 1e3:>7.0f} {q[94] * 1e3:>7.0f} {q[98] * 1e3:>7.0f} {errors:>6}")
        if args.profile:
            print(f"        CPU s in {elapsed:.1f} s: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05))


def main_search(args) -> None:
    """Serve the index (the Encoder holds --model; queries by id do not use it) and load /search."""
    import numpy as np
    import ray
    from ray import serve

    from clip_platform.index import open_index
    from serve.app import ServeConfig, build_app, enable_direct_ingress, gateway_urls

    if not args.via_proxy:
        enable_direct_ingress()
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    sys.stdout.reconfigure(line_buffering=True)
    ids = np.asarray(open_index(args.search_index, shards=[]).metadata.ids)
    torch.manual_seed(0)
    model = clip_models.create_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = clip_models.save_checkpoint(model, Path(tmp) / "model.pt")
        del model
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(checkpoints={"m": str(checkpoint)}, index=args.search_index, min_replicas=1,
                             max_replicas=1, num_cpus=0.25, search_groups=args.search_groups, search_cpus=0.5,
                             search_replicas=args.search_replicas,
                             access_log=args.access_log, max_ongoing_requests=max(64, args.search_clients),
                             max_queued_requests=args.search_requests)
        serve.run(build_app(config), name="clip", route_prefix="/")
        base = gateway_urls("clip", "127.0.0.1", port)[0]
        try:
            search_benchmark(args, base, args.search_index, ids)
        finally:
            serve.shutdown()
            ray.shutdown()
            release_cgroups()


if __name__ == "__main__":
    main()
