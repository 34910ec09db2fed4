"""`python -m bench [--quick] [...]`: run the benchmark and print one table."""

import sys

from bench.runner import main

sys.exit(main())
