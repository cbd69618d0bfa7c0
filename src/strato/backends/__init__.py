"""Backends of the five primitives other than the embedded one (``strato.services``).

Each backend is a package that registers itself with ``strato.services`` when it is
imported (``register_backend(name, Backend(open_part, ...))``); the layers above pick
one by importing it (the ``strato`` command does, for ``--backend aws``). Nothing
below this package imports it, and a backend imports only ``strato.services``,
``strato.params``, the codecs and ``strato.errors``: an application's names (its
tables, functions, state machine) reach it as ``AppResources`` and arguments. A
backend's heavy dependencies (boto3, ray) load only when one of its parts is opened.
"""
