"""The five primitives on Ray (install the ``ray`` extra): Strato beyond one machine.

===========  ==========================================================  ===============
primitive    on Ray                                                      module
===========  ==========================================================  ===============
Table        the embedded SQLite table, in the state host on the head    ``_parts``
Bus          the embedded SQLite bus, in the state host                  ``_parts``
BlobStore    the embedded blob directory, in the state host; blobs the   ``_parts``
             app can make again on the node that wrote them, or (read
             once) in its object store
Runtime      a pool of Ray actors per function (warm reuse, keep-alive)  ``_runtime``
Workflow     the embedded ASL interpreter over this Table and Runtime    (services)
===========  ==========================================================  ===============

A Services config for this backend (plain JSON: it travels to every actor)::

    {"backend": "ray", "root": "<dir on the head node>",
     "address": "auto" | "HOST:PORT" | null}   # null: start a local Ray

Durable state stays on the head node (see ``_cluster``): losing a worker node loses
only the invocations running there, which the Runtime retries elsewhere, and the
node-local blobs there, which the application makes again. Importing
this package registers the backend under the name ``ray``; Ray itself loads only
when a part is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from strato.services import AppResources, Backend, register_backend

if TYPE_CHECKING:
    from strato.services import Services

__all__ = ["open_part"]


def open_part(name: str, services: Services) -> Any:
    """The ``name`` primitive of ``services`` on Ray (called by ``Services``)."""
    from strato.backends.ray._cluster import ensure_ray, state_client

    config = services.config
    if not config.get("address"):  # a Ray started here: other processes join this one
        config["address"] = ensure_ray(config).get_runtime_context().gcs_address
    if name in ("table", "bus", "blobs"):
        from strato.backends.ray._parts import RayBlobStore, RayBus, table_for

        client = state_client(config)  # one user more, let go when the part closes
        try:
            if name == "blobs":
                return RayBlobStore(client, config)
            return table_for(client) if name == "table" else RayBus(client)
        except BaseException:  # (no part to close: its user goes now)
            client.release()
            raise
    if name == "runtime":
        from strato.backends.ray._runtime import RayRuntime

        return RayRuntime(config)
    if name == "workflow":
        from strato.services._workflow_embedded import EmbeddedWorkflow

        return EmbeddedWorkflow(services.table, lambda: services.runtime)
    raise ValueError(f"unknown part {name!r} (bus, blobs, table, runtime, workflow)")


def open_run(config: Mapping[str, Any], resources: AppResources) -> Services:
    """A run's Services: its config also says which blobs may stay on the node that
    wrote them (it travels to every actor)."""
    from strato.services import Services

    return Services({**config, "node_local_blobs": list(resources.node_local_blobs),
                     "handoff_blobs": list(resources.handoff_blobs)})


# Actors belong to the process that started them and die with it, as local workers do.
register_backend("ray", Backend(open_part, open_run=open_run, local_workers=True))
