"""Image generation for MiniGPT-5 ("generative vokens", arXiv 2310.02239).

The LLM learns special voken tokens; their hidden states are mapped into Stable Diffusion's
text-condition space and trained through a frozen VAE + UNet (the LDM loss) and against the frozen
text encoder's caption embeddings; at inference the mapped condition drives a Stable Diffusion
pipeline. The submodules hold the vokens, the mapping module, the frozen diffusion parts, the
training model and its trainer, the data hooks and the recipe keys; ``extension`` plugs them into
the core through the extension registry (:mod:`lvlm_tune.training.extensions`), which is the only
way the core reaches this package. They need the ``gen`` extra (``diffusers``), which only the
submodules that draw images import, so importing this package alone pulls in nothing.
"""
