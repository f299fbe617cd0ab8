"""The one settings object, built from command-line flags, the environment and the config file.

Every mode shares one argument parser: a flag that belongs to one mode is accepted (and ignored)
in the others, so a script that adds `--port` to a `--cli` call keeps working (llamafile's users
keep tripping over its two parsers).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from gemmachat import __version__
from gemmachat.config import CONFIG_ENV, apply_config, config_path, read_config
from gemmachat.errors import UserError
from gemmachat.structured import grammar_from_flags
from gemmachat.threads import usable_cpus

DEFAULT_CTX_CAP = 8192
# A base model (no chat template in its GGUF) rarely ends a turn by itself: without a cap, a reply
# that names no limit would run until the context is full. The chat and the server both apply it.
BASE_MODEL_REPLY_CAP = 256
# The chat's system prompt unless -p or -f gives one; a base model (no chat template) gets none,
# since it only continues text and would echo it.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise assistant. Answer the user's questions accurately, and say so "
    "when you do not know."
)
# llama.cpp's own defaults (common/common.h), so that our sampling matches llama-completion's.
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
RPC_WORKER_PORT = 50052  # llama.cpp's rpc-server's


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = LLAMA_DEFAULT_SEED
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) pairs, as OpenAI's logit_bias
    grammar: str | None = None  # GBNF the output must follow (gemmachat/structured.py)


@dataclass(frozen=True)
class Settings:
    mode: str  # "chat" (with background server), "chat-only", "cli", "server", "rpc-worker", "list-models" or "cache-info"
    model: Path | None
    hf_repo: str | None
    hf_file: str | None
    prompt: str | None
    prompt_file: str | None  # as typed: "-" is stdin, "./-" a file of that name
    system: str | None
    chat_turn: bool
    template: str
    jinja: bool
    special: bool
    ctx_size: int | None  # None: min(training context, 8192); 0: training context
    n_gpu_layers: int
    threads: int | None  # None: as many as other processes leave free (gemmachat/threads.py)
    batch_size: int
    ubatch_size: int
    flash_attn: str
    mlock: bool
    mmap: bool
    no_repack: bool
    n_predict: int
    ignore_eos: bool
    stop: tuple[str, ...]
    sampling: Sampling
    verbose: bool
    nologo: bool
    plain: bool
    host: str
    port: int
    api_key: str | None
    parallel: int
    keep_history: bool | None = None  # --history / --no-history; None: the chat keeps them
    resume: str | None = None  # "" for the latest conversation
    save_to: str | None = None
    nobrowser: bool = False  # --server opens the page in a browser unless this (or no display)
    temp_given: bool = False  # --temp on the command line, so no mode picks its own default
    remote: str | None = None  # --remote URL: an OpenAI-compatible server does the generating
    timeout: float = 600.0  # --remote: seconds to wait for the server's answer, or its next piece
    rpc: tuple[str, ...] = ()  # --rpc HOST:PORT,...: workers that hold the offloaded layers (gemmachat/rpc.py)
    allow_origins: tuple[str, ...] = ()  # --allow-origin: web origins the server also answers (same_origin.py)
    environ: Mapping[str, str] = field(repr=False, default_factory=dict)


def default_threads() -> int:
    # The CPUs this process may run on, not all of the machine's: containers and taskset narrow them.
    return max(1, len(usable_cpus()))


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, not {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # float() takes "nan" and "inf", which no sampler setting means
        raise argparse.ArgumentTypeError(f"expects a number, not {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)  # finite already
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expects a number of seconds above 0, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expects a whole number of 1 or more, not {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expects a whole number of 0 or more, not {text!r}")
    return value


def _port(text: str) -> int:
    value = _whole_number(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expects a port number from 1 to 65535, not {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage and exits; we want our one-line error and exit status 2.
        raise UserError(f"{message} (see gemma-chat --help)")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error("unrecognized arguments: " + " ".join(self._with_suggestion(word) for word in unknown))
        return parsed

    def _with_suggestion(self, word: str) -> str:
        """`--tmep` becomes `--tmep (did you mean --temp?)`: a typo is fixed without reading --help."""
        if not word.startswith("-"):
            return word
        options = [option for action in self._actions for option in action.option_strings]
        close = difflib.get_close_matches(word.partition("=")[0], options, n=1)
        return f"{word} (did you mean {close[0]}?)" if close else word


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gemma-chat",
        description=(
            "Chat with a local Gemma model in the terminal, run one-shot completions for scripts, "
            "or serve an OpenAI-compatible API. With no mode flag: the chat, with the server in "
            "the background."
        ),
        epilog=(
            "Model: -m PATH, else $GEMMA_CHAT_MODEL, else the model inside this program, else the "
            "default Gemma 3 270M. Examples: gemma-chat --cli -p 'The capital of France is' -n 24; "
            "echo 'Why is the sky blue?' | gemma-chat --cli --chat-turn. "
            "Config file: $GEMMA_CHAT_CONFIG, else config.toml in the user config folder "
            f"({config_path({})}); TOML keys are the long flag names, e.g. ctx-size = 4096, "
            "temp = 0.2, model = \"/path/model.gguf\", stop = [\"###\"]. Flags beat the "
            "environment ($GEMMA_CHAT_MODEL, $GEMMA_CHAT_API_KEY, $GEMMA_CHAT_REMOTE), which beats the "
            "config file."
        ),
    )
    parser.add_argument("--version", action="version", version=f"gemma-chat {__version__}")

    modes = parser.add_argument_group("modes (pick at most one)").add_mutually_exclusive_group()
    modes.add_argument("--cli", dest="mode", action="store_const", const="cli",
                       help="one-shot completion: print only the completion to stdout and exit")
    modes.add_argument("--chat", dest="mode", action="store_const", const="chat-only",
                       help="the interactive chat without the background server")
    modes.add_argument("--server", dest="mode", action="store_const", const="server",
                       help="only the OpenAI-compatible HTTP server")
    modes.add_argument("--rpc-worker", dest="mode", action="store_const", const="rpc-worker",
                       help="serve this machine's CPU to another gemma-chat's --rpc (llama.cpp's RPC "
                            "server, on --host, default 127.0.0.1, and --port, default 50052). It has NO "
                            "authentication: localhost or a private network only")
    modes.add_argument("--list-models", dest="mode", action="store_const", const="list-models",
                       help="list the Gemma short names for -hf and the models downloaded with -hf, then exit")
    modes.add_argument("--cache-info", dest="mode", action="store_const", const="cache-info",
                       help="list what the user cache folder holds (unpacked programs, model copies) "
                            "and their sizes, then exit")

    model = parser.add_argument_group("model and prompt")
    model.add_argument("-m", "--model", type=Path, metavar="PATH", help="GGUF model file")
    model.add_argument("-hf", "--hf-repo", metavar="USER/REPO[:QUANT]",
                       help="a GGUF from Hugging Face, downloaded once into the cache (quantisation "
                            "default Q4_K_M), or a short name such as gemma3:1b (--list-models); "
                            "HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE apply")
    model.add_argument("--hf-file", metavar="NAME", help="with -hf: the repository's file to use")
    model.add_argument("-p", "--prompt", metavar="TEXT",
                       help="--cli: the prompt (else -f, else stdin); chat: the system prompt "
                            f"(default: \"{DEFAULT_SYSTEM_PROMPT}\"; none for a base model, which "
                            "only continues text)")
    model.add_argument("-f", "--file", dest="prompt_file", metavar="FILE",
                       help="read the prompt from FILE (- for stdin)")
    model.add_argument("--system", metavar="TEXT",
                       help="system prompt for --cli --chat-turn (the chat takes it from -p)")
    model.add_argument("--chat-turn", action="store_true",
                       help="--cli: wrap the prompt as one user turn of the chat template, so "
                            "the model answers it as the assistant")
    model.add_argument("--template", default="gemma", metavar="NAME|PATH",
                       help="prompt template: a name from templates/ (gemma, llamafile, "
                            "llamafile-nosystem) or a .toml file (default: gemma, the official "
                            "Gemma format)")
    model.add_argument("--jinja", action="store_true",
                       help="use the GGUF's own chat template, rendered in a sandbox")
    model.add_argument("--special", action="store_true",
                       help="parse special tokens such as <start_of_turn> in prompt text "
                            "(off: they stay plain text)")

    engine = parser.add_argument_group("llama.cpp")
    engine.add_argument("-c", "--ctx-size", type=_non_negative_int, metavar="N",
                        help="context size in tokens; 0 = the model's training context "
                             f"(default: the training context, at most {DEFAULT_CTX_CAP}); with --server, "
                             "the total, split evenly between the -np slots")
    engine.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers",
                        type=_non_negative_int, default=0, metavar="N",
                        help="layers to offload to the GPU; 999 = all (default 0)")
    engine.add_argument("--rpc", metavar="HOST:PORT[,...]",
                        help="put the model's layers on these gemma-chat --rpc-worker machines "
                             "(llama.cpp's RPC backend; -ngl says how many layers leave this one, 999 = "
                             "all); also $GEMMA_CHAT_RPC, config key rpc = \"HOST:PORT\"")
    engine.add_argument("-t", "--threads", type=_positive_int, metavar="N",
                        help="CPU threads, fixed: one line at start says when other processes keep "
                             "them busy (default: the CPUs this process may use, fewer while other "
                             "processes keep some of them busy)")
    engine.add_argument("-b", "--batch-size", type=_positive_int, default=2048, metavar="N",
                        help="logical batch size for prompt processing (default 2048)")
    engine.add_argument("-ub", "--ubatch-size", type=_positive_int, default=512, metavar="N",
                        help="physical batch size (default 512)")
    engine.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"), default="auto",
                        help="flash attention (default auto, as llama.cpp)")
    engine.add_argument("--mlock", action="store_true", help="keep the model in RAM")
    engine.add_argument("--no-mmap", action="store_true", help="read the model instead of mapping it")
    engine.add_argument("--no-repack", action="store_true",
                        help="keep weights in plain CPU buffers: no repacked or AMX kernels (the "
                             "safe path; automatic on CPUs with AMX, whose kernels crash)")
    engine.add_argument("--verbose", action="store_true", help="show llama.cpp's log on stderr")
    engine.add_argument("--log-disable", action="store_true",
                        help="accepted for llamafile compatibility (gemma-chat is quiet by default)")

    sampling = parser.add_argument_group("generation")
    sampling.add_argument("-n", "--n-predict", type=_whole_number, default=-1, metavar="N",
                          help="tokens to generate; 0 = none (the prompt is only evaluated); -1 = until "
                               "a stop or the context is full (a base "
                               "model, with no chat template, stops its chat and API replies at "
                               f"{BASE_MODEL_REPLY_CAP})")
    sampling.add_argument("--temp", type=_number, metavar="T",
                          help="temperature; 0 = greedy (default 0 in the chat, 0.8 otherwise)")
    sampling.add_argument("--top-k", type=_whole_number, default=40, metavar="K", help="(default 40)")
    sampling.add_argument("--top-p", type=_number, default=0.95, metavar="P", help="(default 0.95)")
    sampling.add_argument("--min-p", type=_number, default=0.05, metavar="P", help="(default 0.05)")
    sampling.add_argument("--repeat-penalty", type=_number, default=1.0, metavar="X",
                          help="(default 1.0 = off)")
    sampling.add_argument("--repeat-last-n", type=_whole_number, default=64, metavar="N",
                          help="tokens the penalties look back on (default 64)")
    sampling.add_argument("--json-schema", metavar="SCHEMA|@FILE",
                          help="the output is JSON valid under this JSON schema (keywords that cannot be "
                               "enforced are refused by name)")
    sampling.add_argument("--grammar", metavar="GBNF", help="the output follows this llama.cpp grammar")
    sampling.add_argument("--grammar-file", type=Path, metavar="FILE", help="--grammar, read from a file")
    sampling.add_argument("--presence-penalty", type=_number, default=0.0, metavar="X")
    sampling.add_argument("--frequency-penalty", type=_number, default=0.0, metavar="X")
    sampling.add_argument("--seed", type=_whole_number, default=-1, metavar="N",
                          help="random seed; -1 = a new one each run")
    sampling.add_argument("--ignore-eos", action="store_true",
                          help="keep generating past the end-of-turn and end-of-text tokens")
    sampling.add_argument("--stop", action="append", default=[], metavar="STR",
                          help="stop when the output contains STR (repeatable)")

    chat = parser.add_argument_group("chat")
    chat.add_argument("--nologo", action="store_true", help="no banner")
    chat.add_argument("--plain", action="store_true",
                      help="plain text output, no colours or Markdown (also NO_COLOR)")

    kept = parser.add_argument_group(
        "conversations (kept in conversations.db in the user data folder, or $GEMMA_CHAT_DATA_DIR)")
    kept.add_argument("--history", dest="keep_history", action=argparse.BooleanOptionalAction, default=None,
                      help="keep every chat conversation as it happens (default: on; --server keeps "
                           "its conversations in memory only, --cli keeps only with --save-to or --resume); "
                           "config key: history = false")
    kept.add_argument("--resume", nargs="?", const="", metavar="ID|TITLE",
                      help="continue the latest conversation, or the one with this id or title "
                           "prefix (/history lists them); with --cli, -p is its next message")
    kept.add_argument("--save-to", metavar="TITLE",
                      help="--cli: continue the conversation titled TITLE (started if there is none) "
                           "and keep this exchange in it, so scripts can hold a conversation")

    remote = parser.add_argument_group("remote (the chat and --cli on another machine's server)")
    remote.add_argument("--remote", metavar="URL",
                        help="talk to the OpenAI-compatible server at URL (llama-server, vLLM, Ollama, "
                             "another gemma-chat --server) instead of loading a model: the chat and --cli "
                             "keep working, no model is loaded and no server started here; -m NAME picks "
                             "the server's model (default: the first it lists), --api-key is sent to it "
                             "(also $GEMMA_CHAT_REMOTE; config key: remote = \"URL\")")
    remote.add_argument("--local", action="store_true",
                        help="load the model here even though $GEMMA_CHAT_REMOTE or the config file "
                             "names a server")
    remote.add_argument("--timeout", type=_positive_number, default=600.0, metavar="SECONDS",
                        help="--remote: how long to wait for the server's answer or for its next piece "
                             "of a reply (default 600)")

    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=_port, metavar="PORT",
                        help="port (default 8080; 50052 for --rpc-worker)")
    server.add_argument("--api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (also $GEMMA_CHAT_API_KEY); with "
                             "--remote, the key sent to the server")
    server.add_argument("--allow-origin", metavar="URL[,URL...]",
                        help="web origins the server answers, with CORS headers, besides its own page: "
                             "a reverse proxy's public address (https://chat.example.com), a web app "
                             "(http://localhost:* for every port), a browser extension "
                             "(chrome-extension://*), or * for every site; other sites' pages are refused")
    server.add_argument("-np", "--parallel", type=_positive_int, default=4, metavar="N",
                        help="requests decoded at once, in one batch (default 4)")
    server.add_argument("--nobrowser", action="store_true",
                        help="--server: do not open the chat page in the default browser (it opens "
                             "only where there is a display)")
    return parser


def _given_on_command_line(argv: Sequence[str]) -> dict[str, object]:
    """The settings the command line itself gives, as argparse reads it (abbreviations, -mFILE,
    --flag=value): where a flag must beat what the environment or the config file gave."""
    parser = build_parser()
    for action in parser._actions:  # argparse has no public list of its options
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(list(argv)))


def _one_model(args: argparse.Namespace, given: Mapping[str, object],
               environ: Mapping[str, str]) -> tuple[Path | None, str | None]:
    """-m or -hf, whichever comes from the stronger source (flags, then environment, then config)."""
    if not args.hf_repo or not args.model:
        return args.model, args.hf_repo
    model_rank = 3 if "model" in given else 2 if environ.get("GEMMA_CHAT_MODEL") else 1
    hf_rank = 3 if "hf_repo" in given else 1
    if model_rank == hf_rank:
        where = "the command line" if model_rank == 3 else "the config file"
        raise UserError(f"{where} gives both a model (-m) and a Hugging Face repository (-hf): give one")
    return (args.model, None) if model_rank > hf_rank else (None, args.hf_repo)


def _api_key(key: str | None) -> str | None:
    """The key clients must send, or None for none. An empty key (`--api-key "$KEY"` with KEY unset)
    would turn authentication off unnoticed, and spaces at either end or control characters make a
    key no HTTP client can send: both are refused."""
    if key is None:
        return None
    if not key.strip():
        raise UserError("the API key is empty (from --api-key, $GEMMA_CHAT_API_KEY or api-key in the "
                        "config file): give one, or leave it out to serve without a key")
    if key != key.strip() or not (key.isascii() and key.isprintable()):
        raise UserError("the API key must be printable ASCII with no space at either end: clients send "
                        "it in an HTTP header")
    return key


def _remote_url(url: str | None) -> str | None:
    """The server's base URL, without a trailing /v1 (the paths we call add it): a URL copied from
    an OpenAI client's base_url works as well as the server's address."""
    if url is None:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--remote expects an http:// or https:// URL, not {url!r}")
    return url.strip().rstrip("/").removesuffix("/v1").rstrip("/")


def _origins(text: str) -> tuple[str, ...]:
    """`--allow-origin` as origins spelled as browsers send them: scheme://host[:port], lower case;
    or the patterns gemmachat/server/same_origin.py matches: *, scheme://*, scheme://host:*."""
    origins = []
    for item in filter(None, (part.strip().rstrip("/").lower() for part in text.split(","))):
        if item == "*" or re.fullmatch(r"[a-z][a-z0-9+.-]*://\*", item):
            origins.append(item)
            continue
        parts = urlsplit(item.removesuffix(":*"))
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.scheme or not parts.hostname or "*" in parts.hostname or parts.path or parts.query or (
                port == -1 or item.endswith(":*") and port is not None):
            raise UserError(f"--allow-origin {item!r} is not an origin such as https://chat.example.com")
        if port is not None and port == {"http": 80, "https": 443}.get(parts.scheme):  # browsers leave it out
            item = f"{parts.scheme}://{parts.netloc.rpartition(':')[0]}"
        origins.append(item)
    return tuple(origins)


def _rpc_endpoints(text: str) -> tuple[str, ...]:
    """`--rpc` as (HOST:PORT, ...); a malformed one is refused here, not by an abort in llama.cpp."""
    endpoints = tuple(item.strip() for item in text.split(",") if item.strip())
    if not endpoints:
        raise UserError("--rpc expects HOST:PORT[,HOST:PORT...], for example 127.0.0.1:50052")
    for endpoint in endpoints:
        host, colon, port = endpoint.rpartition(":")
        if not colon or not host or not port.isdecimal() or not 0 < int(port) < 65536:
            raise UserError(f"--rpc expects HOST:PORT[,HOST:PORT...], not {endpoint!r}")
    return endpoints


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    parser = build_parser()
    # Each source replaces the parser's defaults in turn, so the flags parsed last win.
    path = config_path(environ)
    apply_config(parser, read_config(path, required=bool(environ.get(CONFIG_ENV))), path)
    config_model, config_remote = parser.get_default("model"), parser.get_default("remote")
    if environ.get("GEMMA_CHAT_MODEL"):
        parser.set_defaults(model=Path(environ["GEMMA_CHAT_MODEL"]))
    if environ.get("GEMMA_CHAT_REMOTE"):
        parser.set_defaults(remote=environ["GEMMA_CHAT_REMOTE"])
    if environ.get("GEMMA_CHAT_RPC"):
        parser.set_defaults(rpc=environ["GEMMA_CHAT_RPC"])
    if "GEMMA_CHAT_API_KEY" in environ:  # set but empty is refused below, not taken as "no key"
        parser.set_defaults(api_key=environ["GEMMA_CHAT_API_KEY"])
    args = parser.parse_args(list(argv))
    given = _given_on_command_line(argv)
    mode = args.mode or "chat"
    in_chat = mode in ("chat", "chat-only")
    temperature = args.temp if args.temp is not None else (0.0 if in_chat else 0.8)
    prompt, prompt_file = args.prompt, args.prompt_file
    if mode == "cli":
        # The prompt is each call's own: a config file's -p or -f (the chat's system prompt) is not
        # it, and stdin is still read.
        prompt, prompt_file = given.get("prompt"), given.get("prompt_file")
    elif prompt is not None and prompt_file is not None and ("prompt" in given) != ("prompt_file" in given):
        prompt, prompt_file = (prompt, None) if "prompt" in given else (None, prompt_file)
    if prompt is not None and prompt_file is not None:
        raise UserError("give the prompt with -p or -f, not both")
    if args.repeat_penalty <= 0:
        raise UserError("--repeat-penalty must be greater than 0")
    if args.hf_file and not args.hf_repo:
        raise UserError("--hf-file names a file of the repository given with -hf")
    model, hf_repo = _one_model(args, given, environ)
    if args.save_to is not None and not args.save_to.strip():  # each call would start a new conversation
        raise UserError("--save-to needs a title: --save-to notes continues the conversation titled notes")
    if args.resume is not None and args.save_to is not None:
        raise UserError("give --resume or --save-to, not both")
    if args.keep_history is False and (args.resume is not None or args.save_to is not None):
        raise UserError("--resume and --save-to need the stored conversations, which --no-history "
                        "(or history = false in the config) turns off")
    if args.local and "remote" in given:
        raise UserError("give --remote URL or --local, not both")
    # A server named by the environment or the config file is for the chat and --cli: --server and
    # --rpc-worker load the model here whatever it says.
    loads_here = args.local or (mode in ("server", "rpc-worker") and "remote" not in given)
    remote = None if loads_here else _remote_url(args.remote)
    if "model" not in given and hf_repo is None:
        # A config file that names a remote names its model's name on that server with it;
        # $GEMMA_CHAT_MODEL names a file here: each is for its own side.
        if remote is not None:
            model = config_model if config_remote else None
        elif config_remote and model == config_model:  # --local, --server: not the server's name
            model = None
    if remote is not None and hf_repo is not None:
        raise UserError("--remote uses a model of the server's: name it with -m NAME, not -hf")
    if remote is not None and mode == "server":
        raise UserError("--remote is for the chat and --cli; --server serves a model loaded here")
    rpc = _rpc_endpoints(args.rpc) if args.rpc else ()
    if rpc and remote is not None:
        raise UserError("--rpc spreads a model loaded here over workers; --remote loads none here: give one")
    if rpc and mode == "rpc-worker":
        raise UserError("--rpc-worker serves this machine to a client's --rpc: give one of them")
    port = args.port if args.port is not None else RPC_WORKER_PORT if mode == "rpc-worker" else 8080
    return Settings(
        mode=mode,
        model=model,
        hf_repo=hf_repo,
        hf_file=args.hf_file if hf_repo else None,
        prompt=prompt,
        prompt_file=prompt_file,
        system=args.system,
        chat_turn=args.chat_turn,
        template=args.template,
        jinja=args.jinja,
        special=args.special,
        ctx_size=args.ctx_size,
        n_gpu_layers=args.n_gpu_layers,
        threads=args.threads,
        batch_size=args.batch_size,
        ubatch_size=min(args.ubatch_size, args.batch_size),
        flash_attn=args.flash_attn,
        mlock=args.mlock,
        mmap=not args.no_mmap,
        no_repack=args.no_repack,
        n_predict=args.n_predict,
        ignore_eos=args.ignore_eos,
        # Flags replace the config file's list: argparse would have added to it.
        stop=tuple(s for s in given.get("stop", args.stop) if s),  # type: ignore[union-attr]
        sampling=Sampling(
            temperature=temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repeat_penalty=args.repeat_penalty,
            repeat_last_n=args.repeat_last_n,
            frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
            seed=LLAMA_DEFAULT_SEED if args.seed < 0 else args.seed,
            grammar=grammar_from_flags(args.json_schema, args.grammar, args.grammar_file),
        ),
        verbose=args.verbose,
        nologo=args.nologo,
        plain=args.plain or bool(environ.get("NO_COLOR")),
        host=args.host,
        port=port,
        api_key=_api_key(args.api_key),
        parallel=args.parallel,
        keep_history=args.keep_history,
        resume=args.resume,
        save_to=args.save_to,
        nobrowser=args.nobrowser,
        temp_given=args.temp is not None,
        remote=remote,
        timeout=args.timeout,
        rpc=rpc,
        allow_origins=_origins(args.allow_origin) if args.allow_origin else (),
        environ=environ,
    )
