"""Image generation for MiniGPT-5 ("generative vokens", arXiv 2310.02239).

The LLM learns special voken tokens; their hidden states are mapped into Stable Diffusion's
text-condition space and trained through a frozen VAE + UNet (the LDM loss) and against the frozen
text encoder's caption embeddings; at inference the mapped condition drives a Stable Diffusion
pipeline. The submodules hold the vokens, the mapping module, the frozen diffusion parts and the
training model. They need the ``gen`` extra (``diffusers``), which only the submodules import, so
importing this package alone pulls in nothing.
"""
