"""A Flower ``Message`` as one Strato frame: its arrays in the dense codec, the rest
as Flower's own protobuf, carried in the frame's header. No pickle.

Flower's protobuf holds each ``Array`` as ``.npy`` bytes. Here every numpy array of
the message's ``ArrayRecord``s travels instead as a tensor of a safetensors frame
(``strato.codec``), named ``"<item>.<array>"`` after its place in the content, and
the protobuf travels with those arrays' bytes taken out (base64, header metadata
``flower``). An array of another kind (``stype`` not ``numpy.ndarray``) or of a dtype
the codec has no name for stays in the protobuf as Flower made it.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from strato.codec import decode, encode, read_header
from strato.errors import CodecError, LayoutError
from strato.params import Params, dtype_name

__all__ = [
    "FUNCTION",
    "JOB_TABLE",
    "MESSAGES",
    "REPLIES",
    "STATE_TABLE",
    "decode_message",
    "encode_message",
    "metadata_text",
]

# Where a Flower run keeps what crosses between the ServerApp and the nodes.
FUNCTION = "flower_client"  # the function that runs a node's ClientApp
JOB_TABLE = "flower"  # key "job": what the function needs to run the ClientApp
STATE_TABLE = "flower_state"  # key: node id; value: the node's Context.state
MESSAGES = "flower/messages/"  # blobs: the content of a push's messages, shared by them
REPLIES = "flower/replies/"  # blobs: a node's reply, by the id of the message it answers

_NUMPY = "numpy.ndarray"


def encode_message(message: Any, with_metadata: bool = True) -> bytes:
    """The frame of a ``flwr.app.Message`` (its content, error included, and its
    metadata; without it, the frame of messages that share their content is the same,
    and their metadata travels apart: ``metadata_text``)."""
    from flwr.common.serde import message_to_proto

    proto = message_to_proto(message)
    if not with_metadata:
        proto.ClearField("metadata")
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for i, item in enumerate(proto.content.items):
        if not item.HasField("array_record"):
            continue
        for j, entry in enumerate(item.array_record.items):
            value = entry.value
            if value.stype != _NUMPY:
                continue
            array = np.load(io.BytesIO(value.data), allow_pickle=False)
            try:
                dtype_name(array.dtype)
            except LayoutError:  # a dtype the codec cannot name: Flower's bytes stay
                continue
            arrays[f"{i}.{j}"] = np.ascontiguousarray(array)
            value.data = b""
    shell = base64.b64encode(proto.SerializeToString()).decode("ascii")
    return encode(Params.from_arrays(arrays), {"flower": shell}).payload


def metadata_text(message: Any) -> str:
    """A message's metadata as text, for a frame made without it."""
    from flwr.common.serde_utils import metadata_to_proto

    return base64.b64encode(metadata_to_proto(message.metadata).SerializeToString()).decode()


def decode_message(data: Any, metadata: str | None = None) -> Any:
    """The ``flwr.app.Message`` of a frame made by ``encode_message`` (with the
    ``metadata_text`` it was made without, if so)."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.message_pb2 import Metadata as ProtoMetadata

    _layout, meta, _start = read_header(data)
    if "flower" not in meta:
        raise CodecError("not a Flower message frame (no 'flower' header)")
    proto = ProtoMessage.FromString(base64.b64decode(meta["flower"]))
    if metadata is not None:
        proto.metadata.CopyFrom(ProtoMetadata.FromString(base64.b64decode(metadata)))
    params = decode(data)
    for name in params:
        i, _, j = name.partition(".")
        value = proto.content.items[int(i)].array_record.items[int(j)].value
        buf = io.BytesIO()
        np.save(buf, params[name], allow_pickle=False)
        value.data = buf.getvalue()
    return message_from_proto(proto)
