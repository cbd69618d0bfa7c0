"""The ``flower_client`` function: one node's ClientApp answering one message.

A Runtime handler ``handle(event, ctx)`` with ``event = {"message": id, "node": id,
"content": key, "metadata": text}``. It reads the message's content from the BlobStore
(shared by the messages of a push) and its metadata from the event, rebuilds the node's
``Context`` (its ``state`` from the Table, where the previous invocation for this node
left it), runs the ClientApp as a SuperNode would, and writes the reply and the new
state back.
The ClientApp is imported once per warm worker. A ClientApp that raises answers with
Flower's ``Error`` (``CLIENT_APP_RAISED_EXCEPTION``), as Flower's runtime does.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from strato.errors import NotFound
from strato.fl.flower_wire import (
    JOB_TABLE,
    MESSAGES,
    REPLIES,
    STATE_TABLE,
    decode_message,
    encode_message,
)
from strato.services import Context, worker_services

__all__ = ["handle"]

_warm: dict[str, Any] = {}


def _job() -> dict[str, Any]:
    if "job" not in _warm:
        item = worker_services().table.get(JOB_TABLE, "job")
        if item is None:
            raise NotFound("the run has no Flower job record")
        _warm["job"] = item.value
    return _warm["job"]  # type: ignore[no-any-return]


def _client_app() -> Any:
    if "app" not in _warm:
        from flwr.supercore.object_ref import load_app

        job = _job()
        _warm["app"] = load_app(job["clientapp"], ValueError, job["app_dir"])
    return _warm["app"]


def _state(node: int) -> Any:
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    item = worker_services().table.get(STATE_TABLE, str(node))
    if item is None:
        return RecordDict()
    return recorddict_from_proto(ProtoRecordDict.FromString(base64.b64decode(item.value["state"])))


def _keep_state(node: int, state: Any) -> None:
    from flwr.common.serde import recorddict_to_proto

    text = base64.b64encode(recorddict_to_proto(state).SerializeToString()).decode("ascii")
    worker_services().table.put(STATE_TABLE, str(node), {"state": text})


def handle(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from flwr.app import Context as FlowerContext
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    svc, job = worker_services(), _job()
    mid, node = str(event["message"]), int(event["node"])
    nodes = [int(n) for n in job["nodes"]]
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = int(job["run_id"])
    TaskIdentity.node_id = node
    message = decode_message(svc.blobs.get(MESSAGES + str(event["content"])),
                             str(event["metadata"]))
    node_config: dict[str, Any] = {"partition-id": nodes.index(node),
                                   "num-partitions": len(nodes)}
    if job.get("data_dir"):
        node_config["data-dir"] = str(job["data_dir"])
    context = FlowerContext(run_id=int(job["run_id"]), node_id=node, node_config=node_config,
                            state=_state(node), run_config=dict(job["run_config"]))
    error = None
    try:
        reply = _client_app()(message, context)
    except Exception as exc:  # the app's own failure: the node answers with an Error
        error = f"{type(exc).__name__}: {exc}"
        reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, error), reply_to=message)
    else:
        _keep_state(node, context.state)
    svc.blobs.put(REPLIES + mid, encode_message(reply))
    return {"reply": mid, "error": error}
