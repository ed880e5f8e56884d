"""Publish throughput of the two brokers, confirmed (durable) publishes of small WorkItems.

    .venv/bin/python bench/broker_publish.py [--amqp URL] [--runs 3]

Rows: RabbitMQ with one publish awaited at a time (a confirm round trip each), RabbitMQ with 256
concurrent publishers sharing pipelined confirms, and the embedded queue's file (serial and 256
concurrent; its one thread commits what waits together). That file takes the publishes of a
process that does not consume the route (a replay beside the engine, the start-up rebuild); a
route the process consumes is queued in memory. Prints the median of
``--runs`` runs. Queues are created under a throw-away instance prefix and deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pika

from medcourier.engine.broker import Broker, WorkItem, exchange_name, queue_name
from medcourier.engine.broker.amqp import AmqpBroker, amqp_parameters
from medcourier.engine.broker.embedded import EmbeddedBroker

ROUTE = "bench"


async def publish_rate(broker: Broker, total: int, concurrency: int) -> float:
    """Items confirmed per second with ``concurrency`` publishers each awaiting its own publish."""
    await broker.start([ROUTE])
    try:
        counter = iter(range(total))

        async def publisher() -> None:
            for i in counter:
                await broker.publish(WorkItem(f"tx-{i:08d}-{uuid.uuid4().hex[:12]}", ROUTE))

        started = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        await broker.purge(ROUTE)
        return total / elapsed
    finally:
        await broker.close()


def median_rate(make: Callable[[], Broker], total: int, concurrency: int, runs: int) -> float:
    return statistics.median(
        asyncio.run(publish_rate(make(), total, concurrency)) for _ in range(runs)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    instance = f"mcbench-{uuid.uuid4().hex[:8]}"
    rows: list[tuple[str, int, float]] = []
    try:

        def amqp() -> Broker:
            return AmqpBroker(args.amqp, instance)

        rows.append(
            (
                "RabbitMQ (pika async), 1 publish awaited at a time",
                1,
                median_rate(amqp, 3_000, 1, args.runs),
            )
        )
        rows.append(
            (
                "RabbitMQ (pika async), 256 concurrent publishers",
                256,
                median_rate(amqp, 30_000, 256, args.runs),
            )
        )
    finally:
        connection = pika.BlockingConnection(amqp_parameters(args.amqp))
        channel = connection.channel()
        channel.queue_delete(queue_name(instance, ROUTE))
        channel.exchange_delete(exchange_name(instance))
        connection.close()

    with tempfile.TemporaryDirectory() as tmp:

        def embedded() -> Broker:
            return EmbeddedBroker(Path(tmp) / "queue.sqlite", instance)

        rows.append(
            (
                "embedded queue file, 1 publish awaited at a time",
                1,
                median_rate(embedded, 1_000, 1, args.runs),
            )
        )
        rows.append(
            (
                "embedded queue file, 256 concurrent publishers",
                256,
                median_rate(embedded, 2_000, 256, args.runs),
            )
        )

    width = max(len(name) for name, _, _ in rows)
    print(f"{'broker / publishers':<{width}}  {'in flight':>9}  {'publishes/s':>11}")
    for name, concurrency, rate in rows:
        print(f"{name:<{width}}  {concurrency:>9}  {rate:>11,.0f}")
    print(f"(small WorkItems, confirmed/committed; median of {args.runs} runs)")


if __name__ == "__main__":
    main()
