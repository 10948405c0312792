"""mgpu: keep every GPU of one server (or a Slurm cluster) busy with PyTorch work."""

__version__ = "0.1.0"
