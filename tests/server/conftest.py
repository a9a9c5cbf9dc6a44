"""Server test fixtures (defined in srv_helpers so test modules can import the helpers too)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from srv_helpers import live, serve_proc, server  # noqa: E402,F401
