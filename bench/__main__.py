import os
import sys

from bench.cli import main

try:
    sys.exit(main())
except BrokenPipeError:  # `python -m bench run --dry-run | head`
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
