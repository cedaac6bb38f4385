import sys

from lmflow_ray.cli import main

sys.exit(main())
