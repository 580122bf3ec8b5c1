"""Tools on top of the platform: job planning (memory, FLOPs, communication) and sample evaluation."""
