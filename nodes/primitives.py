"""Primitive value nodes: an INT, FLOAT, STRING, BOOLEAN or seed typed once and wired to many inputs."""

from __future__ import annotations

import sys
from typing import Annotated

from kiln.engine import SEED_MAX, Boolean, Float, Int, Node, String


class PrimitiveInt(Node):
    display_name = "Int"
    category = "utils/primitive"
    outputs = ("INT",)

    def run(self, value: Annotated[int, Int(min=-sys.maxsize, max=sys.maxsize, control_after_generate=True)] = 0):
        return value


class PrimitiveFloat(Node):
    display_name = "Float"
    category = "utils/primitive"
    outputs = ("FLOAT",)

    def run(self, value: Annotated[float, Float(min=-sys.maxsize, max=sys.maxsize)] = 0.0):
        return value


class PrimitiveString(Node):
    display_name = "String"
    category = "utils/primitive"
    outputs = ("STRING",)

    def run(self, value: Annotated[str, String()] = ""):
        return value


class PrimitiveStringMultiline(Node):
    display_name = "String (Multiline)"
    category = "utils/primitive"
    outputs = ("STRING",)

    def run(self, value: Annotated[str, String(multiline=True)] = ""):
        return value


class PrimitiveBoolean(Node):
    display_name = "Boolean"
    category = "utils/primitive"
    outputs = ("BOOLEAN",)

    def run(self, value: Annotated[bool, Boolean()] = False):
        return value


class PrimitiveSeed(Node):
    """A seed shared by several samplers; the UI's control_after_generate widget can randomise it."""

    display_name = "Seed"
    category = "utils/primitive"
    outputs = ("INT",)

    def run(self, seed: Annotated[int, Int(min=0, max=SEED_MAX, control_after_generate=True)] = 0):
        return seed


NODES = [PrimitiveInt, PrimitiveFloat, PrimitiveString, PrimitiveStringMultiline, PrimitiveBoolean, PrimitiveSeed]
