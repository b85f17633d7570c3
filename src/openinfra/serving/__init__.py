"""System layer: inference serving and the DeepSeek-V3/R1 cost-vs-income model.

- ``openinfra.serving.cost``  the inference overview's cost vs theoretical income table
  (``openinfra cost``).
"""
