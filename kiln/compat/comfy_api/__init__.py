"""``comfy_api``: ComfyUI's V3 node API, ``comfy_api.latest`` (read as a third contract), and the pinned
``comfy_api.v0_0_2`` (the same classes, with the ``ComfyAPI``/``ComfyAPISync`` progress API). Other
``comfy_api.*`` modules are placeholders, so a pack that merely imports them still loads."""
