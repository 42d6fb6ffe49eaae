"""vidrt: export + inference runtime for Sora-style text-to-video models."""
__version__ = "0.1.0"
