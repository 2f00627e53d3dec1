"""Online-scoring throughput, latency, overload and CPU breakdown on 127.0.0.1 (prints figures; not a test).

    python benchmarks/bench_serve.py [--model URI] [--levels 1 16 64] [--seconds 20] [--no-batching]
                                     [--json OUT.json] [--profile DIR]

Starts a local Ray + Serve with one replica of the endpoint (as ``pneumonet serve`` does), then for
each client level runs closed-loop clients for ``--seconds``: asyncio, one aiohttp session, so the
load generator costs little and its own CPU is measured and printed. A client that gets 503 waits
the ``Retry-After`` it was given, as a well-behaved viewer would. Every 200 is checked against the
score of the image it sent (computed here beforehand with the same artifact), so a lost or mixed-up
response is counted, not missed. Per level: accepted req/s, 503/s, p50/p99 of accepted requests,
p99 of refusals, the batches the replica formed (mean and histogram, per model call), and CPU
milliseconds per accepted request by process (proxy, replica, controller, other Ray processes, the
load generator, and everything else on the machine, e.g. a training run). ``--profile DIR`` records
py-spy flame data (collapsed stacks) of the proxy and the replica during the last level. Ray is
sized to the CPUs this process may use, so ``taskset -c 0`` measures one core. Exits 1 on any
failure other than a 503, or any response carrying another image's score.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import aiohttp
import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-xray-224" / "train"
GROUPS = ("proxy", "replica", "controller", "ray other", "load generator", "not ours")


def payloads(count: int) -> list[bytes]:
    """JPEG bodies: real images when available, else synthetic ones of different brightness."""
    if REAL.is_dir():
        return [p.read_bytes() for p in sorted(REAL.rglob("*.jpeg"))[:count]]
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 64, (224, 224)) + int(i * 190 / count)
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def make_spread_artifact(variant: str, image_size: int, work: Path) -> str:
    """An untrained model with its last layer's weights scaled up: an untrained one gives every image
    ~0.5, and a mixed-up response could not be told from a right one. Same compute as any other."""
    from pneumonet.artifact import build_metadata, save_artifact
    from pneumonet.config import load_config
    from pneumonet.models import build_model

    config = load_config(None, [f"model.image_size={image_size}", "model.weights=none"])
    model = build_model(variant, config.model, seed=0)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 1e5, bias])
    meta = build_metadata(variant=variant, config=config, threshold=0.5, val_metrics={}, manifest_digest=None)
    return save_artifact(model, meta, str(work / f"model-{variant}-{image_size}"))


def with_known_scores(model: str, pool: list[bytes], count: int, gap: float) -> tuple[list[bytes], np.ndarray]:
    """``count`` images from ``pool`` whose scores (computed here: what every 200 must carry) are at
    least ``gap`` apart, so that a response carrying another image's score is caught."""
    from pneumonet.artifact import load_artifact
    from pneumonet.data.images import load_image

    artifact = load_artifact(model)
    scores = artifact.predict_proba(np.stack([load_image(b, "x.jpeg", artifact.image_size) for b in pool]))
    kept: list[int] = []
    for i in np.argsort(scores):
        if not kept or scores[i] - scores[kept[-1]] >= gap:
            kept.append(int(i))
    chosen = sorted(kept)[:count]
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} of {len(pool)} images score {gap} apart; ask for fewer --images")
    return [pool[i] for i in chosen], scores[chosen]


TICK = os.sysconf("SC_CLK_TCK")


def processes() -> list[tuple[int, int, str, float]]:
    """(pid, parent pid, command line, CPU seconds so far) of every process, from /proc (no psutil here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        found.append((int(entry.name), int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / TICK))
    return found


def grouped() -> list[tuple[int, str, float]]:
    """(pid, group, CPU seconds) of every process; ours are this one and its descendants (the local Ray)."""
    procs = processes()
    ours = {os.getpid()}
    for _ in range(8):  # Ray nests a few levels deep: driver -> raylet -> workers
        ours |= {pid for pid, ppid, _, _ in procs if ppid in ours}
    out = []
    for pid, _, cmd, seconds in procs:
        group = "not ours" if pid not in ours else "load generator" if pid == os.getpid() else "ray other"
        for key, name in (("ProxyActor", "proxy"), ("ServeReplica", "replica"), ("ServeController", "controller")):
            if pid in ours and key in cmd:
                group = name
        out.append((pid, group, seconds))
    return out


def cpu_by_group() -> dict[str, float]:
    """CPU seconds used so far, summed by group."""
    totals = dict.fromkeys(GROUPS, 0.0)
    for _, group, seconds in grouped():
        totals[group] += seconds
    return totals


def serve_pids() -> dict[str, int]:
    return {group: pid for pid, group, _ in grouped() if group in ("proxy", "replica")}


def refusal_kind(text: str) -> str:
    if "images wait for the model" in text:
        return "replica on arrival"
    if "did not get a model call" in text:
        return "replica at deadline"
    if "replica handling this request stopped" in text:
        return "proxy middleware"
    return "proxy queue full" if "backpressure" in text else "other"


async def load(url: str, bodies: list[bytes], expected: np.ndarray, clients: int, seconds: float, tolerance: float) -> dict:
    """``clients`` closed loops for ``seconds``; latencies, refusals, batch sizes and every wrong answer."""
    accepted: list[float] = []
    replica_ms: list[float] = []
    refused: list[float] = []
    refusals: dict[str, list[float]] = {}  # seconds to the 503, by who refused: the proxy (queue full) or the replica (why)
    batch_sizes: list[int] = []
    failures: list[str] = []
    wrong: list[str] = []
    no_retry_after = 0
    timeout = aiohttp.ClientTimeout(total=60)
    end = time.perf_counter() + seconds

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client(index: int) -> None:
            nonlocal no_retry_after
            sent = index
            while time.perf_counter() < end:
                image = sent % len(bodies)
                sent += clients
                start = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[image], headers={"Content-Type": "image/jpeg"}) as response:
                        text = await response.text()
                        status, retry_after = response.status, response.headers.get("Retry-After")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures.append(repr(exc))
                    continue
                elapsed = time.perf_counter() - start
                if status == 503:
                    refused.append(elapsed)
                    refusals.setdefault(refusal_kind(text), []).append(elapsed)
                    no_retry_after += retry_after is None
                    await asyncio.sleep(float(retry_after or 1))
                    continue
                if status != 200:
                    failures.append(f"{status} {text[:200]}")
                    continue
                body = json.loads(text)
                if abs(body["probability"] - expected[image]) > tolerance:
                    wrong.append(f"image {image}: got {body['probability']:.6f}, its score is {expected[image]:.6f}")
                accepted.append(elapsed)
                replica_ms.append(body["latency_ms"])
                batch_sizes.append(body["batch_size"])

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(accepted) * 1000
    # A batch of k images answers k requests: per model call, size k occurs (requests of size k) / k times.
    calls = {k: n / k for k, n in sorted(Counter(batch_sizes).items())}
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "accepted": len(accepted),
        "rps": len(accepted) / wall,
        "refused_per_s": len(refused) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "replica_p50_ms": float(np.percentile(replica_ms, 50)) if replica_ms else None,
        "refused_p99_ms": float(np.percentile(np.array(refused) * 1000, 99)) if refused else None,
        "refused_without_retry_after": no_retry_after,
        "refusals": {kind: {"n": len(t), "p50_ms": round(1000 * float(np.percentile(t, 50))),
                            "p99_ms": round(1000 * float(np.percentile(t, 99)))} for kind, t in refusals.items()},  # fmt: skip
        "mean_batch": sum(k * c for k, c in calls.items()) / sum(calls.values()) if calls else None,
        "batch_histogram": {k: round(c) for k, c in calls.items()},
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "wrong_scores": len(wrong),
        "first_wrong": wrong[0] if wrong else None,
    }


def profile(pids: dict[str, int], seconds: float, out: Path) -> list[subprocess.Popen]:
    """py-spy (from this venv) on the proxy and the replica, collapsed stacks, for ``seconds``."""
    out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    return [
        subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
                          "--format", "raw", "--gil", "--output", str(out / f"{group}.txt")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for group, pid in pids.items()
    ]


def report(r: dict, cpu: dict[str, float], cores: int) -> None:
    fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
    print(f"{r['clients']:>7} {fmt(r['rps']):>7} {fmt(r['refused_per_s']):>6} {fmt(r['p50_ms']):>7} {fmt(r['p99_ms']):>7} "
          f"{fmt(r['refused_p99_ms']):>8} {fmt(r['mean_batch']):>6} {r['failures']:>5} {r['wrong_scores']:>5}"
          f"   batches {r['batch_histogram']}" + (f"   503s {r['refusals']}" if r["refusals"] else ""), flush=True)  # fmt: skip
    per_request = {g: 1000 * s / max(1, r["accepted"]) for g, s in cpu.items()}
    busy = sum(cpu.values()) / r["seconds"] / cores
    print(f"        CPU ms per accepted request: " + ", ".join(f"{g} {v:.1f}" for g, v in per_request.items())
          + f"; load generator {100 * cpu['load generator'] / r['seconds']:.0f}% of a core; CPUs {100 * busy:.0f}% busy; "
          f"replica p50 {fmt(r['replica_p50_ms'])} ms; load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    if r["first_failure"]:
        print(f"        first failure: {r['first_failure']}")
    if r["first_wrong"]:
        print(f"        first wrong score: {r['first_wrong']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="custom", choices=["custom", "transfer"])
    parser.add_argument("--model", help="serve this artifact instead of an untrained one")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=20, help="per client level")
    parser.add_argument("--images", type=int, default=64, help="distinct images sent (their scores are checked)")
    parser.add_argument("--no-batching", action="store_true", help="also measure serve.max_batch_size=1")
    parser.add_argument("--override", action="append", default=[], help="serve.key=value, e.g. serve.queue_timeout_s=0.5")
    parser.add_argument("--option", action="append", default=[], help="deployment option key=int, e.g. max_ongoing_requests=64")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--profile", type=Path, help="py-spy the proxy and replica during the last level into this folder")
    args = parser.parse_args()

    import ray
    from ray import serve

    from pneumonet.config import load_config
    from pneumonet.scoring.online import build_app
    from pneumonet.scoring.cluster import SERVE_ENV, set_serve_env

    cores = len(os.sched_getaffinity(0))
    options = {k: int(v) for k, v in (o.split("=", 1) for o in args.option)}
    results, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="pneumonet-bench-serve-") as tmp:
        model = args.model or make_spread_artifact(args.variant, args.image_size, Path(tmp))
        bodies, expected = with_known_scores(model, payloads(4 * args.images), args.images, gap=3e-5)
        tolerance = 1e-5
        print(f"{len(bodies)} images scoring {expected.min():.4f}..{expected.max():.4f}, at least 3e-5 apart: "
              f"a 200 more than {tolerance} off its image's score counts as a mix-up")  # fmt: skip
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        print(f"{cores} CPUs for Ray and the clients; load average {os.getloadavg()} at start")
        set_serve_env()  # as `pneumonet serve`; set one of SERVE_ENV's variables yourself to measure without it
        print("Serve environment:", {key: os.environ[key] for key in SERVE_ENV})
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            modes = [("dynamic batching", None)] + ([("no batching", 1)] if args.no_batching else [])
            for label, max_batch in modes:
                overrides = [f"model.image_size={args.image_size}", *args.override]
                overrides += [f"serve.max_batch_size={max_batch}"] if max_batch else []
                config = load_config(None, overrides)
                serve.run(build_app(model, config, **options), name="bench", route_prefix="/")
                url = f"http://127.0.0.1:{port}/v1/predict"
                asyncio.run(load(url, bodies, expected, 4, 3, tolerance))  # warm-up
                print(f"\n== {label}: serve {config.serve.model_dump()} options {options}")
                print(f"{'clients':>7} {'req/s':>7} {'503/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'503 p99':>8} {'batch':>6} "
                      f"{'fail':>5} {'wrong':>5}")  # fmt: skip
                for clients in args.levels:
                    spies = []
                    if args.profile and clients == args.levels[-1] and label == modes[0][0]:
                        spies = profile(serve_pids(), args.seconds, args.profile)
                    before = cpu_by_group()
                    r = asyncio.run(load(url, bodies, expected, clients, args.seconds, tolerance))
                    after = cpu_by_group()
                    for spy in spies:
                        spy.wait(timeout=60)
                    cpu = {g: max(0.0, after[g] - before[g]) for g in GROUPS}
                    report(r, cpu, cores)
                    failed += r["failures"] + r["wrong_scores"] + r["refused_without_retry_after"]
                    results.append({"mode": label, **r, "cpu_s": cpu, "load_average": os.getloadavg(), "cores": cores})
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\nfailures, wrong scores and 503s without Retry-After: {failed}; load average {os.getloadavg()} at end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
