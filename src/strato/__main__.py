"""`python -m strato` is the `strato` command."""

import sys

from strato.cli import main

sys.exit(main())
