"""Test-support helpers: tiny random checkpoints and llama.cpp's HF->GGUF converter."""
