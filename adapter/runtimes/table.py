"""One runtime's table of the node's config, `[runtimes.<name>]`, as its options.py reads it.

Each read checks the value's type, and every refusal is a ConfigError that names the file and the
key (`<file>: runtimes.<name>.<key>`). A runtime's parser asks for every key it knows, so a key
nobody asked for is a typo or a key of another runtime: `refuse_unread` names it, with the keys
that were asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from adapter.core.errors import ConfigError


class RuntimeTable:
    def __init__(self, values: Mapping[str, object], where: str, state_dir: Path) -> None:
        self._values = values
        self.where = where  # "<file>: runtimes.<name>"
        self.state_dir = state_dir  # the node's, for defaults that live in it
        self._asked: set[str] = set()

    def error(self, key: str, expected: str) -> ConfigError:
        """The refusal of the value at `key`: what was expected and what the table holds."""
        return self.refusal(key, f"expected {expected}, got {self._values.get(key)!r}")

    def refusal(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: {why}")

    def _get(self, key: str, kinds: tuple[type, ...], expected: str) -> object:
        self._asked.add(key)
        value = self._values.get(key)
        # bool is an int in Python; a `true` where a number is expected is still a mistake.
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if value is not None and (wrong_bool or not isinstance(value, kinds)):
            raise self.error(key, expected)
        return value

    def optional_text(self, key: str) -> str | None:
        value = self._get(key, (str,), "str")
        return value if isinstance(value, str) else None

    def text(self, key: str, default: str) -> str:
        value = self.optional_text(key)
        return default if value is None else value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "bool")
        return value if isinstance(value, bool) else default

    def integer(self, key: str, default: int) -> int:
        value = self._get(key, (int,), "int")
        return value if isinstance(value, int) else default

    def number(self, key: str, default: float) -> float:
        """A float, or an integer written without its `.0`."""
        value = self._get(key, (int, float), "float")
        return float(value) if isinstance(value, (int, float)) else default

    def subtable(self, key: str, expected: str) -> Mapping[str, object]:
        value = self._get(key, (dict,), expected)
        return value if isinstance(value, dict) else {}

    def refuse_unread(self) -> None:
        for key in self._values:
            if key not in self._asked:
                raise self.refusal(key, f"unknown key; known keys: {sorted(self._asked)}")
