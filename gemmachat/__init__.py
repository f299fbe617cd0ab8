"""gemma-chat: a terminal chatbot and OpenAI-compatible server for Gemma models on llama.cpp."""

__version__ = "0.1.0"
