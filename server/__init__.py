"""The reprogram model server: a frozen classifier over KServe V2 and native ``/v1`` routes.

``create_app(settings)`` builds the FastAPI app; ``reprogram-server`` (``server.main``) runs it
with uvicorn.
"""

import os

# Passive OpenMP waiting: see reprogram/__init__.py (client and server often share cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from server.app import create_app
from server.settings import OutputKind, Settings

__all__ = ["OutputKind", "Settings", "create_app"]
