import sys

from bayeslora.cli import main

sys.exit(main())
