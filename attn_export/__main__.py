import sys

from attn_export.cli import main

sys.exit(main())
