from omsd.daemon.cli import main

raise SystemExit(main())
