"""One module per pipeline stage (named after it): each reads its section of params.yaml through
``stages.params.build_params``, wires the library code of ``recon`` and ``pipeline``, shows
progress, and writes its outputs and metrics. The only place that knows where other stages'
files live. May import: ``recon``, ``pipeline``."""
