"""`python -m loadgen …` runs the same command as `gateway bench …`."""

import sys

from loadgen.cli import main

sys.exit(main())
