"""Taking what a consumer has without waiting for a batch to fill.

librdkafka's `consume(n, timeout)` returns only when n messages are there or the timeout has passed, so at
a low rate every message would wait the whole timeout. `available` blocks for the first message only and
then takes whatever else is already buffered: the worker's loop and the readers that time a pipeline use it.
"""

from __future__ import annotations

from confluent_kafka import Consumer, Message


def available(consumer: Consumer, max_messages: int, wait_s: float) -> list[Message]:
    """Up to `max_messages`: block at most `wait_s` for the first one, then take what is buffered now."""
    first = consumer.poll(wait_s)
    if first is None:
        return []
    if max_messages <= 1:
        return [first]
    return [first, *consumer.consume(max_messages - 1, timeout=0)]
