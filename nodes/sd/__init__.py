"""Stable Diffusion support for the diffusion node families: checkpoints, text encoding, sampling,
LoRA, ControlNet, previews. Not a node family itself (subpackages of ``nodes`` are not scanned).

The training code imports :func:`nodes.sd.checkpoint.export_ldm_checkpoint` to write the project's
own model in the LDM single-file layout with ``kiln.*`` metadata.
"""
