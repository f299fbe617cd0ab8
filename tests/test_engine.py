"""The engine on the real model: streaming, stops, counters, KV reuse, context limits."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import llama_cpp
import pytest

from gemmachat.engine import DecodeTimes, Engine, EngineClosed, PromptTooLong, StopGuard
from gemmachat.settings import Sampling
from gemmachat.templates import Segment, to_tokens

GREEDY = Sampling(temperature=0)


def prompt(engine: Engine, text: str) -> list[int]:
    return to_tokens(engine, [Segment(text, False)])


def test_streams_pieces_as_tokens_come(engine: Engine) -> None:
    generation = engine.generate(engine.new_sequence(), prompt(engine, "The capital of France is"),
                                 GREEDY, max_tokens=12)
    pieces = []
    for piece in generation:
        pieces.append(piece)
        # Counters move while the reply streams, not only at the end.
        assert generation.stats.generated_tokens >= len(pieces)
    assert len(pieces) >= 6
    stats = generation.stats
    assert stats.generated_tokens == 12 and stats.finish_reason == "length"
    assert stats.prompt_tokens == len(prompt(engine, "The capital of France is"))
    assert stats.prompt_seconds > 0 and stats.generation_seconds > 0
    assert stats.generation_tokens_per_second > 0
    assert engine.detokenize(generation.tokens) == "".join(pieces)


def test_greedy_is_reproducible_across_sequences(engine: Engine) -> None:
    tokens = prompt(engine, "Water boils at")
    first = engine.generate(engine.new_sequence(), tokens, GREEDY, max_tokens=10).text()
    second = engine.generate(engine.new_sequence(), tokens, GREEDY, max_tokens=10).text()
    assert first == second and first


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(engine: Engine) -> None:
    tokens = prompt(engine, "My favourite animal is")
    hot = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    one = engine.generate(engine.new_sequence(), tokens, hot, max_tokens=24).text()
    two = engine.generate(engine.new_sequence(), tokens, hot, max_tokens=24).text()
    greedy = engine.generate(engine.new_sequence(), tokens, GREEDY, max_tokens=24).text()
    assert one == two
    assert one != greedy


def test_utf8_is_never_split_across_pieces(engine: Engine) -> None:
    for text in ("中文测试: 北京是中国的", "Emoji: 😀😃😄😁😆 and more:", "Русский текст: Москва —"):
        pieces = list(engine.generate(engine.new_sequence(), prompt(engine, text), GREEDY, max_tokens=40))
        assert pieces and all("\ufffd" not in piece for piece in pieces), pieces


def test_multibyte_tokens_are_held_until_complete(engine: Engine) -> None:
    # Byte-fallback tokens carry part of a character: the decoder must wait for the rest.
    emoji = "🦙"
    tokens = engine.tokenize(emoji)
    assert engine.detokenize(tokens) == emoji
    pieces = [engine.piece(token) for token in tokens]
    if len(pieces) > 1:
        with pytest.raises(UnicodeDecodeError):
            pieces[0].decode("utf-8")


@pytest.mark.parametrize("marker", ["<end_of_turn>", "<eos>"])
def test_stops_at_end_of_generation_tokens(engine: Engine, marker: str) -> None:
    # The base model seldom ends a turn by itself, so a logit bias makes the end token the
    # likeliest after a few tokens of text: the reply stops there and the marker never shows.
    end = engine.special_token(marker)
    assert end is not None and engine.is_end_of_generation(end)
    biased = Sampling(temperature=0, logit_bias=((end, 100.0),))
    tokens = prompt(engine, "Hello")
    generation = engine.generate(engine.new_sequence(), tokens, biased, max_tokens=50)
    assert generation.text() == "" and marker not in engine.detokenize(generation.tokens)
    assert generation.stats.finish_reason == "stop" and generation.stats.generated_tokens == 0
    # The same bias under --ignore-eos loses to the -inf that keeps end tokens out.
    ignoring = engine.generate(engine.new_sequence(), tokens, biased, max_tokens=5, ignore_eos=True)
    assert ignoring.text() and ignoring.stats.generated_tokens == 5 and end not in ignoring.tokens


def test_ignore_eos_generates_exactly_n(engine: Engine) -> None:
    text = "<start_of_turn>user\nSay OK.<end_of_turn>\n<start_of_turn>model\nOK"
    generation = engine.generate(engine.new_sequence(), engine.tokenize(text, special=True, add_bos=True),
                                 GREEDY, max_tokens=30, ignore_eos=True)
    generation.text()
    assert generation.stats.generated_tokens == 30 and generation.stats.finish_reason == "length"
    end = engine.special_token("<end_of_turn>")
    assert end not in generation.tokens and engine.special_token("<eos>") not in generation.tokens


def test_stop_strings(engine: Engine) -> None:
    tokens = prompt(engine, "1, 2, 3, 4,")
    full = engine.generate(engine.new_sequence(), tokens, GREEDY, max_tokens=24).text()
    generation = engine.generate(engine.new_sequence(), tokens, GREEDY, max_tokens=24, stop=(" 8,",))
    assert generation.text() == full[:full.index(" 8,")]
    assert generation.stats.finish_reason == "stop"


def test_stop_guard_holds_back_partial_matches() -> None:
    guard = StopGuard(("<END>",))
    assert guard.feed("hello <E") == ("hello ", False)
    assert guard.feed("N") == ("", False)
    assert guard.feed("D> tail") == ("", True)
    guard = StopGuard(("<END>",))
    assert guard.feed("a <") == ("a ", False)
    assert guard.feed("b") == ("<b", False)
    assert guard.feed(" <E", final=True) == (" <E", False)


def test_kv_prefix_is_reused_across_turns(engine: Engine) -> None:
    sequence = engine.new_sequence()
    first = prompt(engine, "A short story about a robot. Once upon a time,")
    generation = engine.generate(sequence, first, GREEDY, max_tokens=8)
    generation.text()
    assert generation.stats.reused_tokens == 0
    # The next turn extends what the sequence holds: only the new tokens are evaluated.
    follow = sequence.tokens + engine.tokenize(" Then the robot said")
    second = engine.generate(sequence, follow, GREEDY, max_tokens=4)
    second.text()
    assert second.stats.reused_tokens == len(first) + 8 - 1
    assert second.stats.evaluated_tokens == len(follow) - second.stats.reused_tokens
    assert second.stats.evaluated_tokens <= 6


def test_reuse_gives_the_same_tokens_as_a_fresh_sequence(engine: Engine) -> None:
    sequence = engine.new_sequence()
    engine.generate(sequence, prompt(engine, "The alphabet: A, B,"), GREEDY, max_tokens=6).text()
    # A rewind (shorter shared prefix) must evaluate again what it lost and stay correct.
    other = prompt(engine, "The alphabet: A, B, C, D, E")
    reused = engine.generate(sequence, other, GREEDY, max_tokens=6)
    reused_text = reused.text()
    assert reused.stats.reused_tokens > 0
    fresh = engine.generate(engine.new_sequence(), other, GREEDY, max_tokens=6)
    assert reused_text == fresh.text()


def test_prompt_over_the_context_is_refused_before_any_work(engine: Engine) -> None:
    with pytest.raises(PromptTooLong, match="context holds"):
        engine.generate(engine.new_sequence(), [engine.bos] + [100] * engine.n_ctx_seq, GREEDY)


def test_generation_stops_when_the_context_is_full(engine: Engine) -> None:
    tokens = prompt(engine, "Count: 1, 2, 3,")
    room = engine.n_ctx_seq - len(tokens)
    generation = engine.generate(engine.new_sequence(), tokens + [engine.tokenize(" 4")[0]] * (room - 8),
                                 GREEDY, max_tokens=-1, ignore_eos=True)
    generation.text()
    assert generation.stats.finish_reason == "length"
    assert generation.stats.generated_tokens <= 8


def test_cancellation_stops_between_tokens(engine: Engine) -> None:
    calls = []

    def cancelled() -> bool:  # asked before the prompt's one chunk, then before each next token
        calls.append(1)
        return len(calls) >= 4

    generation = engine.generate(engine.new_sequence(), prompt(engine, "Once"), GREEDY,
                                 max_tokens=100, cancelled=cancelled)
    generation.text()
    assert generation.stats.finish_reason == "cancelled" and generation.stats.generated_tokens == 3


def test_a_cancellation_reaches_a_reader_already_waiting_for_its_next_token(engine: Engine) -> None:
    read: list[str] = []

    def cancelled() -> bool:
        if len(read) < 2:
            return False
        # This runs on the decoding thread with the engine's lock held. Letting go of the lock for
        # a moment lets the reader block for its next token first: the interleaving in which the
        # cancellation once went unannounced and left the reader waiting for ever.
        engine._cond.wait(0.3)
        return True

    generation = engine.generate(engine.new_sequence(), prompt(engine, "Once"), GREEDY,
                                 max_tokens=100, cancelled=cancelled)
    finished = threading.Event()

    def reader() -> None:
        for piece in generation:
            read.append(piece)
        finished.set()

    threading.Thread(target=reader, daemon=True).start()
    assert finished.wait(20)
    assert generation.stats.finish_reason == "cancelled"


def test_an_inline_engine_decodes_on_the_reading_thread_with_the_same_results(engine: Engine) -> None:
    # --cli's engine: no scheduler thread; the reader decodes between the pieces it reads.
    with Engine(engine.path, engine.info, replace(engine.options, inline=True)) as inline:
        threads_before = threading.active_count()
        sequence = inline.new_sequence()
        first = prompt(inline, "Water boils at")
        assert inline.generate(sequence, first, GREEDY, max_tokens=10).text() == \
            engine.generate(engine.new_sequence(), first, GREEDY, max_tokens=10).text()
        follow = sequence.tokens + inline.tokenize(" and freezes at")
        second = inline.generate(sequence, follow, GREEDY, max_tokens=4)
        second.text()
        assert second.stats.reused_tokens == len(first) + 10 - 1
        assert threading.active_count() == threads_before
        cut = inline.generate(inline.new_sequence(), first, GREEDY, max_tokens=50,
                              cancelled=lambda: len(cut_pieces) >= 2)
        cut_pieces: list[str] = []
        for piece in cut:
            cut_pieces.append(piece)
        assert cut.stats.finish_reason == "cancelled"


def test_closing_waits_for_calls_on_other_threads_and_refuses_new_ones(engine: Engine) -> None:
    # The server's SIGTERM: freeing the model while requests were still tokenizing on their own
    # threads crashed it (a segfault in libllama.so, or SIGABRT).
    closing = Engine(engine.path, engine.info, engine.options)
    # 2,000 tokens, close to the 2048-token context: one of the slowest texts that fits. (1,300
    # repeats were 2,600 tokens: a call that ended before close() raised PromptTooLong, and the
    # test passed only when close() came first.)
    text = "s\n\n" * 1000
    assert len(engine.tokenize(text)) <= engine.n_ctx
    ended: list[str] = []

    def keep_calling() -> None:
        try:
            while True:
                closing.tokenize(text)
                closing.token_text(7)
                closing.meta("general.name")
        except EngineClosed:
            ended.append("closed")

    threads = [threading.Thread(target=keep_calling) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    closing.close()
    for thread in threads:
        thread.join(10)
    assert ended == ["closed"] * 4 and time.monotonic() - started < 5
    with pytest.raises(EngineClosed):
        closing.tokenize("too late")


def test_the_warm_up_at_load_leaves_no_trace(engine: Engine) -> None:
    # Like llama.cpp's tools, the engine decodes BOS and EOS once at load (engine._warm_up).
    with Engine(engine.path, engine.info, replace(engine.options, inline=True)) as fresh:
        # llama_perf_context reports counts of at least 1, so the times tell that the timers were reset.
        assert fresh.decode_times() == DecodeTimes(0.0, 1, 0.0, 1, 0)
        assert llama_cpp.llama_memory_seq_pos_max(fresh._memory, 0) == -1
        tokens = prompt(fresh, "Water boils at")
        generation = fresh.generate(fresh.new_sequence(), tokens, GREEDY, max_tokens=3)
        generation.text()
        assert generation.stats.reused_tokens == 0
        assert fresh.decode_times().prompt_tokens == len(tokens)


def test_every_decode_runs_on_the_scheduler_thread(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # ggml gives each calling thread its own OpenMP team; a second team (from a warm-up on the
    # loading thread, say) cost the server a fifth of its tokens/s. The wrapper only records.
    callers: list[str] = []
    decode = llama_cpp.llama_decode

    def recording_decode(*args):  # type: ignore[no-untyped-def]
        callers.append(threading.current_thread().name)
        return decode(*args)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
    with Engine(engine.path, engine.info, engine.options) as threaded:
        threaded.generate(threaded.new_sequence(), prompt(threaded, "Water boils at"), GREEDY, max_tokens=3).text()
    assert len(callers) >= 4 and set(callers) == {"gemma-chat decode"}


def test_context_size_rules(engine: Engine) -> None:
    assert engine.n_ctx_train == 32768
    assert engine.context_size_for(None) == 8192
    assert engine.context_size_for(0) == 32768
    assert engine.context_size_for(100000) == 32768
    assert engine.context_size_for(1024) == 1024
    assert engine.n_ctx == 2048
