"""Plumbing shared by every training loop, and nothing about ReCon itself: the device and the
distributed process group (``distributed``), resumable training state on disk and code
fingerprints (``trainstate``), AdamW parameter groups and learning-rate schedules (``optim``), and
replaying a step as a CUDA graph (``cudagraph``).

May import: torch, numpy, the standard library. No other ``recon`` room, no ``pipeline``."""
