import sys

from convnet.core.cli import main

sys.exit(main())
