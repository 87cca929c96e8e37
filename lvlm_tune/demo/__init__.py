"""The embedded demo: synthetic coloured-shapes data, tiny base models, two-stage training.

``shapes`` writes the dataset (PNG images, caption pairs, multi-turn instructions, a held-out
split and its blank-image twin, a text corpus); ``probes`` holds the linear probes the tiny
vision encoders are pre-trained with; ``pretrain`` builds and briefly pre-trains the LLaVA
demo's vision tower and LLM, ``pretrain_minigpt4`` the MiniGPT-4 variant's BLIP-2 and LLM;
``run`` takes either family from data to ``eval`` and ``chat`` (``make demo``,
``make demo-minigpt4``). ``pretrain_diffusion`` pre-trains a tiny Stable Diffusion on shape
close-ups and ``minigpt5`` runs MiniGPT-5's stage 1 on it, scoring the colours of the images the
vokens draw (``make demo-minigpt5``).
"""
