"""The attribution engine.

* one prompt: direct linear attribution through frozen attention, normalisation and MLP gates
  (``linear.py``; what it explains: ``targets.py``);
* a prompt dataset: the node identity and kept / ablated node sets (``nodeset.py``), the clean and
  corrupted runs made once (``runs.py``), node and edge scores by attribution patching or
  integrated gradients (``dataset.py``), ablation and the one circuit evaluator (``ablation.py``),
  the ACDC search (``acdc.py``), circuit selection and held-out evaluation (``circuit.py``);
* heads and MLPs as nodes: EAP, EAP-IG and edge-level ACDC (``components.py``).

Import from the modules; :mod:`circuitgraph.api` wraps them in one ``trace`` call.
"""
