"""How another process opens the services under test: the first lines of its script.

The process imports the backend's package first (importing it registers the backend
with ``strato.services``), as every process that connects to a backend other than the
embedded one must; then ``svc`` is the bundle ``connect(config)`` opens from the JSON
config in ``sys.argv[1]``.
"""

from __future__ import annotations

__all__ = ["PRELUDE"]

PRELUDE = (
    "import importlib, json, os, sys\n"
    "from strato.services import FunctionSpec, connect\n"
    "config = json.loads(sys.argv[1])\n"
    "if config.get('backend', 'embedded') != 'embedded':\n"
    "    importlib.import_module('strato.backends.' + config['backend'])\n"
    "svc = connect(config)\n"
)
