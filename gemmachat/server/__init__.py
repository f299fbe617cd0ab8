"""The OpenAI-compatible HTTP server: `--server`, and the server beside the chat.

FastAPI on uvicorn, with sse-starlette for streams. The model is shared: each request runs on one
of the engine sequences the server was given (a "slot"), in a worker thread, because generation is
synchronous llama.cpp work; the engine decodes the running slots together, one batch per token.
Requests wait for a slot in FIFO order; a free slot goes to the request whose prompt shares the
longest prefix with what it holds, so a client that continues its conversation reuses its KV
cache. A client that goes away cancels its generation at the next token.

One module per concern: slots.py, the slot queue and the jobs; core.py, ServerCore, the state the
routes share and the running of jobs; openai_routes.py, ollama_routes.py, embeddings_routes.py,
operations_routes.py (/metrics, /props, /slots), conversations_routes.py and page_routes.py (the
chat page), the routes; responses.py, what their responses share; app.py, the Gatekeeper, errors
and create_app; serving.py, uvicorn under `--server` and under the chat's background server.
"""

from gemmachat.server.serving import BackgroundServer, main, serve, start_background

__all__ = ["BackgroundServer", "main", "serve", "start_background"]
