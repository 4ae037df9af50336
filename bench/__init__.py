"""Benchmarks that print tables (run as ``python -m bench.NAME``).

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets
it, before torch loads: on small shared hosts (2 CPUs here), OpenMP's default spin-waiting
made torch up to ~10x slower in a process's main thread and whenever two torch processes
(client and server) share the cores, which would measure the host rather than the code.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
