"""``python -m unseg inspect ...`` (the ``unseg`` console command)."""

import sys

from unseg.inspection import main

sys.exit(main())
