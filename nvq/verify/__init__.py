"""`nvq verify`: certify a checkpoint layer by layer against a GGUF oracle.

candidate.py (any checkpoint → canonical fp32 tensors + how each is stored), oracle.py (the GGUF
side and the token ids), taps.py (the reference forward, recorded and optionally teacher-forced),
diff.py (metrics, the expected-noise model, hints, first divergence), certificate.py (JSON,
Markdown, JUnit), run.py (the whole command).
"""
