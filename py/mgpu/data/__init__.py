"""Datasets for the CLIP trainer: the embedded synthetic one (more layouts come with the trainer)."""
