"""``python -m loadtests SCENARIO [options]``: see loadtests/run.py and loadtests/README.md."""

from loadtests.run import main

raise SystemExit(main())
