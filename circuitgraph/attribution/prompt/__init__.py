"""The parts of direct linear attribution of one prompt (:func:`circuitgraph.attribution.linear.attribute_prompt`).

* ``layout.py``: the source nodes (tokens, active features, errors) and their flat keys;
* ``outputs.py``: the output targets (likeliest logits, a metric) and their gradient seeds;
* ``backward.py``: the frozen model of the prompt, its batched backward passes and the visit loop;
* ``assemble.py``: biases from the all-leaves-zero run and the graph's node and edge tables.
"""
