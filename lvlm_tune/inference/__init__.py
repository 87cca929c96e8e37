"""Using a trained folder: load it, answer prompts, chat, evaluate, export (``merge``).

Submodules are imported on use, so importing this package alone loads nothing heavy.
"""
