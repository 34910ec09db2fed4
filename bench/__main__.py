"""`python -m bench [--quick] [...]`: run the benchmark and print one table."""

import sys

from bench import feature_phases, runner

# The routing, limits and metrics layers' own rows, after the end-to-end phases.
runner.EXTRA_PHASES.extend(feature_phases.PHASES)
sys.exit(runner.main())
