"""Does long-skip scaling move the best EMA length? The post-hoc EMA study (docs/posthoc_ema).
See `python scripts/posthoc_ema_study.py --help`."""

import sys

from scalelong.cli.posthoc_ema_study import main

if __name__ == "__main__":
    sys.exit(main())
