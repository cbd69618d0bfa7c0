"""Backends of the five primitives other than the embedded one (``strato.services``).

Each backend is a module with ``open_part(name, services)`` for name in
bus/table/blobs/runtime/workflow; ``strato.services.Services`` imports it lazily, so
a backend's heavy dependencies (boto3, ray) load only when that backend is used.
"""
