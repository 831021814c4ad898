"""``python -m gradwatch.report LOGDIR``."""

import sys

from gradwatch.report.cli import main

sys.exit(main(sys.argv[1:], prog="python -m gradwatch.report"))
