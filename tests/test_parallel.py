"""Parallel decoding: several generations share each llama_decode, in the engine and in a real
`--server -np 4` driven by the official openai client."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from gemmachat import llama_log
from gemmachat.engine import Engine, EngineOptions
from gemmachat.gguf import read_gguf
from gemmachat.settings import Sampling
from gemmachat.templates import Segment, to_tokens
from test_server import ServerProcess, open_stream

# Greedy continuations with no near-tie in their first 48 tokens. Four rows decoded together take
# llama.cpp's 4-row matrix kernel, whose logits differ from the 1-row kernel's by up to about 0.9:
# a prompt with a near-tie ("The capital of France is") can then change from its 11th token on,
# as it does in llama-server (docs/server.md).
PROMPTS = ["1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "A, B, C, D, E,", "January, February, March,",
           "10, 20, 30, 40,", "red, orange, yellow,", "one, two, three, four,", "2, 4, 6, 8,"]
STORY = "Once upon a time"
LOGGED = '"POST /v1/completions" 200'  # the access log of a completion served
# Evaluated from scratch, so that a request is computed the same way whether or not its slot
# held something before.
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"cache_prompt": False}}


def hot(seed: int) -> dict[str, Any]:
    return {"temperature": 1.0, "top_p": 1.0, "seed": seed, "extra_body": {"cache_prompt": False}}


# -- the engine's scheduler, in-process ----------------------------------------------------------


@pytest.fixture(scope="module")
def split_engine(model_path: Path) -> Iterator[Engine]:
    llama_log.install(verbose=False)
    options = EngineOptions(ctx_size=4096, threads=2, sequences=4, shared_kv=False)
    with Engine(model_path, read_gguf(model_path), options) as loaded:
        yield loaded


def run_together(engine: Engine, prompts: list[list[int]], samplings: list[Sampling], max_tokens: int) -> list[list[int]]:
    """Generations on sequences 0..3, started together and read in turn from this one thread."""
    sequences = [engine.new_sequence(i) for i in range(len(prompts))]
    # Holding the scheduler's lock while submitting makes them all arrive before its next step, so
    # that every run batches them the same way (it is reentrant: generate() takes it too).
    with engine._cond:
        generations = [engine.generate(sequence, prompt, sampling, max_tokens=max_tokens)
                       for sequence, prompt, sampling in zip(sequences, prompts, samplings)]
    live = [iter(generation) for generation in generations]
    while live:
        for pieces in list(live):
            if next(pieces, None) is None:
                live.remove(pieces)
    return [generation.tokens for generation in generations]


def test_generations_share_each_decode_and_match_their_solo_runs(split_engine: Engine,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    engine = split_engine
    assert engine.n_ctx_seq == 1024  # -c is split between the sequences, as llama-server -np 4 does
    greedy = Sampling(temperature=0)
    prompts = [to_tokens(engine, [Segment(text, False)]) for text in (PROMPTS[0], STORY, PROMPTS[1], STORY)]
    samplings = [greedy, Sampling(temperature=1.0, top_p=1.0, seed=11), greedy,
                 Sampling(temperature=1.0, top_p=1.0, seed=12)]
    alone = []
    for prompt in (prompts[0], prompts[2]):
        generation = engine.generate(engine.new_sequence(0), prompt, greedy, max_tokens=24)
        generation.text()
        alone.append(generation.tokens)

    sequences_per_decode: list[int] = []
    decode = engine._decode

    def counting(parts):  # type: ignore[no-untyped-def]
        sequences_per_decode.append(len(parts))
        return decode(parts)

    monkeypatch.setattr(engine, "_decode", counting)
    together = run_together(engine, prompts, samplings, 24)
    # One decode per step carries a token of every running generation.
    assert sequences_per_decode.count(4) >= 20, sequences_per_decode
    # No cross-talk: the greedy ones are what they are alone, beside sampled neighbours.
    assert [together[0][:16], together[2][:16]] == [tokens[:16] for tokens in alone]
    # Each sampled one has its own sampler and seed: the same prompt differs by seed, and the same
    # batch again gives the same tokens.
    assert together[1] != together[3]
    assert run_together(engine, prompts, samplings, 24) == together


def test_a_cancelled_generation_leaves_the_batch_at_the_next_step(split_engine: Engine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = split_engine
    decoded: list[set[int]] = []  # the sequences each decode carried
    decode = engine._decode

    def recording(parts):  # type: ignore[no-untyped-def]
        decoded.append({job.sequence.seq_id for job, _ in parts})
        return decode(parts)

    monkeypatch.setattr(engine, "_decode", recording)
    stop = {"now": False}
    long = engine.generate(engine.new_sequence(0), to_tokens(engine, [Segment(STORY, False)]),
                           Sampling(temperature=0), max_tokens=200, cancelled=lambda: stop["now"])
    other = engine.generate(engine.new_sequence(1), to_tokens(engine, [Segment(PROMPTS[0], False)]),
                            Sampling(temperature=0), max_tokens=12)
    long_pieces, other_pieces = iter(long), iter(other)
    next(long_pieces)
    next(other_pieces)
    stop["now"] = True
    cancelled_at = len(decoded)
    rest = list(other_pieces)  # the other one goes on; its steps drop the cancelled one
    assert other.stats.generated_tokens == 12 and rest
    # The decode under way when it was cancelled may still carry it; none after that.
    assert [0 in sequences for sequences in decoded[cancelled_at + 1:]] == [False] * (len(decoded) - cancelled_at - 1)
    list(long_pieces)
    assert long.stats.finish_reason == "cancelled" and long.stats.generated_tokens < 200
    assert not engine._jobs


def test_a_generation_dropped_unread_leaves_the_scheduler(split_engine: Engine) -> None:
    engine = split_engine
    sequence = engine.new_sequence(0)
    prompt = to_tokens(engine, [Segment(STORY, False)])
    generation = engine.generate(sequence, prompt, Sampling(temperature=0), max_tokens=900)
    del generation  # never read: its finalizer releases the job
    deadline = time.monotonic() + 10
    while (engine._jobs or engine._arrivals) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine._jobs and not engine._arrivals
    # It stopped within a few steps rather than generating its 900 tokens for nobody...
    assert len(sequence.tokens) < len(prompt) + 100
    # ...and the sequence serves the next generation.
    again = engine.generate(engine.new_sequence(0), prompt, Sampling(temperature=0), max_tokens=4)
    assert again.text() and again.stats.generated_tokens == 4


def test_a_failure_in_the_scheduler_thread_fails_generations_instead_of_hanging(model_path: Path) -> None:
    # An injected fault: a bug in the decoding thread must reach the consumers as an error.
    with Engine(model_path, read_gguf(model_path), EngineOptions(ctx_size=1024, threads=2)) as engine:
        def broken(parts):  # type: ignore[no-untyped-def]
            raise RuntimeError("injected")

        engine._decode = broken  # type: ignore[method-assign]
        prompt = to_tokens(engine, [Segment(STORY, False)])
        generation = engine.generate(engine.new_sequence(0), prompt, Sampling(temperature=0), max_tokens=4)
        with pytest.raises(RuntimeError, match="injected"):
            generation.text()
        with pytest.raises(RuntimeError, match="decoding thread stopped: injected"):
            engine.generate(engine._sequences[0], prompt, Sampling(), max_tokens=4)


# -- the real server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_env: dict[str, str], model_path: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(server_env, "-np", "4", "-c", "4096", "--verbose")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: openai.OpenAI, prompt: str, sampling: dict[str, Any], max_tokens: int = 16) -> str:
    return client.completions.create(model="gemma", prompt=prompt, max_tokens=max_tokens,
                                     **sampling).choices[0].text


@pytest.fixture(scope="module")
def alone(client: openai.OpenAI) -> dict[str, str]:
    """Every prompt served greedily with nothing else running."""
    return {prompt: complete(client, prompt, GREEDY) for prompt in PROMPTS}


def test_concurrent_requests_match_each_served_alone(client: openai.OpenAI, alone: dict) -> None:
    cases = [(PROMPTS[0], GREEDY), (STORY, hot(7)), (PROMPTS[1], GREEDY), (STORY, hot(8))]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda case: complete(client, *case), cases))
    assert [together[0], together[2]] == [alone[PROMPTS[0]], alone[PROMPTS[1]]]
    assert together[1] and together[3] and together[1] != together[3]


def test_more_clients_than_slots_wait_their_turn(client: openai.OpenAI, server: ServerProcess,
                                                 alone: dict) -> None:
    waiting_seen = []

    def ask(prompt: str) -> str:
        return complete(client, prompt, GREEDY)

    with ThreadPoolExecutor(8) as pool:
        replies = [pool.submit(ask, prompt) for prompt in PROMPTS]
        while not all(reply.done() for reply in replies):
            waiting_seen.append(server.request("GET", "/health")[1]["requests_waiting"])
            time.sleep(0.02)
        assert [reply.result() for reply in replies] == [alone[prompt] for prompt in PROMPTS]
    assert max(waiting_seen) > 0
    assert server.request("GET", "/health")[1]["slots_processing"] == 0


def test_hanging_up_mid_batch_frees_the_slot_for_the_next_request(client: openai.OpenAI, server: ServerProcess,
                                                                  alone: dict) -> None:
    streams = [open_stream(server.port, {"prompt": prompt, "max_tokens": 900, "temperature": 0, "ignore_eos": True})
               for prompt in PROMPTS[:4]]  # every slot busy
    assert server.request("GET", "/health")[1]["slots_processing"] == 4
    for connection in streams[:2]:
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
    # Served beside the two streams still running, once a hung-up one has left the batch.
    started = time.monotonic()
    assert complete(client, PROMPTS[5], GREEDY) == alone[PROMPTS[5]]
    assert time.monotonic() - started < 30  # not after the 900 tokens of a stream
    assert server.request("GET", "/health")[1]["slots_processing"] == 2
    for connection in streams[2:]:
        connection.close()
    deadline = time.monotonic() + 10
    while server.request("GET", "/health")[1]["slots_processing"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.request("GET", "/health")[1]["slots_processing"] == 0
    cancelled = server.log_lines("cancelled")
    assert len(cancelled) >= 4 and all(int(line.split("generated ")[1].split(",")[0]) < 900 for line in cancelled)


def test_a_slot_is_reused_after_a_long_request(client: openai.OpenAI, server: ServerProcess, alone: dict) -> None:
    def logged(request: Callable[[], Any]) -> tuple[Any, str, int]:
        """The request's reply, and the slot and reused tokens of its access-log line."""
        before = len(server.log_lines(LOGGED))
        reply = request()
        # The server logs a request as it ends, maybe after the client has the reply: wait for it.
        deadline = time.monotonic() + 10
        while len(server.log_lines(LOGGED)) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        line = server.log_lines(LOGGED)[before]
        return reply, line.split("slot ")[1].split(",")[0], int(line.split("reused ")[1].split(",")[0])

    # Longer than the sliding window (512), so that the next prompt cannot rewind into it.
    long, slot, _ = logged(lambda: client.with_options(timeout=600).completions.create(
        model="gemma", prompt=STORY, max_tokens=600, temperature=0, extra_body={"ignore_eos": True}))
    assert long.usage.completion_tokens == 600
    # A client going on from the long reply gets the slot that holds it, and reuses its cache...
    follow, follow_slot, reused = logged(lambda: client.completions.create(
        model="gemma", prompt=STORY + long.choices[0].text + " The end.", max_tokens=4, temperature=0))
    assert follow.usage.prompt_tokens > 600
    assert (follow_slot, reused) == (slot, long.usage.prompt_tokens + 599)
    # ...and a new prompt on that slot (the lowest free one) gets a cleared cache, nothing mixed in.
    text, new_slot, _ = logged(lambda: complete(client, PROMPTS[6], {"temperature": 0.0}))
    assert text == alone[PROMPTS[6]]
    assert new_slot == slot
