"""The embedded demo: synthetic coloured-shapes data, tiny base models, two-stage LLaVA training.

``shapes`` writes the dataset (PNG images, caption pairs, multi-turn instructions, a held-out
split and its blank-image twin, a text corpus); ``pretrain`` builds and briefly pre-trains the
tiny vision tower and LLM that the demo's stage 1 and stage 2 recipes start from.
"""
