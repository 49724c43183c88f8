import sys

from raysim.cli.main import main

sys.exit(main())
