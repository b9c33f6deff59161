"""Export a diffusers-UNet checkpoint to a diffusers folder (scalelong-export-diffusers). See
`python scripts/export_diffusers.py --help`."""

import sys

from scalelong.cli.export_diffusers import main

if __name__ == "__main__":
    sys.exit(main())
