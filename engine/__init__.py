"""Kiln's pure core: node contract, registry, graph model, validation, cache, executor, events.

This package imports no torch, aiohttp, ``nodes`` or ``server`` code, so it is fast to import and
embeddable anywhere.
"""

from .cache import Cache, make_cache
from .context import (
    ProgressBar,
    RunOptions,
    active_folders,
    check_interrupted,
    current,
    progress,
    progress_text,
    use_folders,
)
from .errors import (
    ExecutionFailed,
    GraphFormatError,
    Interrupted,
    KilnError,
    NodeDefinitionError,
    NodeError,
    ValidationFailed,
)
from .events import Preview
from .executor import Executor, RunResult
from .expansion import GraphBuilder
from .folders import Folders, UnsafePath, get_folders, safe_join
from .graph import BadLink, Graph, Link, NodeEntry, Submission, parse_submission
from .issues import Issue, NodeProblems
from .node import ExecutionBlocker, Node, NodeResult, NodeSpec, TensorEstimate
from .registry import Registry
from .types import (
    ANY,
    BOOLEAN,
    COMBO,
    FLOAT,
    INT,
    MAX_RESOLUTION,
    SEED_MAX,
    STRING,
    Boolean,
    Combo,
    Float,
    Hidden,
    InputSpec,
    Int,
    Output,
    OutputSpec,
    Socket,
    String,
)
from .validation import ValidationResult, validate

__all__ = [n for n in dir() if not n.startswith("_")]
