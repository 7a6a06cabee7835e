"""The learning side of recon: the ReCon student, its pretraining against cached teacher
targets, and what is done with it downstream. Knows nothing about meshes or rendering; reads
the stores that ``pipeline`` writes.

Rooms, each importing only the rooms listed before it (``tests/test_layout.py`` checks it):

- ``recon.runtime``: plumbing every training loop shares: devices and DDP, resumable
  checkpoints on disk, the optimiser and its schedules, CUDA graphs.
- ``recon.network``: the student (encoder, decoder, queries), its point ops, its losses, and the
  mapping to and from the released reference model's names.
- ``recon.pretraining``: the ReCon trainer and what feeds and watches it: the cached stores as
  batches, target normalisation, the held-out monitor and its frozen-feature probes.
- ``recon.downstream``: what a pretrained encoder is used for: fine-tuning recipes, classification
  and part-segmentation fine-tuning, frozen-feature evaluation (SVM, zero-shot, few-shot), the
  ablation study, ONNX export.
"""
