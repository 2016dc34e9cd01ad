"""linearard_ray: LinearARD self-distillation of RoPE-scaled students, run on Ray."""

__version__ = "0.1.0"
