"""Gemma-4 end to end: every released variant as a miniature, converted, loaded by real clients, certified."""
