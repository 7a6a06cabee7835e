"""The ReCon student as a network: point ops without CUDA extensions (``pointops``: FPS, k-NN,
grouping, Chamfer), the encoder with its global queries, the reconstruction decoder and the
classifier (``model``), the losses (``losses``: also ReCon++'s matching of image queries to views),
and the released reference checkpoints' names mapped to ours, as well as a timm ViT's blocks
(``reference``).

May import: ``recon.runtime``. Never the trainers, the stores or anything downstream."""
