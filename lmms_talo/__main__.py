import sys

from lmms_talo.cli import main

sys.exit(main())
