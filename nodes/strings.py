"""String nodes with ComfyUI's names, inputs and behaviour: concatenate, substring, length, compare,
contains, replace, trim, case, and regular-expression match / extract / replace.

Regular expressions use Python's ``re`` syntax with ComfyUI's flags (case_insensitive, multiline, dotall).
Unlike ComfyUI, which silently returns False or "" for a broken pattern, an invalid pattern is an error
that names the input. Patterns and texts are capped in length (see the limits below) so one request cannot
tie up the worker with a pathological input.
"""

from __future__ import annotations

import re
from typing import Annotated

from kiln.engine import Boolean, Combo, Int, Node, NodeError, Output, String

CATEGORY = "utils/string"
MAX_PATTERN_CHARS = 10_000
MAX_TEXT_CHARS = 1_000_000


class StringConcatenate(Node):
    """``string_a``, then ``delimiter``, then ``string_b``."""

    display_name = "Concatenate"
    category = CATEGORY
    outputs = ("STRING",)

    def run(
        self,
        string_a: Annotated[str, String(multiline=True)],
        string_b: Annotated[str, String(multiline=True)],
        delimiter: Annotated[str, String(extra={"multiline": False})] = "",
    ) -> str:
        return delimiter.join((string_a, string_b))


class StringSubstring(Node):
    """Characters ``start`` up to (not including) ``end``; negative positions count from the end."""

    display_name = "Substring"
    category = CATEGORY
    outputs = ("STRING",)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        start: Annotated[int, Int()],
        end: Annotated[int, Int()],
    ) -> str:
        return string[start:end]


class StringLength(Node):
    """The number of characters."""

    display_name = "Length"
    category = CATEGORY
    outputs = (Output("INT", "length"),)

    def run(self, string: Annotated[str, String(multiline=True)]) -> int:
        return len(string)


class StringCompare(Node):
    """Whether ``string_a`` starts with, ends with, or equals ``string_b``."""

    display_name = "Compare"
    category = CATEGORY
    outputs = ("BOOLEAN",)

    def run(
        self,
        string_a: Annotated[str, String(multiline=True)],
        string_b: Annotated[str, String(multiline=True)],
        mode: Annotated[str, Combo(["Starts With", "Ends With", "Equal"], v3=True)] = "Starts With",
        case_sensitive: Annotated[bool, Boolean()] = True,
    ) -> bool:
        a, b = (string_a, string_b) if case_sensitive else (string_a.lower(), string_b.lower())
        if mode == "Equal":
            return a == b
        if mode == "Starts With":
            return a.startswith(b)
        if mode == "Ends With":
            return a.endswith(b)
        raise NodeError(f"unknown mode {mode!r}; one of Starts With, Ends With, Equal", input_name="mode")


class StringContains(Node):
    """Whether ``substring`` occurs in ``string``."""

    display_name = "Contains"
    category = CATEGORY
    outputs = (Output("BOOLEAN", "contains"),)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        substring: Annotated[str, String(multiline=True)],
        case_sensitive: Annotated[bool, Boolean()] = True,
    ) -> bool:
        return substring in string if case_sensitive else substring.lower() in string.lower()


class StringReplace(Node):
    """Replace every occurrence of ``find`` (plain text) with ``replace``."""

    display_name = "Replace"
    category = CATEGORY
    outputs = ("STRING",)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        find: Annotated[str, String(multiline=True)],
        replace: Annotated[str, String(multiline=True)],
    ) -> str:
        return string.replace(find, replace)


class StringTrim(Node):
    """Remove whitespace at both ends, the start (Left) or the end (Right)."""

    display_name = "Trim"
    category = CATEGORY
    outputs = ("STRING",)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        mode: Annotated[str, Combo(["Both", "Left", "Right"], v3=True)] = "Both",
    ) -> str:
        if mode == "Left":
            return string.lstrip()
        if mode == "Right":
            return string.rstrip()
        return string.strip()


class CaseConverter(Node):
    """UPPERCASE, lowercase, Capitalize (first letter only) or Title Case."""

    display_name = "Case Converter"
    category = CATEGORY
    outputs = ("STRING",)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        mode: Annotated[str, Combo(["UPPERCASE", "lowercase", "Capitalize", "Title Case"], v3=True)] = "UPPERCASE",
    ) -> str:
        if mode == "UPPERCASE":
            return string.upper()
        if mode == "lowercase":
            return string.lower()
        if mode == "Capitalize":
            return string.capitalize()
        if mode == "Title Case":
            return string.title()
        return string


def compile_pattern(
    pattern: str, string: str, case_insensitive: bool, multiline: bool, dotall: bool
) -> re.Pattern[str]:
    """Compile ``pattern`` with ComfyUI's flags, refusing oversized inputs and invalid patterns cleanly."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise NodeError(
            f"regex_pattern is {len(pattern):,} characters; the limit is {MAX_PATTERN_CHARS:,}",
            input_name="regex_pattern",
            hint="use a shorter pattern",
        )
    if len(string) > MAX_TEXT_CHARS:
        raise NodeError(
            f"string is {len(string):,} characters; regular expressions are limited to {MAX_TEXT_CHARS:,}",
            input_name="string",
            hint="split the text first, or use the plain-text string nodes",
        )
    flags = (re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0)
    flags |= re.DOTALL if dotall else 0
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise NodeError(
            f"invalid regular expression {pattern!r}: {exc}",
            input_name="regex_pattern",
            hint="check brackets and escapes; a literal character such as ( or . needs a backslash",
        ) from None


class RegexMatch(Node):
    """Whether the pattern is found anywhere in the string."""

    display_name = "Regex Match"
    category = CATEGORY
    outputs = (Output("BOOLEAN", "matches"),)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        regex_pattern: Annotated[str, String(multiline=True)],
        case_insensitive: Annotated[bool, Boolean()] = True,
        multiline: Annotated[bool, Boolean()] = False,
        dotall: Annotated[bool, Boolean()] = False,
    ) -> bool:
        return compile_pattern(regex_pattern, string, case_insensitive, multiline, dotall).search(string) is not None


EXTRACT_MODES = ["First Match", "All Matches", "First Group", "All Groups"]


class RegexExtract(Node):
    """Text matched by the pattern: the first match, all matches (one per line; the first group's text when
    the pattern has groups, as ComfyUI does), or group ``group_index`` of the first match / of every match.
    Nothing found gives an empty string."""

    display_name = "Regex Extract"
    category = CATEGORY
    outputs = ("STRING",)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        regex_pattern: Annotated[str, String(multiline=True)],
        mode: Annotated[str, Combo(EXTRACT_MODES, v3=True)] = "First Match",
        case_insensitive: Annotated[bool, Boolean()] = True,
        multiline: Annotated[bool, Boolean()] = False,
        dotall: Annotated[bool, Boolean()] = False,
        group_index: Annotated[int, Int(min=0, max=100, tooltip="group number; 0 is the whole match")] = 1,
    ) -> str:
        rx = compile_pattern(regex_pattern, string, case_insensitive, multiline, dotall)
        if mode == "First Match":
            m = rx.search(string)
            return m.group(0) if m else ""
        if mode == "All Matches":
            g = 1 if rx.groups else 0
            return "\n".join(m.group(g) or "" for m in rx.finditer(string))
        if mode == "First Group":
            m = rx.search(string)
            return (m.group(group_index) or "") if m and rx.groups >= group_index else ""
        if mode == "All Groups":
            if not rx.groups or rx.groups < group_index:
                return ""
            return "\n".join(m.group(group_index) or "" for m in rx.finditer(string))
        raise NodeError(f"unknown mode {mode!r}; one of {EXTRACT_MODES}", input_name="mode")


class RegexReplace(Node):
    """Replace matches of the pattern with ``replace`` (which may refer to groups as \\1 or \\g<name>);
    ``count`` 0 replaces every match, otherwise at most that many."""

    display_name = "Regex Replace"
    category = CATEGORY
    outputs = ("STRING",)

    def run(
        self,
        string: Annotated[str, String(multiline=True)],
        regex_pattern: Annotated[str, String(multiline=True)],
        replace: Annotated[str, String(multiline=True)],
        case_insensitive: Annotated[bool, Boolean(optional=True)] = True,
        multiline: Annotated[bool, Boolean(optional=True)] = False,
        dotall: Annotated[bool, Boolean(optional=True, tooltip="'.' also matches newlines")] = False,
        count: Annotated[int, Int(min=0, max=100, optional=True, tooltip="0 replaces every match")] = 0,
    ) -> str:
        rx = compile_pattern(regex_pattern, string, case_insensitive, multiline, dotall)
        if count < 0:
            raise NodeError(f"count must be 0 (all) or more, got {count}", input_name="count")
        try:
            return rx.sub(replace, string, count=count)
        except (re.error, IndexError) as exc:
            raise NodeError(
                f"invalid replacement {replace!r}: {exc}",
                input_name="replace",
                hint="refer only to groups the pattern has (\\1, \\g<name>); write a literal backslash as \\\\",
            ) from None


NODES = [
    StringConcatenate,
    StringSubstring,
    StringLength,
    StringCompare,
    StringContains,
    StringReplace,
    StringTrim,
    CaseConverter,
    RegexMatch,
    RegexExtract,
    RegexReplace,
]
