"""`python -m gateway.loadgen …` runs the same command as `gateway bench …`."""

import sys

from gateway.loadgen.cli import main

sys.exit(main())
