"""``comfy_api``: ComfyUI's V3 node API, ``comfy_api.latest`` (read as a third contract). Other
``comfy_api.*`` modules are placeholders, so a pack that merely imports them still loads."""
