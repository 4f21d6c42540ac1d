import sys

from serve_app.local.cli import main

sys.exit(main())
