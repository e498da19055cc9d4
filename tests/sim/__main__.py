"""``python -m tests.sim SEED...``: run (or replay) seeds of the simulation."""

import sys

from tests.sim.sim import main

sys.exit(main(sys.argv[1:]))
