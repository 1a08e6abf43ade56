import sys

from fastlisten.cli import main

sys.exit(main())
