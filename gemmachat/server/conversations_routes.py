"""Stored conversations over HTTP: the chat page's API, on the terminal chat's store.

`/conversations` lists, creates, reads, renames, deletes, exports and imports the conversations
of gemmachat/store.py, in the JSON format `/save` and `/load` use; `POST /conversations/{id}/messages`
appends a user message and streams the reply. The user message is stored before generation
starts and the reply when it ends (a reply cut short, the client gone or stopped, is kept and
marked interrupted, as ctrl-c in the terminal keeps it), so the terminal chat (`/history`,
`--resume`) and the page see each other's conversations.

The chat's background server uses the chat's database; `--server` keeps conversations only with
`--history`, and otherwise holds them in memory, for the page, until it stops.

Every store call runs on the event loop's thread: the store's one SQLite connection then never
sees two transactions interleaved, and each call is one short write.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from typing import Annotated, Any, AsyncIterator, Iterator

from fastapi import FastAPI, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from gemmachat import kvstate, openai_api as api
from gemmachat.conversation import Conversation
from gemmachat.errors import PromptTooLong, UserError
from gemmachat.recorder import recorded_settings
from gemmachat.server.core import ServerCore
from gemmachat.server.responses import finish_reason, json_line
from gemmachat.store import MAX_ID, ConversationChanged, Store, StoreError, Summary, Version, data_dir, title_from
from gemmachat.templates import Message, messages_of, to_tokens


# A larger id would be a crash in SQLite's driver, not a 404.
ConversationId = Annotated[int, Path(ge=1, le=MAX_ID)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewConversation(_Body):
    title: str = Field("", max_length=500)
    system: str | None = None


class ConversationChange(_Body):
    title: str | None = Field(None, max_length=500)
    system: str | None = Field(None, description="the system prompt; \"\" for none")


class Generation(_Body):
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1, le=2**63 - 1)
    version: str | None = Field(None, max_length=100, description="the conversation's version as a GET gave it, "
                                "which the client shows: refused (409 conversation_changed) if it changed since")


class NewMessage(Generation):
    content: str
    at: int | None = Field(None, ge=0, le=2**63 - 1, description="replace the user message at this index, and drop "
                           "everything after it (edit and resend); default: append")
    system: str | None = Field(None, description="set the system prompt first; \"\" for none")


def version_token(version: Version) -> str:
    """A stored conversation's version as the API hands it out, opaque to clients."""
    updated, count = version
    return f"{updated!r}/{count}"


def open_store(core: ServerCore) -> tuple[Store, str]:
    """The store the server's conversations go to, and a line saying where.

    The chat's background server keeps them where the chat does, unless --no-history; --server
    only with --history (then a store that cannot be used stops it, with one line)."""
    settings = core.settings
    keep = settings.keep_history is not False if settings.mode == "chat" else settings.keep_history is True
    if keep:
        try:
            store = Store.open(data_dir(settings.environ), core.log)
            return store, f"kept in {store.path}"
        except StoreError as error:
            if settings.mode != "chat":
                raise
            core.log(f"gemma-chat: the page's conversations are not kept: {error}")
    reason = "--no-history" if settings.keep_history is False else "--server keeps them only with --history"
    return Store.memory(), f"not kept: held in memory until the server stops ({reason})"


def add_routes(app: FastAPI, core: ServerCore) -> None:
    store, where = open_store(core)
    app.state.conversation_store = store
    writing: set[int] = set()  # conversations with a reply being written

    @contextmanager
    def stored() -> Iterator[None]:
        """The store's errors as HTTP errors: a missing conversation 404, a store that fails 503,
        a conversation written elsewhere since it was read 409."""
        try:
            yield
        except StoreError as error:
            raise api.ApiError(503, str(error), code="store_unavailable") from None
        except UserError as error:
            raise api.ApiError(404, str(error), code="not_found") from None
        except ConversationChanged as changed:
            raise api.ApiError(409, f"conversation {changed} was changed elsewhere (the terminal chat or "
                               "another page) since it was read: reload it", code="conversation_changed") from None

    def not_writing(conversation_id: int) -> None:
        """409 while a reply of this conversation is being written: a change under it (a system prompt,
        a deletion, a second reply) would send that reply to a new conversation or nowhere."""
        if conversation_id in writing:
            raise api.ApiError(409, f"conversation {conversation_id} is writing a reply; stop it first",
                               code="conversation_busy")

    def load(conversation_id: int) -> tuple[Summary, Conversation]:
        with stored():
            return store.load(conversation_id)

    def load_to_write(conversation_id: int, seen: str | None = None) -> tuple[Conversation, Version | None]:
        """The conversation and its version: a write that expects it fails, rather than overwrite,
        if the terminal chat (another process) writes in between. `seen`: the version the
        client shows, if it says: a conversation changed since is refused, rather than written to
        under messages the client never showed (a second tab's, the terminal's)."""
        with stored():
            _, conversation, version = store.load_versioned(conversation_id)
            if seen is not None and version is not None and seen != version_token(version):
                raise ConversationChanged(conversation_id)
            return conversation, version

    async def context_used(conversation: Conversation) -> int:
        """Tokens the conversation takes as the next prompt (the server's template and tokenizer)."""
        def count() -> int:
            segments = core.render(conversation.system, conversation.messages, True)
            return len(to_tokens(core.engine, segments, special=core.settings.special, limit=1 << 30))

        return await run_in_threadpool(count) if conversation.messages else 0

    async def document(conversation_id: int) -> dict[str, Any]:
        with stored():
            summary, conversation, version = store.load_versioned(conversation_id)
        return {**dataclasses.asdict(summary), "system": conversation.system, "writing": conversation_id in writing,
                "version": version_token(version) if version is not None else None,
                "messages": [{"role": m.role, "content": m.content, "interrupted": m.interrupted}
                             for m in conversation.messages],
                "context": {"used": await context_used(conversation), "size": core.engine.n_ctx_seq}}

    def create(conversation: Conversation, title: str = "") -> int:
        """A new stored conversation holding `conversation` (StoreError as it comes)."""
        number = store.create(title, core.model_id, conversation.system,
                              recorded_settings(core.settings, core.engine.n_ctx_seq))
        if conversation.messages:
            store.write(number, 0, conversation.messages, conversation.system, title_from(conversation.messages))
        return number

    @app.get("/conversations", summary="Stored conversations, latest first, and where they are kept")
    async def list_conversations(limit: int = 100) -> Any:
        with stored():
            recent = store.recent(max(1, min(limit, 1000)))
        return {"object": "list", "kept": store.kept, "where": where, "data": [dataclasses.asdict(s) for s in recent]}

    @app.post("/conversations", status_code=201, summary="A new, empty conversation")
    async def new_conversation(body: NewConversation) -> Any:
        with stored():
            number = create(Conversation(system=body.system or None), body.title.strip())
        return await document(number)

    @app.post("/conversations/import", status_code=201,
              summary="A new conversation from the JSON that /save writes (and export answers)")
    async def import_conversation(request: Request) -> Any:
        try:
            loaded = Conversation.from_document(json.loads(await request.body()), "the upload")
        except (ValueError, RecursionError):
            raise api.ApiError(400, "the upload is not a gemma-chat conversation (not JSON)") from None
        except UserError as error:
            raise api.ApiError(400, str(error)) from None
        with stored():
            number = create(loaded)
        return await document(number)

    @app.get("/conversations/{conversation_id}", summary="A conversation: its system prompt, messages and context use")
    async def get_conversation(conversation_id: ConversationId) -> Any:
        return await document(conversation_id)

    @app.patch("/conversations/{conversation_id}", summary="Rename a conversation or change its system prompt")
    async def change_conversation(conversation_id: ConversationId, body: ConversationChange) -> Any:
        if body.system is not None:
            not_writing(conversation_id)
        conversation, version = load_to_write(conversation_id)
        with stored():
            if body.system is not None:
                messages = conversation.messages
                store.write(conversation_id, len(messages), [], body.system or None, title_from(messages),
                            expected=version)
            if body.title is not None:
                store.rename(conversation_id, body.title.strip())
        return await document(conversation_id)

    @app.delete("/conversations/{conversation_id}", status_code=204, summary="Delete a conversation")
    async def delete_conversation(conversation_id: ConversationId) -> Response:
        not_writing(conversation_id)
        with stored():
            if not store.delete(conversation_id):
                raise UserError(f"there is no conversation {conversation_id}")
            if store.kept:  # the terminal chat's saved KV cache for it, so that it does not linger
                kvstate.remove(kvstate.path_for(store.path.parent, conversation_id))
        return Response(status_code=204)

    @app.get("/conversations/{conversation_id}/export",
             summary="The conversation as the JSON file /save writes and /load reads")
    async def export_conversation(conversation_id: ConversationId) -> Response:
        _, conversation = load(conversation_id)
        return Response(conversation.to_json(), media_type="application/json", headers={
            "content-disposition": f'attachment; filename="conversation-{conversation_id}.json"'})

    @app.post("/conversations/{conversation_id}/messages",
              summary="Append a user message (or replace one, with `at`) and stream the reply as server-sent events")
    async def send_message(conversation_id: ConversationId, body: NewMessage, request: Request) -> Any:
        conversation, version = load_to_write(conversation_id, body.version)
        messages = conversation.messages
        at = len(messages) if body.at is None else body.at
        if at > len(messages) or (at < len(messages) and messages[at].role != "user"):
            raise api.ApiError(400, f"message {at} is not a user message of conversation {conversation_id}",
                               code="invalid_value", param="at")
        if body.system is not None:
            conversation.system = body.system or None
        return await reply(request, conversation_id, conversation, version, at, [Message("user", body.content)], body)

    @app.post("/conversations/{conversation_id}/reply",
              summary="Write the last user message's reply again (regenerate), streamed as server-sent events")
    async def regenerate(conversation_id: ConversationId, body: Generation, request: Request) -> Any:
        conversation, version = load_to_write(conversation_id, body.version)
        last_user = max((i for i, m in enumerate(conversation.messages) if m.role == "user"), default=None)
        if last_user is None:
            raise api.ApiError(400, f"conversation {conversation_id} has no user message to reply to",
                               code="invalid_value")
        return await reply(request, conversation_id, conversation, version, last_user + 1, [], body)

    async def reply(request: Request, conversation_id: int, conversation: Conversation, version: Version | None,
                    start: int, new: list[Message], body: Generation) -> Any:
        """Store `new` from position `start` on (what was there goes), then stream the reply."""
        not_writing(conversation_id)
        # Writing from here on: fitting a long conversation to the context takes a while, and a
        # reader meanwhile (the page, after its stop) must wait for what this stores.
        writing.add(conversation_id)
        try:
            messages = conversation.messages[:start] + new
            job, dropped = await fitted_job(conversation.system, messages, body)
            with stored():
                version = store.write(conversation_id, start, new, conversation.system, title_from(messages),
                                      expected=version)
            job.stream = True
            first = await core.begin(request, job)
        except BaseException:
            writing.discard(conversation_id)
            raise
        job.stop_watching()
        position = len(messages)

        async def events() -> AsyncIterator[str]:
            parts: list[str] = []
            done = None
            try:
                yield json_line({"type": "start", "position": position, "dropped": dropped})
                async for kind, value in core.events(request, job, first):
                    if kind == "text":
                        parts.append(value)
                        yield json_line({"type": "text", "text": value})
                    elif kind == "done":
                        done = value
                    else:
                        yield json_line({"type": "error", "error": value.body()["error"]})
            finally:
                # Also when the client stopped it (this generator is then closed mid-way): what was
                # written stays, marked interrupted, as the terminal keeps a reply cut by ctrl-c.
                # "writing" until it is stored: the page waits for that to read the conversation.
                cut = done is None or done.finish_reason == "cancelled"
                text = "".join(parts)
                kept_in = conversation_id
                try:
                    if done is not None or text:
                        kept_in = keep_reply(conversation_id, version, Conversation(conversation.system, messages),
                                             Message("assistant", text, interrupted=cut))
                except StoreError as error:
                    core.log(f"gemma-chat: a reply of conversation {conversation_id} was not kept: {error}")
                finally:
                    writing.discard(conversation_id)
            if done is not None:
                yield json_line({"type": "done", "conversation": kept_in,
                                 "finish_reason": "cancelled" if cut else finish_reason(done),
                                 "prompt_tokens": done.prompt_tokens, "generated_tokens": done.generated_tokens,
                                 "tokens_per_second": round(done.generation_tokens_per_second, 2),
                                 "context": {"used": done.prompt_tokens + done.generated_tokens,
                                             "size": core.engine.n_ctx_seq}})

        return EventSourceResponse(events(), sep="\n", ping=15)

    def keep_reply(conversation_id: int, version: Version, conversation: Conversation, reply: Message) -> int:
        """Stores the reply after the conversation's messages; returns the conversation it went to.
        That is a new one when another process (the terminal chat) wrote to this one while the
        reply was written: writing on would overwrite its messages. The terminal chat does the same."""
        messages = conversation.messages
        try:
            store.write(conversation_id, len(messages), [reply], conversation.system, title_from(messages),
                        expected=version)
            return conversation_id
        except ConversationChanged:
            forked = create(Conversation(conversation.system, [*messages, reply]))
            core.log(f"gemma-chat: conversation {conversation_id} was changed elsewhere while the page's reply "
                     f"was written; the reply went on as conversation {forked}")
            return forked

    async def fitted_job(system: str | None, messages: list[Message], body: Generation) -> tuple[Any, int]:
        """The chat-completion job for the conversation, and how many of its oldest messages it had
        to leave out to fit the context (they stay stored), as the terminal chat does."""
        dropped = 0
        while True:
            request = api.ChatCompletionRequest(messages=messages_of(system, messages[dropped:]),
                                                temperature=body.temperature, max_tokens=body.max_tokens)
            try:
                return await core.chat_job(request), dropped
            except (PromptTooLong, api.ApiError) as error:
                too_long = isinstance(error, PromptTooLong) or error.code == "context_length_exceeded"
                later_user = next((i for i in range(dropped + 1, len(messages)) if messages[i].role == "user"), None)
                if not too_long or later_user is None:
                    raise
                dropped = later_user

