"""Recipe `vae`: train HunyuanVideo's causal 3D VAE (L1 + LPIPS + 3D PatchGAN hinge + KL, curriculum, tiling)."""
