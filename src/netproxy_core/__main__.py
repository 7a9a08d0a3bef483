"""`python -m netproxy_core` = `netproxy-core`."""

import sys

from .cli import main

sys.exit(main())
