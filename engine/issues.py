"""What validation found: typed problems per node, and the result the executor runs from.

Consumers render these in their own format: the server as ComfyUI's error body
(``kiln.server.protocol``), the CLI as one line per problem.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from .errors import ValidationFailed
from .graph import Graph


@dataclass
class Issue:
    """One problem. ``kind`` is a fixed code (``value_not_in_list``, ``required_input_missing``, ...);
    ``extra`` holds what the kind needs (``input_name``, ``received_value``, ``hint``, ``cycle``, ...)."""

    kind: str
    message: str
    details: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, kind: str, message: str, details: str = "", **extra: Any) -> Issue:
        return cls(kind, message, details, extra)

    @property
    def hint(self) -> str | None:
        return self.extra.get("hint")


@dataclass
class NodeProblems:
    """A node's problems and the outputs that cannot be produced because of them."""

    class_type: Any
    issues: list[Issue] = field(default_factory=list)
    dependent_outputs: list[str] = field(default_factory=list)


@dataclass
class ValidationResult:
    ok: bool
    error: Issue | None = None  # why the graph as a whole cannot run (None when ok)
    problems: dict[str, NodeProblems] = field(default_factory=dict)  # node id -> its problems
    outputs: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # nodes upstream of the outputs, sources first
    graph: weakref.ref | None = field(default=None, repr=False, compare=False)  # the graph validated (see below)
    # node id -> things that do not stop the run but are probably mistakes (an input the node does not have)
    warnings: dict[str, list[Issue]] = field(default_factory=dict)

    def messages(self) -> list[str]:
        """Readable lines, one per problem."""
        lines = []
        if self.error and (not self.problems or self.error.kind != "prompt_outputs_failed_validation"):
            d = self.error.details
            lines.append(self.error.hint or self.error.message + (f": {d}" if d else ""))
        for node in self.problems.values():
            for e in node.issues:
                lines.append(e.hint or f"{e.message}: {e.details}")
        return lines

    def warning_messages(self) -> list[str]:
        return [w.hint or f"{w.message}: {w.details}" for ws in self.warnings.values() for w in ws]

    def summary(self) -> str:
        return "\n".join(self.messages())

    def raise_for_errors(self) -> None:
        if not self.ok:
            raise ValidationFailed(self, self.summary())

    def bind(self, graph: Graph) -> ValidationResult:
        self.graph = weakref.ref(graph)
        return self

    def check_belongs_to(self, graph: Graph) -> None:
        """Refuse to run ``graph`` from a validation of another graph object (its coercions and order would
        not apply). A result made by hand, not by ``validate``, is trusted."""
        if self.graph is not None and self.graph() is not graph:
            raise ValueError("this validation result was made for another graph; validate the graph you run")
