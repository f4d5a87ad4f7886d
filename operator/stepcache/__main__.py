"""`python -m stepcache` is the `stepcache` command."""

import sys

from stepcache import cli

sys.exit(cli.main())
