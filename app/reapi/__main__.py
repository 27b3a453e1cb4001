"""Entry point of the REAPI process: ``python -m app.reapi``."""
from __future__ import annotations

import sys

from app.reapi.server import main

if __name__ == "__main__":
    sys.exit(main())
