"""Models: loading teacher and student (hub id, local dir, GGUF, tiny test models), their RoPE settings, LoRA,
export, and the q/k/v capture the objective reads."""
