"""Stable Diffusion support for the diffusion node families: checkpoints, text encoding, sampling,
LoRA, ControlNet, previews. Not a node family itself (subpackages of ``nodes`` are not scanned).

The training code writes the project's own model in the LDM single-file layout with the key map of
:mod:`nodes.sd.ldm_keys` (the one the loader inverts); :func:`nodes.sd.checkpoint.export_ldm_checkpoint`
writes any diffusers components that way.
"""
