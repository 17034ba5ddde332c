"""`python -m moa_magic.warm --socket PATH --idle MINUTES`: the daemon, as `moa daemon start` runs it."""

import sys

from .server import main

sys.exit(main())
