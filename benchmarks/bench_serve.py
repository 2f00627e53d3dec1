"""Online-scoring throughput and latency on 127.0.0.1 (prints figures; not a test).

    python benchmarks/bench_serve.py [--variant custom] [--levels 1 16 64] [--requests-per-client 8]

Starts a local Ray + Serve with one replica of the endpoint, then for dynamic batching
(``serve.max_batch_size`` 16) and for no batching (max_batch_size 1) sends a fixed number of
``POST /v1/predict`` requests from 1, 16 and 64 concurrent clients (aiohttp, in this process) and
reports requests/second, p50/p99 latency, the mean batch size the server reports, and failures,
which must be zero (the script exits 1 otherwise). Clients and server share this machine's CPUs,
so on a small machine the figures understate the server.
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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import aiohttp
import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-xray-224" / "train"


def payloads(count: int = 32) -> list[bytes]:
    """JPEG bodies: real images when available, else synthetic ones."""
    if REAL.is_dir():
        return [p.read_bytes() for p in sorted(REAL.rglob("*.jpeg"))[:count]]
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


async def load(url: str, bodies: list[bytes], clients: int, per_client: int) -> dict:
    """``clients`` concurrent loops of ``per_client`` requests each; latencies and failures."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    failures: list[str] = []
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=clients)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client(index: int) -> None:
            for i in range(per_client):
                body = bodies[(index * per_client + i) % len(bodies)]
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as response:
                        payload = await response.json()
                        if response.status != 200:
                            failures.append(f"{response.status} {payload}")
                            continue
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures.append(repr(exc))
                    continue
                latencies.append(time.perf_counter() - start)
                batch_sizes.append(payload["batch_size"])

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": clients * per_client,
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else None,
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="custom", choices=["custom", "transfer"])
    parser.add_argument("--model", help="serve this artifact instead of an untrained one")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=8, help="per client; 1 client sends 8x as many")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    args = parser.parse_args()

    import ray
    from ray import serve

    from pneumonet.config import load_config
    from pneumonet.scoring.online import build_app

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_scoring import make_artifact

    bodies = payloads()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="pneumonet-bench-serve-") as tmp:
        model = args.model or make_artifact(args.variant, args.image_size, Path(tmp))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start (shared machine: figures are noisy)")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for label, max_batch in (("dynamic batching", args.max_batch_size), ("no batching", 1)):
                config = load_config(None, [f"model.image_size={args.image_size}", f"serve.max_batch_size={max_batch}",
                                            f"serve.batch_wait_timeout_s={args.batch_wait_timeout_s}"])  # fmt: skip
                serve.run(build_app(model, config), name="bench", route_prefix="/")
                url = f"http://127.0.0.1:{port}/v1/predict"
                asyncio.run(load(url, bodies, 4, 4))  # warm-up
                print(f"\n== {label} (max_batch_size {max_batch}, wait {args.batch_wait_timeout_s} s), {args.variant}")
                print(f"{'clients':>8} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'failed':>7}")
                for clients in args.levels:
                    per_client = args.requests_per_client * (8 if clients == 1 else 1)
                    r = asyncio.run(load(url, bodies, clients, per_client))
                    failed += r["failures"]
                    cells = [f"{r[key]:.1f}" if r[key] is not None else "-" for key in ("rps", "p50_ms", "p99_ms", "mean_batch")]
                    print(f"{r['clients']:>8} {r['requests']:>9} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {cells[3]:>6} "
                          f"{r['failures']:>7}", flush=True)  # fmt: skip
                    if r["first_failure"]:
                        print(f"   first failure: {r['first_failure']}")
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
        print(f"\nfailed requests: {failed}; load average {os.getloadavg()[0]:.1f} at end")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
