from gemmachat.server import main

raise SystemExit(main())
