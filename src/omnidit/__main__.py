import sys

from omnidit.cli import main

sys.exit(main())
