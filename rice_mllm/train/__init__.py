"""Training: stages as data, config, the engine loop, atomic checkpoints with exact resume, LoRA and merge."""
