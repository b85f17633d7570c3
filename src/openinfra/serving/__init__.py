"""System layer: inference serving and the DeepSeek-V3/R1 cost-vs-income model.

- ``openinfra.serving.engine``       continuous batching over the paged MLA latent cache.
- ``openinfra.serving.prefix_cache`` prefix reuse of whole prompt pages (hash-chained keys).
- ``openinfra.serving.http_server``  an OpenAI-style completions endpoint (``openinfra serve``).
- ``openinfra.serving.disaggregated`` prefill/decode disaggregation: a prefill worker process
  (``prefill_worker``, wire format in ``protocol``) hands the decode engine the prompt's KV through
  the KV store (``openinfra serve --disaggregated``).
- ``openinfra.serving.cost``         the inference overview's cost vs theoretical income table
  (``openinfra cost``), and the same arithmetic for a run of our engine.
"""
