"""Teacher families: one module per family (``adm``: guided-diffusion checkpoints converted to diffusers)."""
