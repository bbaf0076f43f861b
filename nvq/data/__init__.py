"""Data files shipped with nvq (the default verification prompts)."""
