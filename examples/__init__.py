"""Runnable examples: a tiny Llama-style model generating with a paged KV cache.

Run them from the repository root, e.g. ``python -m examples.generate``
(see the README's "Examples" section). Modules:

* ``common``: framework-free pieces shared by all examples — the model
  config, the weights (numpy, from a seed), the prompts, the rotary tables,
  the page allocator and block table, the per-step batch metadata.
* ``model``: the PyTorch model, its paged cache (``torch.ops.paged_kv``) and
  dense cache, and the generation loop.
* ``model_jax``: the same model in JAX (``jax_kernels`` only, no torch).
* ``generate``, ``generate_jax``, ``convert_page_tables``: the scripts.
"""
