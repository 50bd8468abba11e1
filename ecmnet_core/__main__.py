import sys

from ecmnet_core.cli import main

sys.exit(main())
