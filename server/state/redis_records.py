"""Prompt records in Redis, shared by every replica of one server.

Layout (``P`` is the key prefix, ``reprogram:`` by default):

- ``P prompts``: a hash, prompt id -> JSON ``{"sha256", "owners", "created"}`` (the head);
- ``P prompt:{id}``: the prompt file's bytes.

A prompt is written with both keys in one ``MULTI``/``EXEC`` transaction, and removed the same
way, so no replica ever sees a head without its bytes (an acknowledged upload is in Redis as a
whole; with Redis's append-only file on, it survives a Redis restart too). ``created`` comes
from Redis's own clock (``TIME``), so every replica orders prompts the same way.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from server.state.errors import call
from server.state.records import RecordHead

if TYPE_CHECKING:
    import redis


def _head(pid: str, raw: bytes | str) -> RecordHead:
    doc = json.loads(raw)
    return RecordHead(pid, str(doc["sha256"]), frozenset(doc["owners"]), float(doc["created"]))


def _doc(head: RecordHead) -> str:
    return json.dumps({"sha256": head.sha256, "owners": sorted(head.owners),
                       "created": head.created})


class RedisRecords:
    """Prompt records in the Redis behind ``client`` (keys under ``prefix``)."""

    shared = True

    def __init__(self, client: redis.Redis, *, prefix: str = "reprogram:",
                 where: str = "redis") -> None:
        self._redis = client
        self._index = f"{prefix}prompts"
        self._prefix = prefix
        self._where = where

    def _blob(self, pid: str) -> str:
        return f"{self._prefix}prompt:{pid}"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return call(self._where, what, fn, *args, **kwargs)

    def write(self, head: RecordHead, data: bytes | None) -> RecordHead:
        if data is not None:
            seconds, micros = self._call("store the prompt", self._redis.time)
            head = RecordHead(head.prompt_id, head.sha256, head.owners,
                              float(seconds) + float(micros) / 1e6)

        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            if data is not None:
                pipe.set(self._blob(head.prompt_id), data)
            pipe.hset(self._index, head.prompt_id, _doc(head))
            pipe.execute()

        self._call("store the prompt", run)
        return head

    def remove(self, pid: str) -> None:
        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hdel(self._index, pid)
            pipe.delete(self._blob(pid))
            pipe.execute()

        self._call("delete the prompt", run)

    def heads(self, pid: str | None = None) -> dict[str, RecordHead]:
        if pid is not None:
            raw = self._call("read the prompt", self._redis.hget, self._index, pid)
            return {} if raw is None else {pid: _head(pid, raw)}
        rows = self._call("list the prompts", self._redis.hgetall, self._index)
        return {(k.decode() if isinstance(k, bytes) else k): _head(k.decode()
                if isinstance(k, bytes) else k, v) for k, v in rows.items()}

    def read(self, pid: str) -> bytes | None:
        data = self._call("read the prompt", self._redis.get, self._blob(pid))
        return None if data is None else bytes(data)

