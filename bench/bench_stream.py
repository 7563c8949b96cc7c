"""Benchmark of the streaming path: what Sheepdog adds to a direct SDK stream, and how many
streams one worker holds.

Run: ``.venv/bin/python bench/bench_stream.py [--requests 200] [--streams 1000] [--db pg|sqlite]``.
Starts its own simulator, uses Redis DB 15 (flushed) and a throwaway PostgreSQL database (or a
SQLite file), and one stream worker (threads pool, concurrency 1000: the CLI default).

1. latency: the same requests (a) straight through the SDK, (b) through Sheepdog, timed from
   submit to the first token seen by a pub/sub subscriber that subscribed before submitting.
   Added TTFT = Sheepdog TTFT - direct TTFT (p50, p99); added per-chunk delay = each chunk's
   offset from the first token through Sheepdog minus the same chunk's offset direct.
2. concurrency: N streams at once, each 50 chunks 100 ms apart. Baseline: the same N streams
   read straight from the simulator through the async SDK, in the same run (its own ~5 s).
   Through Sheepdog: the N messages sent in one burst as `submit_many` sends them (one Redis
   pipeline); wall time from the start of the send to the last `done`, each stream's time from
   the messages being in Redis to its row ending, completed, lost (a request not ended
   `succeeded` with a gap-free replay log of 50 tokens + done), worker CPU per chunk (utime +
   stime of the worker process).

   Also: each stream's start delay (its message sent -> its first token, from the row), the
   share of the box's two cores that was busy, and the simulator's own CPU in that window.
   Celery's own floor, in the same run: a stock Celery worker (bench/celery_floor.py: the same
   Celery settings, threads pool, events on, none of Sheepdog's code) timing a no-op task from
   before its apply_async to its body; Sheepdog's added TTFT cannot be below it. And the
   relay's floor: a bare redis-py PUBLISH from another process to the same kind of subscriber,
   5 ms apart (bench/relay_floor.py); Sheepdog's per-chunk relay cannot be below it.
   For the concurrency run, the same stock worker (one process) given n no-op tasks in one
   send: each one's delay from the send to its body, Celery's floor for starting a burst.
3. TTFT breakdown: the worker runs with SHEEPDOG_STREAM_TRACE=1 and records each stream's stage
   times in Redis; medians of message sent -> task thread -> loop -> claim done / provider's
   first text -> first token queued -> seen by the subscriber.

Each phase runs --runs times; the table shows medians. --workers N runs N stream worker
processes on the host (the deployment recommendation is measured, not assumed): `sheepdog worker
--queues stream` starts one per core by default, i.e. --workers 2 on a 2-core host.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
from openai import AsyncOpenAI, DefaultAioHttpClient, OpenAI  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench import relay_floor  # noqa: E402
from core import keys  # noqa: E402
from core.db import get_engine, session_scope  # noqa: E402
from core.settings import Settings  # noqa: E402
from models.migrate import upgrade  # noqa: E402
from models.tables import Request  # noqa: E402
from sheepdog.client import Client  # noqa: E402
from simulator.config import SimulatorConfig  # noqa: E402
from simulator.server import SimulatorProcess  # noqa: E402

ADMIN = os.environ.get("SHEEPDOG_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("SHEEPDOG_BENCH_STREAM_REDIS_URL", "redis://127.0.0.1:6379/15")
MODEL = "sheepdog-mini"
TICKS = os.sysconf("SC_CLK_TCK")


def new_pg() -> str:
    name = f"sheepdog_bstream_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{ADMIN.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg://")
    upgrade(url)
    return url


def drop_pg(url: str) -> None:
    get_engine(url).dispose()
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def box_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def start_worker(env: dict[str, str], logdir: Path, index: int = 0) -> subprocess.Popen[bytes]:
    log = (logdir / f"worker{index}.log").open("wb")
    cmd = [
        sys.executable,
        "-m",
        "sheepdog",
        "worker",
        "--queues",
        "stream",
        "--loglevel",
        "WARNING",
        "--hostname",
        f"bench{index}@%h",
        "--processes",
        "1",  # one process each (--workers N): the CPU measured is that of these pids
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = Client(
            Settings(redis_url=env["SHEEPDOG_REDIS_URL"], database_url=env["SHEEPDOG_DATABASE_URL"])
        )
        rid = client.submit({**body(0, "warm-up"), "priority": "high"})
        client.result(rid, wait=60)  # consuming, loop started, connections warm
    except BaseException:
        proc.kill()
        raise
    return proc


def celery_floor() -> Any:
    """bench/celery_floor.py, imported for this bench's Redis (its app reads the settings)."""
    os.environ["SHEEPDOG_REDIS_URL"] = REDIS
    import importlib

    return importlib.import_module("bench.celery_floor")


def start_floor_worker(env: dict[str, str], logdir: Path) -> subprocess.Popen[bytes]:
    """A stock Celery worker for bench/celery_floor.py (threads pool, events on)."""
    cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_floor", "worker", "-Q", "floor"]
    cmd += ["-P", "threads", "-c", "100", "-E", "--loglevel", "WARNING", "-n", "floor@%h"]
    cmd += ["--without-mingle", "--without-gossip"]
    log = (logdir / "floor-worker.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    celery_floor().measure(3, 0.2)  # up and consuming
    return proc


def body(i: int, tag: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"bench {tag} {i}"}]}


def direct(sim: SimulatorProcess, n: int, tag: str) -> list[list[float]]:
    """Chunk arrival offsets (s) from request start, straight through the SDK."""
    sdk = OpenAI(base_url=sim.base_url, api_key=sim.api_key, max_retries=0)
    runs = []
    for i in range(n):
        t0 = time.perf_counter()
        times = []
        with sdk.chat.completions.with_streaming_response.create(
            **body(i, tag), stream=True, stream_options={"include_usage": True}
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    obj = orjson.loads(line[6:])
                    if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                        times.append(time.perf_counter() - t0)
        runs.append(times)
    sdk.close()
    return runs


STAGES = ("task", "loop", "claimed", "text", "put")


def through_sheepdog(
    client: Client,
    r: redis.Redis,
    n: int,
    tag: str,
    stages: list[dict[str, float]] | None = None,
    relay: list[float] | None = None,
) -> list[list[float]]:
    """Token arrival offsets (s) from submit, seen by a pub/sub subscriber (and, into `stages`,
    each request's stage times relative to its message being sent)."""
    runs = []
    for i in range(n):
        item = client.prepare({**body(i, tag), "priority": "high"})
        pubsub = r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.of(client.settings).stream_channel(item.id))
        pubsub.get_message(timeout=1)  # the subscribe confirmation
        wall0 = time.time()
        t0 = time.perf_counter()
        client._enqueue([item])  # messages, then the row when the producer writes rows
        times: list[float] = []
        seen: list[float] = []
        first_seen = 0.0
        while True:
            msg = pubsub.get_message(timeout=10)
            if msg is None:
                continue
            data = orjson.loads(msg["data"])
            if data["type"] == "token":
                now = time.time()
                if not times:
                    first_seen = now
                seen.append(now)
                times.append(time.perf_counter() - t0)
            elif data["type"] in ("done", "error"):
                break
        pubsub.close()
        runs.append(times)
        if stages is not None:
            trace = r.hgetall(keys.of(client.settings).stream_trace(item.id))
            arrivals = orjson.loads(trace.pop(b"arrivals", b"[]"))
            marks = {k.decode(): float(v) for k, v in trace.items()}
            if relay is not None and len(arrivals) == len(seen):
                relay.extend(s - a for s, a in zip(seen, arrivals, strict=True))
            if all(k in marks for k in STAGES):
                stages.append(
                    {k: (marks[k] - wall0) * 1000 for k in STAGES}
                    | {"seen": (first_seen - wall0) * 1000}
                )
    return runs


def latency(sim: SimulatorProcess, client: Client, r: redis.Redis, n: int) -> dict[str, float]:
    """TTFT and per-chunk delay, direct and through Sheepdog (ms)."""
    sim.configure(ttft_ms=20, chunk_delay_ms=5, answer_tokens=[20, 20])
    tag = secrets.token_hex(3)
    direct(sim, 5, "warm" + tag)
    through_sheepdog(client, r, 5, "warm" + tag)
    a = direct(sim, n, tag)
    stages: list[dict[str, float]] = []
    relay: list[float] = []
    b = through_sheepdog(client, r, n, tag, stages, relay)
    noise = direct(sim, n, tag)  # the same chunks direct again: the metric's own noise floor
    celery_ms = celery_floor().measure(n)  # stock Celery: send -> a no-op task's body
    bare_relay_ms = relay_floor.measure(REDIS, min(n * 20, 2000))  # bare PUBLISH -> subscriber
    ttft_a = [run[0] for run in a]
    ttft_b = [run[0] for run in b]
    med_a = statistics.median(ttft_a)
    added = [t - med_a for t in ttft_b]
    delays = []
    floor = []
    for ra, rb, rc in zip(a, b, noise, strict=True):
        for k in range(1, min(len(ra), len(rb))):
            delays.append((rb[k] - rb[0]) - (ra[k] - ra[0]))
        for k in range(1, min(len(ra), len(rc))):
            floor.append((rc[k] - rc[0]) - (ra[k] - ra[0]))
    ms = 1000

    def stage(key: str) -> float:
        return statistics.median(s[key] for s in stages) if stages else float("nan")

    return {
        "celery_floor_p50": pct(celery_ms, 0.5),
        "celery_floor_p99": pct(celery_ms, 0.99),
        "at_task": stage("task"),
        "at_loop": stage("loop"),
        "at_claimed": stage("claimed"),
        "at_text": stage("text"),
        "at_put": stage("put"),
        "at_seen": stage("seen"),
        "direct_ttft_p50": pct(ttft_a, 0.5) * ms,
        "direct_ttft_p99": pct(ttft_a, 0.99) * ms,
        "sheepdog_ttft_p50": pct(ttft_b, 0.5) * ms,
        "sheepdog_ttft_p99": pct(ttft_b, 0.99) * ms,
        "added_ttft_p50": pct(added, 0.5) * ms,
        "added_ttft_p99": pct(added, 0.99) * ms,
        "added_chunk_p50": pct(delays, 0.5) * ms,
        "added_chunk_p99": pct(delays, 0.99) * ms,
        "noise_chunk_p99": pct(floor, 0.99) * ms,
        "relay_p50": pct(relay, 0.5) * ms,
        "relay_p99": pct(relay, 0.99) * ms,
        "relay_floor_p50": pct(bare_relay_ms, 0.5),
        "relay_floor_p99": pct(bare_relay_ms, 0.99),
    }


def simulator_alone(sim: SimulatorProcess, n: int, tag: str) -> dict[str, float]:
    """The simulator's own time for n concurrent streams, read straight through the SDK."""

    async def one(sdk: AsyncOpenAI, i: int) -> tuple[float, float, int]:
        t0 = time.time()
        chunks = 0
        async with sdk.chat.completions.with_streaming_response.create(
            **body(i, tag), stream=True
        ) as resp:
            async for data in resp.iter_bytes():
                chunks += data.count(b'"content":"')
        return t0, time.time(), chunks

    async def run() -> list[tuple[float, float, int]]:
        http = DefaultAioHttpClient(timeout=120)
        async with AsyncOpenAI(
            base_url=sim.base_url, api_key=sim.api_key, max_retries=0, http_client=http
        ) as sdk:
            return await asyncio.gather(*(one(sdk, i) for i in range(n)))

    runs = asyncio.run(run())
    return {
        "wall": max(e for _, e, _ in runs) - min(s for s, _, _ in runs),
        "each_p50": pct([e - s for s, e, _ in runs], 0.5),
        "each_max": max(e - s for s, e, _ in runs),
    }


def concurrency(
    sim: SimulatorProcess, client: Client, r: redis.Redis, workers: list[int], n: int, db_url: str
) -> dict[str, float]:
    """n streams at once through one worker, against the simulator's own time for them."""
    sim.configure(ttft_ms=0, chunk_delay_ms=100, answer_tokens=[50, 50])
    tag = secrets.token_hex(3)
    alone = simulator_alone(sim, n, "alone" + tag)
    items = [client.prepare({**body(i, tag), "priority": "normal"}) for i in range(n)]
    ids = [item.id for item in items]
    spy = None
    if os.environ.get("BENCH_PYSPY"):  # profile the worker during this phase (py-spy installed)
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "-p",
                str(workers[0]),
                "-d",
                "12",
                "-r",
                os.environ.get("BENCH_PYSPY_RATE", "40"),
                "-f",
                "raw",
                "-o",
                os.environ["BENCH_PYSPY"],
                "--nonblocking",
                *os.environ.get("BENCH_PYSPY_ARGS", "").split(),  # e.g. --gil
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    assert sim.process is not None
    sim_pid = sim.process.pid
    cpu0 = sum(cpu_s(w) for w in workers)
    sim0 = cpu_s(sim_pid)
    box0 = box_busy()
    t0 = time.time()
    client._enqueue(items)  # as submit_many sends a burst: one pipeline, then the rows
    sent = dict.fromkeys(ids, time.time())
    t_sent = time.time()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with session_scope(db_url) as session:
            done = session.scalar(
                select(func.count()).where(Request.id.in_(ids), Request.finished_at.is_not(None))
            )
        if done >= n:
            break
        time.sleep(0.2)
    with session_scope(db_url) as session:
        rows = session.execute(
            select(Request.id, Request.status, Request.first_token_at, Request.finished_at).where(
                Request.id.in_(ids)
            )
        ).all()
    cpu = sum(cpu_s(w) for w in workers) - cpu0
    sim_cpu = cpu_s(sim_pid) - sim0
    box1 = box_busy()
    busy = (box1[0] - box0[0]) / max(box1[1] - box0[1], 1.0)
    if spy is not None:
        spy.wait()
    floor_burst = [ms / 1000 for ms in celery_floor().measure_burst(n)]  # stock Celery, 1 process
    finished = {row.id: row.finished_at.timestamp() for row in rows if row.finished_at}
    each = [finished[rid] - sent[rid] for rid in finished]
    start = [row.first_token_at.timestamp() - sent[row.id] for row in rows if row.first_token_at]
    succeeded = {row.id for row in rows if row.status == "succeeded"}
    lost = 0
    chunks = 0
    why: collections.Counter[str] = collections.Counter()
    # A row ends before its last message is published (a subscriber that sees `done` can read
    # the finished row): give the last few streams' `done` a moment before counting losses.
    settle = time.monotonic() + 10
    while time.monotonic() < settle:
        with r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.xrevrange(keys.of(client.settings).replay_log(rid), count=1)
            last = pipe.execute()
        if all(e and orjson.loads(e[0][1][b"m"])["type"] in ("done", "error") for e in last):
            break
        time.sleep(0.2)
    with r.pipeline(transaction=False) as pipe:
        for rid in ids:
            pipe.xrange(keys.of(client.settings).replay_log(rid))
        logs = pipe.execute()
    for rid, entries in zip(ids, logs, strict=True):
        msgs = [orjson.loads(fields[b"m"]) for _, fields in entries]
        tokens = sum(1 for m in msgs if m["type"] == "token")
        chunks += tokens
        ok = (
            rid in succeeded
            and [m["seq"] for m in msgs] == list(range(len(msgs)))
            and tokens == 50
            and msgs[-1]["type"] == "done"
        )
        lost += not ok
        if not ok:
            status = next((row.status for row in rows if row.id == rid), "no row")
            why[f"{status}, {tokens} tokens, last {msgs[-1]['type'] if msgs else 'none'}"] += 1
    if why:
        print(f"not complete: {dict(why)}", flush=True)
    return {
        "sim_wall": alone["wall"],
        "sim_each_p50": alone["each_p50"],
        "sim_each_max": alone["each_max"],
        "send": t_sent - t0,
        "floor_start_p50": pct(floor_burst, 0.5),
        "floor_start_max": max(floor_burst),
        "wall": (max(finished.values()) - t0) if finished else float("nan"),
        "after_send": (max(finished.values()) - t_sent) if finished else float("nan"),
        "each_p50": pct(each, 0.5),
        "each_max": max(each) if each else float("nan"),
        "start_p50": pct(start, 0.5),
        "start_max": max(start) if start else float("nan"),
        "box_busy": busy,
        "sim_cpu_s": sim_cpu,
        "completed": float(len(succeeded)),
        "lost": float(lost),
        "cpu_s": cpu,
        "cpu_us_chunk": cpu / max(chunks, 1) * 1e6,
    }


def med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def table(lat: list[dict[str, float]], conc: list[dict[str, float]], n: int) -> list[list[str]]:
    """The README's table: medians over the runs, Sheepdog against the baseline of each run."""
    rows = [["", "direct (baseline)", "through Sheepdog", "added / ratio"]]
    if lat:
        for name, key in (("TTFT p50", "ttft_p50"), ("TTFT p99", "ttft_p99")):
            d, t, a = (
                med(lat, f"direct_{key}"),
                med(lat, f"sheepdog_{key}"),
                med(lat, f"added_{key}"),
            )
            rows.append([name, f"{d:.2f} ms", f"{t:.2f} ms", f"+{a:.2f} ms"])
        for name, key in (
            ("per-chunk p50", "added_chunk_p50"),
            ("per-chunk p99", "added_chunk_p99"),
        ):
            rows.append([name + " (added)", "5 ms apart", "", f"+{med(lat, key):.3f} ms"])
        rows.append(
            [
                "per-chunk p99, direct vs direct again",
                f"+{med(lat, 'noise_chunk_p99'):.3f} ms",
                "",
                "(the metric's noise floor)",
            ]
        )
        rows.append(
            [
                "per-chunk relay p50 / p99",
                "",
                f"{med(lat, 'relay_p50'):.3f} / {med(lat, 'relay_p99'):.3f} ms",
                "provider chunk in -> subscriber",
            ]
        )
        rows.append(
            [
                "  bare PUBLISH -> subscriber p50 / p99",
                f"{med(lat, 'relay_floor_p50'):.3f} / {med(lat, 'relay_floor_p99'):.3f} ms",
                "",
                "the relay's floor here",
            ]
        )
        stages = [
            ("task thread starts", "at_task"),
            ("on the loop", "at_loop"),
            ("claim done", "at_claimed"),
            ("provider's first text", "at_text"),
            ("first token queued", "at_put"),
            ("seen by the subscriber", "at_seen"),
        ]
        for name, key in stages:
            rows.append([f"  TTFT breakdown: {name}", "", f"{med(lat, key):.2f} ms after send", ""])
        rows.append(
            [
                "  stock Celery, send -> no-op task body p50 / p99",
                f"{med(lat, 'celery_floor_p50'):.2f} / {med(lat, 'celery_floor_p99'):.2f} ms",
                "",
                "Celery's own floor here",
            ]
        )
    if conc:
        sim_wall, wall = med(conc, "sim_wall"), med(conc, "wall")
        rows += [
            [f"{n} streams: wall", f"{sim_wall:.2f} s", f"{wall:.2f} s", f"x{wall / sim_wall:.2f}"],
            [
                f"{n} streams: each, submit to done p50 / max",
                f"{med(conc, 'sim_each_p50'):.2f} / {med(conc, 'sim_each_max'):.2f} s",
                f"{med(conc, 'each_p50'):.2f} / {med(conc, 'each_max'):.2f} s",
                f"x{med(conc, 'each_max') / med(conc, 'sim_each_max'):.2f} (max)",
            ],
            [f"{n} streams: sending the messages", "", f"{med(conc, 'send'):.2f} s", ""],
            [
                f"{n} streams: start delay (sent to first token) p50 / max",
                "",
                f"{med(conc, 'start_p50'):.2f} / {med(conc, 'start_max'):.2f} s",
                "",
            ],
            [
                f"  stock Celery, {n} no-op tasks in one send: start p50 / max",
                f"{med(conc, 'floor_start_p50'):.2f} / {med(conc, 'floor_start_max'):.2f} s",
                "",
                "Celery's own floor (1 process)",
            ],
            [
                f"{n} streams: box CPU busy (2 cores) / simulator CPU",
                "",
                f"{med(conc, 'box_busy') * 100:.0f} % / {med(conc, 'sim_cpu_s'):.2f} s",
                "",
            ],
            [
                f"{n} streams: completed / lost",
                "",
                f"{med(conc, 'completed'):.0f} / {max(run['lost'] for run in conc):.0f}",
                "",
            ],
            [
                "worker CPU per chunk",
                "",
                f"{med(conc, 'cpu_us_chunk'):.0f} us ({med(conc, 'cpu_s'):.2f} s)",
                "",
            ],
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--db", choices=["pg", "sqlite"], default="pg")
    parser.add_argument("--runs", type=int, default=3, help="repeat each phase; medians shown")
    parser.add_argument("--skip", choices=["latency", "concurrency"], default=None)
    parser.add_argument("--workers", type=int, default=1, help="stream worker processes")
    parser.add_argument(
        "--rows-ab",
        action="store_true",
        help="latency also without the producer's row write (SHEEPDOG_PRODUCER_WRITES_ROWS=0), "
        "same run, alternating phases",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sheepdog-bench-stream-"))
    db_url = new_pg() if args.db == "pg" else f"sqlite:///{workdir / 'bench.db'}"
    if args.db == "sqlite":
        upgrade(db_url)
    r = redis.Redis.from_url(REDIS)
    r.flushdb()
    config = SimulatorConfig(
        api_key="sk-bench",
        ttft_ms=20,
        chunk_delay_ms=5,
        answer_tokens=(20, 20),
        data_dir=str(workdir / "sim"),
    )
    lat: list[dict[str, float]] = []
    conc: list[dict[str, float]] = []
    with SimulatorProcess(config) as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
        env.update(
            SHEEPDOG_REDIS_URL=REDIS,
            SHEEPDOG_DATABASE_URL=db_url,
            SHEEPDOG_OPENAI_BASE_URL=sim.base_url,
            SHEEPDOG_OPENAI_API_KEY=sim.api_key,
            SHEEPDOG_STREAM_TRACE="1",
        )
        settings = Settings(
            redis_url=REDIS,
            database_url=db_url,
            openai_base_url=sim.base_url,
            openai_api_key=sim.api_key,
        )
        client = Client(settings)
        without_rows = Client(settings.model_copy(update={"producer_writes_rows": False}))
        lat_without: list[dict[str, float]] = []
        procs = [start_worker(env, workdir, i) for i in range(args.workers)]
        procs.append(start_floor_worker(env, workdir))  # Celery's floor, in both phases
        try:
            for run in range(args.runs):
                if args.skip != "latency" and args.rows_ab:
                    lat_without.append(latency(sim, without_rows, r, args.requests))
                    print(f"run {run + 1} latency, no producer row: {fmt(lat_without[-1])}")
                if args.skip != "latency":
                    lat.append(latency(sim, client, r, args.requests))
                    print(f"run {run + 1} latency: {fmt(lat[-1])}", flush=True)
                if args.skip != "concurrency":
                    pids = [p.pid for p in procs[: args.workers]]  # not the floor worker
                    conc.append(concurrency(sim, client, r, pids, args.streams, db_url))
                    print(f"run {run + 1} concurrency: {fmt(conc[-1])}", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    if args.db == "pg":
        drop_pg(db_url)
    if lat_without:
        for key in ("added_ttft_p50", "added_ttft_p99"):
            off = statistics.median(x[key] for x in lat_without)
            on = statistics.median(x[key] for x in lat)
            print(f"producer writes rows, {key}: {off:.2f} ms without -> {on:.2f} ms with")
    rows = table(lat, conc, args.streams)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(
        f"\nstreaming path ({args.db}, {os.cpu_count()} cores, {args.workers} worker process(es),"
        f" medians of {args.runs} runs)"
    )
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in values.items())


if __name__ == "__main__":
    main()
