"""`python -m engine.backends.local`: one worker process, as the supervisor spawns it (see cli.py)."""

import logging
import os

from engine.backends.local.cli import main

exit_code = main()
# Skip the interpreter's teardown (1-2 s with torch loaded): the supervisor waits for this exit before it starts a
# successor, and nothing is left to flush but the log.
logging.shutdown()
os._exit(exit_code)
