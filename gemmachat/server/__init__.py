"""The OpenAI-compatible HTTP server: `--server`, and the server beside the chat (gemmachat/server/core.py)."""

from gemmachat.server.core import BackgroundServer, main, serve, start_background

__all__ = ["BackgroundServer", "main", "serve", "start_background"]
