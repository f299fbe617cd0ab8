from gemmachat.cli import main

raise SystemExit(main())
