"""Delete what a real-broker test declared. The real Redis and RabbitMQ are shared with later
sessions and CI runs: a test leaves no queue, message, exchange or key of its own behind."""

from __future__ import annotations

from conftest import real_broker_url


def forget(kind: str, queue: str, *redis_keys: str) -> int:
    """Delete ``queue`` and what declaring it left on the real broker (the exchange Celery
    named after it; kombu's binding keys on Redis) and ``redis_keys``; return how many
    messages the queue held."""
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(real_broker_url("redis"))
        try:
            depth: int = client.llen(queue)
            bindings = [key for key in client.scan_iter(f"_kombu.binding*.{queue}")]
            client.delete(queue, *redis_keys, *bindings)
        finally:
            client.close()
        return depth
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(real_broker_url("amqp"), connect_timeout=2) as conn:
        channel = conn.channel()
        try:
            depth = channel.queue_declare(queue, passive=True).message_count
        except NotFound:  # closes the channel
            depth, channel = 0, conn.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(queue)
    return depth
