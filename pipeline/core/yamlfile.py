"""YAML as the project reads it: `yaml.safe_load` without aliases, from text of a bounded size.

A study or training file is small and written by hand, so two YAML features are refused rather than bounded:
aliases (`*name`), whose expansion makes a 400-byte file a billion-element document ("billion laughs"), and
files over `MAX_YAML_BYTES`. Anchors alone (`&name`) are harmless and accepted. Both refusals are
`yaml.YAMLError`s, so a caller's existing "not valid YAML" handling names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import InputError, brief, one_line

MAX_YAML_BYTES = 1 << 20  # 1 MiB: the largest preset or study shipped is ~5 KB


class YamlRefused(yaml.YAMLError):
    """YAML that parses but is not accepted here (an alias, a file too large)."""


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that stops at the first alias, before anything is expanded."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise YamlRefused(
                f"aliases (*name) are not accepted (line {mark.line + 1}, column {mark.column + 1}): "
                "write the value out"
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)` without aliases, for text of at most MAX_YAML_BYTES bytes (YamlRefused otherwise)."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlRefused(f"{len(text)} characters of YAML, more than the {MAX_YAML_BYTES} accepted")
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml_file(path: str | Path) -> Any:
    """`load_yaml` of a UTF-8 file, its size checked before it is read."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise YamlRefused(f"a YAML file of {size} bytes, more than the {MAX_YAML_BYTES} accepted")
    return load_yaml(path.read_text(encoding="utf-8"))


class SettingError(InputError):
    """A `--set KEY=VALUE` that cannot be read (its message names it); each caller raises its own error type."""


def parse_setting(text: str, example: str, empty: Any = None) -> tuple[str, Any]:
    """`KEY=VALUE` (one `--set`, of a training config or a study file) -> (KEY, VALUE read by `load_yaml`);
    `empty` for `KEY=`. SettingError (`--set 'TEXT': ...`, with `example` of a good one) otherwise; what a key
    may be is the caller's schema."""
    if "=" not in text:
        raise SettingError(f"--set {brief(text)}: expected KEY=VALUE, e.g. {example}")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else empty
    except yaml.YAMLError as error:
        raise SettingError(f"--set {brief(text)}: the value is not valid YAML ({one_line(error)})") from None
    return key.strip(), value
