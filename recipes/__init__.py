"""Recipe presets (YAML data files), importable as nvq.recipes."""
