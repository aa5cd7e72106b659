"""One Redis pub/sub subscription per process, fanned out to the greenlets (or threads) waiting in it: a waiter
asks for the event of a key (a slot grant's token, an ended job's id) and sleeps on it until the key is
published on the channel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

log = logging.getLogger(__name__)

SUBSCRIBE_WAIT_SECONDS = 1.0  # how long a first waiter waits for the subscription to be in place


class Fanout:
    """Listens on ``channel`` (from the first waiter on) and sets the events of the keys published there."""

    def __init__(self, client: redis.Redis, channel: str):
        self.client = client
        self.channel = channel
        self._events: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: redis.client.PubSub | None = None
        self._closed = False

    @contextmanager
    def expecting(self, key: str) -> Iterator[threading.Event]:
        """An event set when ``key`` is published, from now until the block ends. Enter it before reading the
        state the key announces a change of, so that a change between the read and the wait is not missed."""
        event = self.expect(key)
        try:
            yield event
        finally:
            self.forget(key, event)

    def expect(self, key: str) -> threading.Event:
        """The event set when ``key`` is published (``forget`` it when done)."""
        event = threading.Event()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._subscribed.clear()
                self._thread = threading.Thread(target=self._listen, name=f"fanout:{self.channel}", daemon=True)
                self._thread.start()
            self._events.setdefault(key, set()).add(event)
        self._subscribed.wait(SUBSCRIBE_WAIT_SECONDS)
        return event

    def forget(self, key: str, event: threading.Event) -> None:
        with self._lock:
            waiting = self._events.get(key)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[key]

    def close(self) -> None:
        """Stop listening for good: the subscription's connection closes and its thread ends. Waiters still
        expecting a key time out and read the state themselves."""
        with self._lock:
            self._closed = True
            pubsub = self._pubsub
        if pubsub is not None:
            pubsub.close()  # the listener's blocked read fails, and it sees the fanout closed
        self.client.close()

    def _listen(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._pubsub = pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                for message in pubsub.listen():
                    if message.get("type") == "subscribe":
                        self._subscribed.set()
                        continue
                    if message.get("type") != "message":
                        continue
                    data = message.get("data")
                    key = data.decode() if isinstance(data, bytes) else str(data)
                    with self._lock:
                        events = list(self._events.get(key, ()))
                    for event in events:
                        event.set()
            except Exception as exc:  # waiters time out meanwhile and read the state themselves
                self._subscribed.clear()
                if self._closed:
                    return
                if not isinstance(exc, redis.RedisError):
                    raise
                log.warning("subscription to %s lost (%s); subscribing again", self.channel, exc)
                time.sleep(0.5)
            finally:
                pubsub.close()
