"""What a pretrained encoder is used for. Recipes (``recipes``: fine-tuning profiles and
parameters); classification: data and voting (``cls_data``, ``inference``), initial weights
(``weights``), the fine-tuning loop (``finetune``) and its metrics (``metrics``); part
segmentation: network, data, loop and mIoU (``partseg_net``, ``partseg_data``,
``partseg_finetune``, ``partseg_metrics``); frozen-feature evaluation: SVM, zero-shot, few-shot
(``evaluate``); the mean attention distance per block (``attention``); the ablation study
(``study``); ONNX export (``export``).

May import: ``recon.runtime``, ``recon.network``, ``recon.pretraining``, ``pipeline`` (store
reading)."""
