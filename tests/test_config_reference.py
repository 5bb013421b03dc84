"""docs/CONFIG_REFERENCE.md is what tools/config_reference.py writes from the config dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

from tests.helpers import ROOT, load_tool


def _tool() -> ModuleType:
    return load_tool("config_reference")


@dataclass(frozen=True)
class _Example:
    """A section as a method file would write it."""

    plain: int = 3
    # a block above,
    # on two lines
    mode: Literal["a", "b"] = "b"  # and one beside
    pair: tuple[float, float] = (0.5, 1.0)
    many: tuple[str, ...] = field(default_factory=tuple)

    unrelated: bool = False  # the blank line above ends the previous field's block


def test_keys_read_types_defaults_choices_and_comments() -> None:
    doc, keys = _tool().section_keys(_Example, "example")
    assert doc == "A section as a method file would write it."
    by_name = {k.name: k for k in keys}
    assert [k.name for k in keys] == ["plain", "mode", "pair", "many", "unrelated"]
    assert (by_name["plain"].type, by_name["plain"].default, by_name["plain"].help) == \
        ("int", "3", "")
    assert by_name["mode"].choices == ("a", "b")
    assert by_name["mode"].default == '"b"'
    assert by_name["mode"].help == "a block above, on two lines and one beside"
    assert by_name["pair"].default == "[0.5, 1.0]"
    assert by_name["many"].default == "[]"
    assert by_name["unrelated"].help == "the blank line above ends the previous field's block"


def test_every_section_and_registered_choice_is_documented() -> None:
    tool = _tool()
    text = tool.render()
    sections = tool.all_sections()
    assert {"run", "data", "optim", "ema", "moco"} <= set(sections)  # Config's own + registered
    for key in sections:
        assert f"## `{key}`" in text
    # method.name's choices come from the registry, data.corrupt's from its Literal
    assert "| `method.name` | `str` | `\"byol\"` | `byol` \\| " in text
    assert "`fail` \\| `skip` \\| `trust`" in text


def test_the_committed_reference_is_up_to_date() -> None:
    tool = _tool()
    committed = (ROOT / "docs" / "CONFIG_REFERENCE.md").read_text()
    assert committed == tool.render(), (
        "docs/CONFIG_REFERENCE.md is stale; regenerate it with: python tools/config_reference.py")
