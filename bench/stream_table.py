"""bench_stream.py's printed table (the README's): medians over the runs, Sheepdog against the
baseline of each run."""

from __future__ import annotations

from bench.report import med

Runs = list[dict[str, float]]

STAGE_NAMES = (
    ("task thread starts", "at_task"),
    ("on the loop", "at_loop"),
    ("claim done", "at_claimed"),
    ("provider's first text", "at_text"),
    ("first token queued", "at_put"),
    ("seen by the subscriber", "at_seen"),
)


def ttft_rows(lat: Runs) -> list[list[str]]:
    """TTFT and per-chunk delay, direct and through Sheepdog."""
    rows = []
    for name, key in (("TTFT p50", "ttft_p50"), ("TTFT p99", "ttft_p99")):
        d, t, a = med(lat, f"direct_{key}"), med(lat, f"sheepdog_{key}"), med(lat, f"added_{key}")
        rows.append([name, f"{d:.2f} ms", f"{t:.2f} ms", f"+{a:.2f} ms"])
    for name, key in (("per-chunk p50", "added_chunk_p50"), ("per-chunk p99", "added_chunk_p99")):
        rows.append([name + " (added)", "5 ms apart", "", f"+{med(lat, key):.3f} ms"])
    noise = f"+{med(lat, 'noise_chunk_p99'):.3f} ms"
    rows.append(["per-chunk p99, direct vs direct again", noise, "", "(the metric's noise floor)"])
    return rows


def relay_rows(lat: Runs) -> list[list[str]]:
    """The per-chunk relay, against a bare PUBLISH."""
    relay = f"{med(lat, 'relay_p50'):.3f} / {med(lat, 'relay_p99'):.3f} ms"
    bare = f"{med(lat, 'relay_floor_p50'):.3f} / {med(lat, 'relay_floor_p99'):.3f} ms"
    return [
        ["per-chunk relay p50 / p99", "", relay, "provider chunk in -> subscriber"],
        ["  bare PUBLISH -> subscriber p50 / p99", bare, "", "the relay's floor here"],
    ]


def stage_rows(lat: Runs) -> list[list[str]]:
    """The TTFT breakdown, against stock Celery's send -> task body."""
    rows = [
        [f"  TTFT breakdown: {name}", "", f"{med(lat, key):.2f} ms after send", ""]
        for name, key in STAGE_NAMES
    ]
    floor = f"{med(lat, 'celery_floor_p50'):.2f} / {med(lat, 'celery_floor_p99'):.2f} ms"
    rows.append(
        ["  stock Celery, send -> no-op task body p50 / p99", floor, "", "Celery's own floor here"]
    )
    return rows


def burst_rows(conc: Runs, n: int) -> list[list[str]]:
    """The n streams at once, against the simulator alone and stock Celery's burst."""
    sim_wall, wall = med(conc, "sim_wall"), med(conc, "wall")
    return [
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
    ]


def cost_rows(conc: Runs, n: int) -> list[list[str]]:
    """What the burst cost the box and the worker, and what it lost."""
    return [
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
        [
            "  of which the Celery consumer / the stream engine",
            "",
            f"{med(conc, 'consumer_us_chunk'):.0f} / {med(conc, 'engine_us_chunk'):.0f} us",
            "",
        ],
    ]


SHEEPDOG_GROUPS = {
    "producer": "producer",
    "consumer": "consumer",
    "engine": "engine",
    "postgres": "PostgreSQL",
    "redis": "Redis",
}


def cpu_by_process_row(std: Runs, rate: float) -> list[str]:
    """CPU ms a stream by process: the direct run's client and simulator; through Sheepdog
    its own processes, the servers it uses, and the simulator."""
    direct = ", ".join(
        f"{k} {med(std, f'steady_direct_ms_{k}'):.2f}" for k in ("client", "simulator")
    )
    ours = ", ".join(f"{v} {med(std, f'steady_ms_{k}'):.2f}" for k, v in SHEEPDOG_GROUPS.items())
    own = sum(med(std, f"steady_ms_{k}") for k in SHEEPDOG_GROUPS)
    return [
        f"{rate:.0f} streams/s: CPU ms a stream",
        direct,
        f"{ours}; simulator {med(std, 'steady_ms_simulator'):.2f}",
        f"Sheepdog's {own:.2f} ms",
    ]


def steady_rows(std: Runs, rate: float) -> list[list[str]]:
    """The steady load, against the same load served directly."""
    rows = []
    for q in ("p50", "p99"):
        d, t, a = (
            med(std, f"steady_direct_{q}"),
            med(std, f"steady_{q}"),
            med(std, f"steady_added_{q}"),
        )
        rows.append(
            [f"{rate:.0f} streams/s: TTFT {q}", f"{d:.2f} ms", f"{t:.2f} ms", f"+{a:.2f} ms"]
        )
    if all("steady_floor_p50" in x for x in std):
        rows.append(
            [
                f"{rate:.0f} streams/s: floor, stock Celery no-op p50 / p99",
                "",
                f"{med(std, 'steady_floor_p50'):.2f} / {med(std, 'steady_floor_p99'):.2f} ms",
                "sent -> body, same load",
            ]
        )
    queue = (
        f"{med(std, 'steady_queue_first10'):.0f} / {med(std, 'steady_queue_last10'):.0f}"
        f" (max {med(std, 'steady_queue_max'):.0f})"
    )
    done = f"{med(std, 'steady_done'):.0f} of {med(std, 'steady_sent'):.0f}"
    rows += [
        [f"{rate:.0f} streams/s: queue, first / last 10 s", "", queue, "messages waiting"],
        [
            f"{rate:.0f} streams/s: sent at / succeeded",
            "",
            f"{med(std, 'steady_rate'):.0f}/s, {done}",
            "",
        ],
        [
            f"{rate:.0f} streams/s: box CPU busy / worker CPU per chunk",
            "",
            f"{med(std, 'steady_box_busy') * 100:.0f} % / {med(std, 'steady_cpu_us_chunk'):.0f} us",
            "",
        ],
    ]
    if all("steady_ms_producer" in x for x in std):
        rows.append(cpu_by_process_row(std, rate))
    return rows


def table(
    lat: Runs, conc: Runs, n: int, std: Runs | None = None, rate: float = 200.0
) -> list[list[str]]:
    """The README's table: medians over the runs, Sheepdog against the baseline of each run."""
    rows = [["", "direct (baseline)", "through Sheepdog", "added / ratio"]]
    if lat:
        rows += ttft_rows(lat) + relay_rows(lat) + stage_rows(lat)
    if conc:
        rows += burst_rows(conc, n) + cost_rows(conc, n)
    if std:
        rows += steady_rows(std, rate)
    return rows
