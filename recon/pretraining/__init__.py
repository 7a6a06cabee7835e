"""ReCon pretraining against cached teacher targets: the stores as shuffled, augmented batches
(``data``), optional target normalisation (``targets``), frozen-feature probes (``probes``: k-NN,
linear SVM, the random-init twin), the held-out monitor that reports whether distillation and
the encoder learn (``monitor``), and the training loop itself (``trainer``).

May import: ``recon.runtime``, ``recon.network``, ``pipeline`` (store reading). Never
``recon.downstream``."""
