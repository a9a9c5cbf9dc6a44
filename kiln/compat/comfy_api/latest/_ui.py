"""``comfy_api.latest.ui``: UI payloads a V3 node returns (images saved to the output or temp folder)."""

from __future__ import annotations

from typing import Any


class _UIOutput:
    def __init__(self, payload: dict):
        self.payload = payload

    def as_dict(self) -> dict:
        return self.payload


class SavedImages(_UIOutput):
    def __init__(self, results: list[dict]):
        super().__init__({"images": results})


class PreviewImage(_UIOutput):
    """Writes ``image`` into the temp folder and shows it on the node."""

    def __init__(self, image: Any, animated: bool = False, cls: Any = None, **kwargs: Any):
        from ...nodes import PreviewImage as _Preview

        super().__init__(_Preview().save_images(image)["ui"])


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs: Any):
        super().__init__({"text": [value]})
