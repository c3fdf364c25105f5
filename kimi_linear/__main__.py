import sys

from kimi_linear.cli.main import main

sys.exit(main())
