from rethink.cli import main

raise SystemExit(main())
