"""`python -m moa_magic.warm --socket PATH --idle MINUTES`: the daemon, as `moa daemon start` runs it."""

import os
import sys

from .server import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
# Without tearing the interpreter down: `moa daemon stop` returns when this process's sockets close.
os._exit(code)
