"""The load generators of bench/bench_api.py: each phase measured through the front door and its
baseline in the same run. HTTP load comes from aiohttp (already a dependency, under the SDK), so
the load generator is not what limits the rates measured."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import aiohttp
import httpx
import orjson
from openai import AsyncOpenAI, DefaultAioHttpClient, OpenAI
from sheepdog_client import Client as HttpClient

from bench.bodies import chat_body
from sheepdog.client import Client as InDeployment


def body(i: int, tag: str, priority: str = "high") -> dict[str, Any]:
    return {**chat_body(i, tag), "priority": priority}


# -- 1. time to first token -------------------------------------------------------------------


def _sdk_first_token(sdk: OpenAI, body: dict[str, Any], **extra: Any) -> float:
    """Seconds from the call to the first content chunk of an SDK stream (read to its end)."""
    t0 = time.perf_counter()
    first = float("nan")
    with sdk.chat.completions.with_streaming_response.create(**body, stream=True, **extra) as resp:
        lines = resp.iter_lines()
        for line in lines:
            # (the front door's first chunk carries the role and an empty content, as OpenAI's)
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - t0
                break
        for _ in lines:
            pass
    return first


def ttft(
    sim_url: str,
    sim_key: str,
    door: HttpClient,
    door_url: str,
    door_key: str,
    local: InDeployment,
    n: int,
    tag: str,
):
    """Seconds from the call to the first token, four ways, interleaved request by request:
    a direct SDK stream to the simulator; the in-deployment client (submit + pub/sub follow);
    the front door through sheepdog-client (POST /v1/requests, then the SSE event stream); the
    same SDK as the direct stream, pointed at the front door's /v1/chat/completions (one call).
    A fifth way is the floor of one HTTP hop: an httpx GET of the front door's /healthz.
    The order turns each round, so each way follows each other way as often: a call that comes
    after Sheepdog sat idle through a direct stream pays ~1.4 ms more here (the processes and
    the box waking), and a fixed order gave that to one way only."""
    sdk = OpenAI(base_url=sim_url, api_key=sim_key, max_retries=0)
    via_door = OpenAI(base_url=door_url + "/v1", api_key=door_key, max_retries=0)
    high = {"extra_headers": {"X-Sheepdog-Priority": "high"}}
    out: dict[str, list[float]] = {
        "direct": [],
        "local": [],
        "door": [],
        "door_post": [],
        "openai": [],
        "hop": [],
    }
    plain = httpx.Client()

    def direct(i: int) -> None:
        out["direct"].append(_sdk_first_token(sdk, chat_body(i, tag + "d")))

    def openai_door(i: int) -> None:
        out["openai"].append(_sdk_first_token(via_door, chat_body(i, tag + "o"), **high))

    def in_deployment(i: int) -> None:
        t0 = time.perf_counter()
        rid = local.submit(body(i, tag + "l"))
        it = iter(local.stream(rid))
        next(it)
        out["local"].append(time.perf_counter() - t0)
        for _ in it:
            pass

    def sheepdog_client(i: int) -> None:
        t0 = time.perf_counter()
        rid = door.submit(body(i, tag + "h"))
        out["door_post"].append(time.perf_counter() - t0)
        stream = door.stream(rid)
        for event in stream:
            if event.type == "token":
                out["door"].append(time.perf_counter() - t0)
                break
        stream.final_text()

    def http_hop(i: int) -> None:
        t0 = time.perf_counter()
        plain.get(door_url + "/healthz").raise_for_status()
        out["hop"].append(time.perf_counter() - t0)

    ways = [direct, openai_door, in_deployment, sheepdog_client, http_hop]
    for i in range(n):
        turn = i % len(ways)
        for way in ways[turn:] + ways[:turn]:
            way(i)
    sdk.close()
    via_door.close()
    plain.close()
    return out


# -- 2. low-priority intake -------------------------------------------------------------------


async def _intake(
    url: str, key: str, bodies: list[tuple[bytes, int]], clients: int
) -> dict[str, Any]:
    """Each body (JSON, requests in it) POSTed once by `clients` keep-alive clients: requests
    accepted, calls refused, each accepted call's latency."""
    latencies: list[float] = []
    refused = accepted = 0
    queue = iter(bodies)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def one_client(session: aiohttp.ClientSession) -> None:
        nonlocal refused, accepted
        for payload, count in queue:
            t0 = time.perf_counter()
            async with session.post(url + "/v1/requests", data=payload, headers=headers) as r:
                await r.read()
                if r.status == 202:
                    latencies.append(time.perf_counter() - t0)
                    accepted += count
                else:
                    refused += 1

    connector = aiohttp.TCPConnector(limit=clients)
    # The bodies and everything imported, out of the collector's sight while the calls are
    # timed: a full collection of this process paused every call under way (60-130 ms).
    gc.collect()
    gc.freeze()
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            t0 = time.perf_counter()
            await asyncio.gather(*(one_client(session) for _ in range(clients)))
            wall = time.perf_counter() - t0
    finally:
        gc.unfreeze()
    return {"wall": wall, "accepted": accepted, "refused": refused, "lat": latencies}


def intake(
    url: str, key: str, local: InDeployment, n: int, clients: int, bulk: int, tag: str
) -> dict[str, Any]:
    one = [(orjson.dumps(body(i, tag + "o", "low")), 1) for i in range(n)]
    lists = [
        (
            orjson.dumps([body(i, tag + "b", "low") for i in range(s, min(n, s + bulk))]),
            min(n, s + bulk) - s,
        )
        for s in range(0, n, bulk)
    ]
    single = asyncio.run(_intake(url, key, one, clients))
    many = asyncio.run(_intake(url, key, lists, min(clients, 4)))
    # Baselines: the in-deployment client in this process, one per call and in lists.
    m = min(n, 1000)
    t0 = time.perf_counter()
    lat = []
    for i in range(m):
        t1 = time.perf_counter()
        local.submit(body(i, tag + "L", "low"))
        lat.append(time.perf_counter() - t1)
    local_one = {"wall": time.perf_counter() - t0, "accepted": m, "lat": lat}
    t0 = time.perf_counter()
    for s in range(0, n, bulk):
        local.submit_many([body(i, tag + "M", "low") for i in range(s, min(n, s + bulk))])
    local_many = {"wall": time.perf_counter() - t0, "accepted": n}
    return {"http_one": single, "http_bulk": many, "local_one": local_one, "local_bulk": local_many}


# -- 3. many event streams at once ------------------------------------------------------------


async def _direct_streams(sim_url: str, sim_key: str, n: int, tag: str) -> tuple[float, int]:
    async def one(sdk: AsyncOpenAI, i: int) -> int:
        chunks = 0
        async with sdk.chat.completions.with_streaming_response.create(
            **chat_body(i, tag), stream=True
        ) as resp:
            async for data in resp.iter_bytes():
                chunks += data.count(b'"content":"')
        return chunks

    http = DefaultAioHttpClient(timeout=300)
    async with AsyncOpenAI(
        base_url=sim_url, api_key=sim_key, max_retries=0, http_client=http
    ) as sdk:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(sdk, i) for i in range(n)))
        return time.perf_counter() - t0, sum(counts)


async def _door_streams(url: str, key: str, n: int, tag: str, bulk: int) -> dict[str, Any]:
    """Submit n streams in lists over HTTP, follow each with its own SSE connection."""
    headers = {"Authorization": f"Bearer {key}"}
    lost = tokens = 0

    async def follow(session: aiohttp.ClientSession, rid: str) -> None:
        nonlocal lost, tokens
        seqs, mine, last = [], 0, ""
        async with session.get(f"{url}/v1/requests/{rid}/events", headers=headers) as resp:
            async for raw in resp.content:
                if raw.startswith(b"data: "):
                    msg = orjson.loads(raw[6:])
                    seqs.append(msg["seq"])
                    last = msg["type"]
                    mine += last == "token"
                    if last in ("done", "error"):
                        break
        tokens += mine
        lost += not (last == "done" and mine == 50 and seqs == list(range(len(seqs))))

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        ids: list[str] = []
        for s in range(0, n, bulk):
            payload = orjson.dumps([body(i, tag) for i in range(s, min(n, s + bulk))])
            async with session.post(
                url + "/v1/requests",
                data=payload,
                headers={**headers, "Content-Type": "application/json"},
            ) as r:
                ids += (await r.json())["ids"]
        await asyncio.gather(*(follow(session, rid) for rid in ids))
        wall = time.perf_counter() - t0
    return {"wall": wall, "lost": lost, "tokens": tokens}


async def _local_streams(local: InDeployment, n: int, tag: str) -> tuple[float, int]:
    """The same n streams without the front door: submit_many in this process, each followed
    through the in-deployment client's asyncio reader (the replay log, one Redis connection)."""

    async def follow(rid: str) -> int:
        return sum([1 async for _ in local.astream(rid, timeout=300)])

    t0 = time.perf_counter()
    ids = await asyncio.to_thread(local.submit_many, [body(i, tag) for i in range(n)])
    counts = await asyncio.gather(*(follow(rid) for rid in ids))
    return time.perf_counter() - t0, sum(counts)


def streams(sim, url: str, key: str, local: InDeployment, n: int, tag: str, cpu_of_api):  # type: ignore[no-untyped-def]
    sim.configure(ttft_ms=0, chunk_delay_ms=100, answer_tokens=[50, 50])
    alone, chunks = asyncio.run(_direct_streams(sim.base_url, sim.api_key, n, tag + "s"))
    local_wall, local_tokens = asyncio.run(_local_streams(local, n, tag + "l"))
    cpu0 = cpu_of_api()
    door = asyncio.run(_door_streams(url, key, n, tag + "f", 500))
    door["api_cpu_s"] = cpu_of_api() - cpu0
    door["sim_wall"], door["sim_chunks"] = alone, chunks
    door["local_wall"], door["local_tokens"] = local_wall, local_tokens
    return door
