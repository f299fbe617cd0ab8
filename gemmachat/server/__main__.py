"""`python -m gemmachat.server ARGS`: the same as `gemma-chat --server ARGS`."""

from gemmachat.server.serving import main

raise SystemExit(main())
