"""`omnirouter bench pipeline`: throughput, latency and memory of a router worker on Kafka.

One run, on this machine, against a local broker and PostgreSQL:
1. raw embedding throughput of short queries of both embedders (the chosen one's is
   the ceiling the pipeline is held to), measured before the pipeline runs and
   again after it, since a shared machine's speed drifts within minutes; the mean
   of the two is the ceiling;
2. a router process whose retrieval store holds N outcomes (synthetic vectors);
3. throughput: queries produced as fast as possible; the steady rate is the
   queries assigned after the first window over the time from the first window
   to the last (what the stages sustain, the target), the burst rate the whole
   burst over produce -> last assignment (which also holds one window's latency);
4. latency: queries produced at half that rate, produce -> assignment per query;
5. the routers' peak resident memory (VmHWM), the largest of them.
With `--routers N`, N router processes share the work as one consumer group
(the burst starts once all N have joined it); on a 2-core machine they compete
for the same cores, so the figure says what one machine gives, not how the
group scales across machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from schemas import Outcome, QueryEvent
from workers.config import ROUTER_APP_ID, Settings, environment_for_workers, load_settings
from workers.db import migrate
from workers.db.repository import upsert_outcomes
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import EMBEDDER_KINDS, Embedder, make_embedder
from workers.services import LocalBroker, throwaway_postgres
from workers.stream.kafka_io import group_state, topic_partitions
from workers.stream.replay import produce_queries
from workers.stream.topics import create_topics

SHORT_QUERY_CHARS = 160
RAW_EMBEDDING_CALL = 256  # ROUTER_PREDICT_BATCH's default
RAW_EMBEDDING_SECONDS = 15.0


@dataclass(frozen=True)
class PipelineFigures:
    embedder: str  # the routers' (ROUTER_EMBEDDER)
    raw_embedding_qps: float  # the routers' embedder: mean of before and after
    raw_embedding_qps_before: float
    raw_embedding_qps_after: float
    raw_embedding_qps_by_embedder: dict[str, float]  # every embedder, mean of both
    pipeline_qps: float  # steady rate, compared with the raw embedding rate
    burst_qps: float  # first produce -> last assignment
    latency_p50_seconds: float
    latency_p99_seconds: float
    window_seconds: float
    router_peak_rss_mb: float
    outcomes_in_store: int
    queries: int
    routers: int
    # CPU time the routers spent per query of the burst (all their threads): what a
    # core's worth of routers sustains, whatever else the machine is running.
    router_cpu_ms_per_query: float


def short_queries(count: int, run: str) -> list[QueryEvent]:
    """Short real questions: the ends of the shipped sample's prompts, cycled."""
    prompts = load_routerbench(shipped_sample_path()).prompts
    return [
        QueryEvent(query_id=f"{run}-{i}", text=prompts[i % len(prompts)][-SHORT_QUERY_CHARS:])
        for i in range(count)
    ]


def synthetic_outcomes(
    count: int, models: Sequence[str], dimension: int, chunk: int = 5000, seed: int = 0
) -> Iterator[tuple[list[Outcome], NDArray[np.float32]]]:
    """`count` past queries in chunks, each answered by one model (in turn), with
    random unit vectors."""
    rng = np.random.default_rng(seed)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        vectors = rng.normal(size=(size, dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        outcomes = [
            Outcome(
                query_id=f"past-{start + i}",
                model=models[(start + i) % len(models)],
                quality_score=float(rng.integers(0, 2)),
                cost_usd=float(rng.uniform(1e-5, 5e-3)),
                output_tokens=int(rng.integers(1, 400)),
            )
            for i in range(size)
        ]
        yield outcomes, vectors


def seed_synthetic_outcomes(
    engine: sa.Engine, count: int, models: list[str], embedder: Embedder
) -> None:
    """`count` synthetic past outcomes in the database, their vectors labelled as the
    embedder's (the routers then re-embed nothing)."""
    for outcomes, vectors in synthetic_outcomes(count, models, embedder.dimension):
        with Session(engine) as session, session.begin():
            upsert_outcomes(session, outcomes, list(vectors), embedder.name)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def main_thread_cpu_seconds(pids: list[int]) -> float:
    """CPU time of the processes' main threads (each router's event loop: Faust, the
    stages, the producer), which one core bounds whatever the other threads do."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time (user + system) of each live thread of the process, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            times[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return times


@dataclass(frozen=True)
class CpuShares:
    """Where the machine's CPU goes while the benchmark runs: every process of it
    (each router's event loop apart from its other threads), each one's CPU time
    over a span divided by the queries of that span. On a 2-core machine their sum
    bounds the rate: 2,000 queries/s leaves 1 ms of CPU per query in all."""

    processes: dict[str, list[int]]  # name -> pids
    split: frozenset[str] = frozenset({"router"})  # names whose main thread is apart

    def sample(self) -> dict[str, float]:
        seconds: dict[str, float] = defaultdict(float)
        for name, pids in self.processes.items():
            for pid in pids:
                try:
                    threads = thread_cpu_seconds(pid)
                except OSError:  # a process that ended meanwhile
                    continue
                rest = name
                if name in self.split:
                    seconds[f"{name}, event loop"] += threads.pop(pid, 0.0)
                    rest = f"{name}, other threads"
                seconds[rest] += sum(threads.values())
        return dict(seconds)

    @staticmethod
    def per_query_ms(
        before: dict[str, float], after: dict[str, float], queries: int
    ) -> dict[str, float]:
        return {k: (after[k] - before.get(k, 0.0)) * 1000 / queries for k in after}


def cpu_table(per_query_ms: dict[str, float]) -> list[str]:
    """The per-process CPU figures as lines of one table, with their sum."""
    lines = [f"  {name:<32}{ms:6.3f} ms" for name, ms in per_query_ms.items()]
    total = sum(per_query_ms.values())
    lines.append(f"  {'all of the above':<32}{total:6.3f} ms (2 cores: {2000 / total:.0f}/s)")
    return lines


def database_backends(engine: sa.Engine) -> list[int]:
    """The PostgreSQL server processes serving the benchmark's database."""
    query = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
    with engine.connect() as connection:
        return [int(pid) for pid in connection.execute(sa.text(query)).scalars()]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def router_processes(
    env: dict[str, str], log_dir: Path, count: int
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` router workers, one consumer group, each with its own log."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for number in range(count):
            with open(log_dir / f"router-{number}.log", "wb") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "workers.cli", "router", "--loglevel", "warning"],
                        env={**env, "METRICS_PORT": "0"} if number else env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


async def wait_for_group_members(bootstrap: str, group: str, count: int, timeout: float) -> None:
    """Until the consumer group is stable with `count` members (every router joined)."""
    deadline = time.monotonic() + timeout
    while (state := await group_state(bootstrap, group)) != ("Stable", count):
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group} is {state}, not stable with {count} members")
        await asyncio.sleep(0.5)


class Stamps:
    """Producer timestamps (ms) of records on some topics, read incrementally by one
    consumer that owns every partition (no group, no re-reading)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.seen: dict[str, int] = {}  # query_id -> timestamp

    async def __aenter__(self) -> Stamps:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None
        )
        await self.consumer.start()
        partitions = await topic_partitions(self.consumer, self.topics)
        self.consumer.assign(partitions)
        await self.consumer.seek_to_beginning(*partitions)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.consumer.stop()

    async def wait_for(self, ids: list[str], timeout_seconds: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_seconds
        wanted = set(ids)
        while not wanted <= self.seen.keys():
            if time.monotonic() > deadline:
                missing = len(wanted - self.seen.keys())
                raise TimeoutError(
                    f"{missing} of {len(wanted)} records missing after {timeout_seconds}s"
                )
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    key = (record.key or b"").decode()
                    self.seen.setdefault(key, record.timestamp)
        return {i: self.seen[i] for i in ids}


def steady_rate(assigned_ms: list[int], window_seconds: float) -> float:
    """Queries assigned after the first window / time from the first window to the
    last: whole windows only, so neither the start nor the last window's wait counts."""
    times = sorted(assigned_ms)
    first_window_end = times[0] + window_seconds * 1000 / 2
    after_first = sum(1 for t in times if t > first_window_end)
    return after_first / ((times[-1] - times[0]) / 1000)


async def measure(
    bootstrap: str,
    settings: Settings,
    queries: int,
    routers: int,
    router_pids: list[int],
    progress: Callable[[str], None],
    broker_pid: int | None = None,
    database_pids: Callable[[], list[int]] = list,
) -> tuple[float, float, float, NDArray[np.float64]]:
    """Throughput of a burst, then produce -> assignment latency at half that rate,
    both from the producers' record timestamps."""
    names = settings.topic_names()
    route_topics = [names[f"route:{m}"] for m in settings.router_models]
    async with (
        Stamps(bootstrap, route_topics) as assigned,
        Stamps(bootstrap, [names["queries"]]) as sent,
    ):
        warm = short_queries(20, "warm")
        await produce_queries(bootstrap, names["queries"], warm, 0)
        await assigned.wait_for([q.query_id for q in warm], 600)
        await wait_for_group_members(bootstrap, ROUTER_APP_ID, routers, 600)
        progress(f"{routers} router(s) ready")

        burst = short_queries(queries, f"tp{uuid.uuid4().hex[:6]}")
        brokers = [broker_pid] if broker_pid else []
        cpu_before, broker_cpu_before = cpu_seconds(router_pids), cpu_seconds(brokers)
        loop_cpu_before = main_thread_cpu_seconds(router_pids)
        shares = CpuShares(
            {
                "router": router_pids,
                "broker": brokers,
                "benchmark (producer, readers)": [os.getpid()],
                "PostgreSQL (its backends)": database_pids(),
            }
        )
        shares_before = shares.sample()
        produced_seconds = await produce_queries(bootstrap, names["queries"], burst, 0)
        ids = [q.query_id for q in burst]
        done, started = await assigned.wait_for(ids, 900), await sent.wait_for(ids, 60)
        cpu_ms_per_query = (cpu_seconds(router_pids) - cpu_before) * 1000 / queries
        broker_ms = (cpu_seconds(brokers) - broker_cpu_before) * 1000 / queries
        loop_ms = (main_thread_cpu_seconds(router_pids) - loop_cpu_before) * 1000 / queries
        shares_ms = CpuShares.per_query_ms(shares_before, shares.sample(), queries)
        elapsed = (max(done.values()) - min(started.values())) / 1000
        burst_qps = queries / elapsed
        pipeline_qps = steady_rate(list(done.values()), settings.router_window_seconds)
        # The producer's rate says whether the burst was a backlog for the routers
        # (it must be far above the steady rate); the broker's CPU is its share of
        # the machine (it also carries the benchmark's own reads).
        progress(
            f"pipeline: {queries} queries in {elapsed:.1f}s = {burst_qps:.0f}/s; "
            f"steady {pipeline_qps:.0f}/s; produced in {produced_seconds:.1f}s "
            f"({queries / produced_seconds:.0f}/s); CPU per query: routers "
            f"{cpu_ms_per_query:.2f} ms (event loops {loop_ms:.2f} ms), broker {broker_ms:.2f} ms"
        )
        progress("CPU per query of the burst, by process:")
        for line in cpu_table(shares_ms):
            progress(line)

        steady = short_queries(max(200, queries // 4), f"lat{uuid.uuid4().hex[:6]}")
        await produce_queries(bootstrap, names["queries"], steady, pipeline_qps / 2)
        ids = [q.query_id for q in steady]
        done, started = await assigned.wait_for(ids, 900), await sent.wait_for(ids, 60)
        latencies = np.array([(done[i] - started[i]) / 1000 for i in ids])
    return pipeline_qps, burst_qps, cpu_ms_per_query, latencies


def raw_embedding_rates(
    embedders: dict[str, Embedder], texts: list[str], when: str, progress: Callable[[str], None]
) -> dict[str, float]:
    """Short queries a second that each embedder embeds, in calls of the router's
    micro-batch size, for all texts or RAW_EMBEDDING_SECONDS (MiniLM is slow)."""
    rates = {}
    for kind, embedder in embedders.items():
        embedder.embed(texts[:64])  # warm up
        embedded, started = 0, time.perf_counter()
        for start in range(0, len(texts), RAW_EMBEDDING_CALL):
            embedded += len(embedder.embed(texts[start : start + RAW_EMBEDDING_CALL]))
            if time.perf_counter() - started > RAW_EMBEDDING_SECONDS:
                break
        rates[kind] = embedded / (time.perf_counter() - started)
        progress(f"raw embedding, {kind}, {when}: {rates[kind]:.0f} short queries/s")
    return rates


def run(
    queries: int = 20_000,
    outcomes_in_store: int = 100_000,
    window_seconds: float = 1.0,
    routers: int = 1,
    embedder_kind: str = "static",
    log_dir: Path = Path(".omnirouter/bench"),
    progress: Callable[[str], None] = print,
) -> PipelineFigures:
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings()
    cache_dir = Path(settings.embedder_cache_dir)
    embedders = {kind: make_embedder(kind, cache_dir) for kind in EMBEDDER_KINDS}
    texts = [q.text for q in short_queries(2000, "raw")]
    before = raw_embedding_rates(embedders, texts, "before the pipeline", progress)

    with LocalBroker() as broker, throwaway_postgres() as database_url:
        migrate.upgrade(database_url)
        asyncio.run(create_topics(settings, broker.bootstrap_servers))
        engine = sa.create_engine(database_url)
        seed_synthetic_outcomes(
            engine, outcomes_in_store, settings.router_models, embedders[embedder_kind]
        )
        progress(f"stored {outcomes_in_store} synthetic outcomes")
        # The routers route under the default policy, not an exported one.
        env = environment_for_workers(
            {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "DATABASE_URL": database_url,
                "ROUTER_WINDOW_SECONDS": str(window_seconds),
                "ROUTER_REFIT_SECONDS": "3600",
                "ROUTER_REFIT_GROWTH": "0",
                "ROUTER_EMBEDDER": embedder_kind,
                "EMBEDDER_CACHE_DIR": str(cache_dir.resolve()),
            }
        )
        with router_processes(env, log_dir, routers) as processes:
            pipeline_qps, burst_qps, cpu_ms, latencies = asyncio.run(
                measure(
                    broker.bootstrap_servers,
                    settings.model_copy(update={"router_window_seconds": window_seconds}),
                    queries,
                    routers,
                    [process.pid for process in processes],
                    progress,
                    broker._process.pid if broker._process else None,
                    partial(database_backends, engine),
                )
            )
            rss = max(peak_rss_mb(process.pid) for process in processes)
    after = raw_embedding_rates(embedders, texts, "after the pipeline", progress)
    return PipelineFigures(
        embedder=embedders[embedder_kind].name,
        raw_embedding_qps=(before[embedder_kind] + after[embedder_kind]) / 2,
        raw_embedding_qps_before=before[embedder_kind],
        raw_embedding_qps_after=after[embedder_kind],
        raw_embedding_qps_by_embedder={k: (before[k] + after[k]) / 2 for k in embedders},
        pipeline_qps=pipeline_qps,
        burst_qps=burst_qps,
        latency_p50_seconds=float(np.percentile(latencies, 50)),
        latency_p99_seconds=float(np.percentile(latencies, 99)),
        window_seconds=window_seconds,
        router_peak_rss_mb=rss,
        outcomes_in_store=outcomes_in_store,
        queries=queries,
        routers=routers,
        router_cpu_ms_per_query=cpu_ms,
    )
