"""``comfy_execution``: the graph-expansion helpers, which are Kiln's engine classes themselves."""
