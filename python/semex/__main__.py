"""``python -m semex ...``: the same as the ``semex`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
