"""The config file: a TOML file whose keys are the long flag names, read into the parser's defaults.

Precedence is flags > environment > config file > built-in defaults; the config file only ever
replaces a default, so a flag always wins. A file that is not TOML, a key or a value that is
wrong is an error naming the file (and the key), the file left as it is: guessing what was meant
would hide the mistake, and starting without it, a server would run without the api-key it names.
The prompt (-p, -f) of a config file is the chat's system prompt; --cli takes its prompt from each
call (gemmachat/settings.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping

import platformdirs

from gemmachat.errors import UserError
from gemmachat.safe_io import MissingFile, read_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_ENV = "GEMMA_CHAT_CONFIG"
CONFIG_LIMIT = 1 << 20
# Flags that are not settings: they print something and exit.
NOT_SETTINGS = ("help", "version")


def config_path(environ: Mapping[str, str]) -> Path:
    override = environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir("gemma-chat")) / "config.toml"


def read_config(path: Path, *, required: bool) -> dict[str, object]:
    """The file's table; {} if there is none. One that does not parse is refused in one line and
    left as it is, as a wrong key is: started without it, a server would have run without the
    api-key it names (it was renamed aside with a warning)."""
    try:
        data = read_file(path, CONFIG_LIMIT, "a config file may be", name="config file")
    except MissingFile:
        if required:
            raise UserError(f"config file {path} (from ${CONFIG_ENV}) does not exist") from None
        return {}
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as error:
        reason = ("not UTF-8" if isinstance(error, UnicodeDecodeError) else
                  "not valid TOML (nested too deeply)" if isinstance(error, RecursionError) else
                  f"not valid TOML ({error})")
        raise UserError(f"config file {path} is {reason}: correct it, or move it away") from None


def apply_config(parser: argparse.ArgumentParser, table: Mapping[str, object], path: Path) -> None:
    """Turn each key into the default of the flag it names, checked as the flag's value would be."""
    actions = {
        option[2:]: action
        for action in parser._actions  # argparse has no public list of its options
        for option in action.option_strings
        if option.startswith("--") and action.dest not in NOT_SETTINGS
    }
    for key, value in table.items():
        action = actions.get(key)
        if action is None:
            raise UserError(f"config file {path}: unknown key '{key}' (keys are long flag names, "
                            "see gemma-chat --help)")
        parser.set_defaults(**{action.dest: _value_for(action, key, value, path)})


def _value_for(action: argparse.Action, key: str, value: object, path: Path) -> object:
    def wrong(expected: str) -> UserError:
        return UserError(f"config file {path}: key '{key}' must be {expected}, not {value!r}")

    if isinstance(action, argparse.BooleanOptionalAction):  # history = false, or no-history = true
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value != key.startswith("no-")
    if action.nargs == 0:  # a switch: --mlock, --cli ...
        if not isinstance(value, bool):
            raise wrong("true or false")
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise wrong("a list of strings")
        return list(value)
    if action.type in (None, str, Path):
        if not isinstance(value, str):
            raise wrong("a string")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        # A number flag's own type then says which numbers it takes (whole, in range).
        raise wrong("a number")
    try:
        converted = action.type(str(value)) if action.type else value
        if isinstance(converted, Path):
            converted = converted.expanduser()
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise UserError(f"config file {path}: key '{key}': {error}") from None
    if action.choices is not None and converted not in action.choices:
        raise wrong("one of " + ", ".join(map(str, action.choices)))
    return converted
