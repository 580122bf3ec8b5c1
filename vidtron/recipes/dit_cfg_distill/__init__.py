"""Recipe dit_cfg_distill: a guidance-embedded DiT student distilled from a frozen teacher's CFG output."""
