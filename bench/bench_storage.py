"""Reading a cache from an S3 bucket vs from a local folder: tokens/s per core, bytes read per token, memory.

    python -m bench.bench_storage [--sequences 512] [--seq-len 1024] [--k 64]

The cache is bench.bench_reader's synthetic one (the project's writer path, exact encoding), written to a local
folder and uploaded as is to a moto S3 server started on 127.0.0.1 in its own process (moto[server], the `dev`
extra). Each pass is one shuffled epoch of ``train.reader.CacheReader`` batches in a fresh process pinned to one
CPU (bench_reader's ``_single_core``), the same cache by path or by ``s3://`` URL. The server runs on another
core; its bytes are counted by a WSGI middleware around moto (response bodies of GETs), the local reader's by
``/proc/self/io`` ``rchar`` (bytes handed to read()/pread(), page cache hits included).

Loopback moto is a protocol check, not a network: it shows how many bytes and requests the reader asks for and
what the client libraries cost in CPU, not what a real bucket's latency and bandwidth would give.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from bench import bench_reader
from bench.bench_reader import _rss_mb, _single_core, build_cache, in_child, machine

SHARD_TOKENS = 1 << 18  # 4 row groups of 64k tokens per shard: several shards from a cache the VM can hold twice


def serve(port: int) -> None:
    """The S3 server (body of the server process): moto's WSGI app, counting response bytes per method."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    counts: dict[str, int] = {"GET": 0, "GET_bytes": 0, "HEAD": 0, "other": 0}

    def counted(environ, start_response, method):
        for chunk in app(environ, start_response):
            if method == "GET":
                counts["GET_bytes"] += len(chunk)
            yield chunk

    def counting(environ, start_response):
        if environ.get("PATH_INFO") == "/__counts__":
            if environ["REQUEST_METHOD"] == "DELETE":
                counts.update(dict.fromkeys(counts, 0))
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(counts).encode()]
        method = environ["REQUEST_METHOD"]
        counts[method if method in ("GET", "HEAD") else "other"] += 1
        return counted(environ, start_response, method)

    run_simple("127.0.0.1", port, counting, threaded=True)


def _counts(endpoint: str, reset: bool = False) -> dict:
    request = urllib.request.Request(endpoint + "/__counts__", method="DELETE" if reset else "GET")
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def read_pass(cache: str, batch: int, verify: bool, prefetch: int) -> dict:
    """One shuffled epoch of CacheReader batches on one core (the body of a child process)."""
    import pyarrow as pa

    from kd_pipeline.train.reader import CacheReader

    _single_core()
    warm = CacheReader(cache, batch, shuffle=False, shuffle_rows=1, verify_checksums=False, prefetch=0)
    next(iter(warm.iter_epoch(0)))  # imports, clients, first-use costs: not the steady state
    remote = cache.startswith("s3://")
    if remote:
        _counts(os.environ["AWS_ENDPOINT_URL"], reset=True)
    reader = CacheReader(cache, batch, seed=0, shuffle=True, verify_checksums=verify, prefetch=prefetch)
    rss_base, rchar = _rss_mb(), _rchar()
    tokens = 0
    wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for b in reader.iter_epoch(0):
        tokens += b["input_ids"].numel()
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    served = _counts(os.environ["AWS_ENDPOINT_URL"]) if remote else {}
    return {
        "tokens": tokens,
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "rss_growth_mb": _rss_mb("VmHWM") - rss_base,
        "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
        "read_bytes": served["GET_bytes"] if remote else _rchar() - rchar,
        "gets": served["GET"] if remote else None,
        "heads": served["HEAD"] if remote else None,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (the server's share of a pass)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server process
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return

    import fsspec

    from kd_pipeline.cache.format.manifest import load_cache

    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env, AWS_ENDPOINT_URL=endpoint)
    server = subprocess.Popen([sys.executable, "-m", "bench.bench_storage", "--serve", str(port)])
    try:
        for _ in range(300):
            try:
                _counts(endpoint)
                break
            except OSError:
                time.sleep(0.1)
        bench_reader.SHARD_TOKENS = SHARD_TOKENS
        root = tmp / "cache"
        build_cache(root, args.sequences, args.seq_len, args.k)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(root) + "/", "bench/cache/", recursive=True)
        info = load_cache(root)
        m = info.manifest
        print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
        print(
            f"cache: {info.num_sequences} sequences x {m.seq_len} = {info.num_tokens:,} tokens, k = {m.k}, "
            f"{len(info.shards)} shards of {m.rows_per_shard} rows, row groups of {m.row_group_rows} rows; "
            f"{info.num_bytes / 2**20:.0f} MiB ({info.num_bytes / info.num_tokens:.1f} B/token stored)\n"
        )
        print(f"### CacheReader, one core, batch {args.batch}, shuffle on, prefetch 4\n")
        print(
            "| source | checksums (first epoch) | tokens/s (wall) | tokens/s per CPU-second | bytes read / token | "
            "GET + HEAD requests | server CPU (s) | peak RSS growth (MiB) | arrow pool peak (MiB) |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for source, cache in (("local folder", str(root)), ("moto S3, loopback", "s3://bench/cache")):
            for verify in (True, False):
                server_cpu = _cpu_seconds(server.pid)
                r = in_child(read_pass, cache, args.batch, verify, 4)
                server_cpu = _cpu_seconds(server.pid) - server_cpu
                requests = "-" if r["gets"] is None else f"{r['gets']} + {r['heads']}"
                served = "-" if r["gets"] is None else f"{server_cpu:.1f}"
                print(
                    f"| {source} | {'on' if verify else 'off'} | {r['tokens'] / r['wall_s']:,.0f} | "
                    f"{r['tokens'] / r['cpu_s']:,.0f} | {r['read_bytes'] / r['tokens']:.1f} | {requests} | {served} | "
                    f"{r['rss_growth_mb']:,.0f} | {r['arrow_peak_mb']:,.0f} |"
                )
        print(
            "\nCounted from the reader's construction (manifest, listing) to the end of the epoch. Local bytes are "
            "read() calls, page cache hits included; S3 bytes are GET response bodies."
        )
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
