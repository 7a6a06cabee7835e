"""Plumbing shared by every training loop, and nothing about ReCon itself: the device and the
distributed process group (``distributed``), resumable training state on disk and code
fingerprints (``trainstate``), the project files a module depends on, read from its imports
(``codedeps``: dvc.yaml's code deps and the resume fingerprints), AdamW parameter groups and
learning-rate schedules (``optim``), and replaying a step as a CUDA graph (``cudagraph``).

May import: torch, numpy, the standard library. No other ``recon`` room, no ``pipeline``."""
