"""Recipe dit_t2v: text-to-video DiT trained with flow matching on VAE latents."""
