import sys

from serve_app.tools.bench.driver import main

sys.exit(main())
