"""Support code for the API-provider and storage node families.

- :mod:`.config`: provider profiles (base URL, which key, timeouts, retries) from Kiln's config file and
  the environment; API keys are read here and nowhere else.
- :mod:`.retry`: retries with exponential backoff, full jitter, Retry-After and a time budget.
- :mod:`.pricing`: the price table and cost estimates; :mod:`.ledger`: the per-run budget.
- :mod:`.imageio`: bytes <-> IMAGE/MASK, the PNG uploads providers want, bounded downloads.
- :mod:`.provenance`: the generation record written into PNG chunks, XMP and EXIF.

Nothing here imports a vendor SDK at import time, so Kiln loads without them installed.
"""
