"""The naive-serverless aggregation function (a fresh process per update, never reused).

Reads its update from the blob store and adds it into a global sum that lives in the
blob store too: read-modify-write under a file lock, as a stateless function must.
The function that adds the last expected update also writes the global model.
"""

from __future__ import annotations

import fcntl
import json
import time
from typing import Any

import numpy as np

from strato.errors import NotFound
from strato.services import connect_from_env


def _peak_rss_kb() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


def add(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    blobs = connect_from_env().blobs
    update = np.frombuffer(blobs.get(event["key"], verify=False), dtype=np.float32)
    with open(event["lock"], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                meta = json.loads(bytes(blobs.get("meta")))
                total = np.frombuffer(blobs.get("sum", verify=False), dtype=np.float32).copy()
            except NotFound:
                meta = {"count": 0, "weight": 0.0}
                total = np.zeros(update.shape, dtype=np.float32)
            total += np.float32(event["weight"]) * update
            meta["count"] += 1
            meta["weight"] += float(event["weight"])
            blobs.put("sum", total)
            done = meta["count"] == int(event["clients"])
            if done:
                total /= np.float32(meta["weight"])
                blobs.put("global", total)
            blobs.put("meta", json.dumps(meta).encode())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return {"done": done, "t": time.monotonic(), "hwm_kb": _peak_rss_kb()}
