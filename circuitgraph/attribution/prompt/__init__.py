"""The parts of direct linear attribution of one prompt (:func:`circuitgraph.attribution.linear.attribute_prompt`).

* ``layout.py``: the source nodes (tokens, active features, errors), their flat keys, and each
  site's active features per position (the layout of the decoder-row products);
* ``outputs.py``: the output targets (likeliest logits, a metric) and their gradient seeds;
* ``bos.py``: the BOS convention (``keep`` / ``detach``) and the runs it needs;
* ``backward.py``: the frozen prefix graphs of the prompt, one batched backward per batch of
  targets, and the visit loop;
* ``edges.py``: the edges as they are produced, in memory up to a budget, then on disk;
* ``resources.py``: the device and the memory budget (batch sizes);
* ``assemble.py``: biases from the all-leaves-zero run and the graph's node and edge tables.
"""
