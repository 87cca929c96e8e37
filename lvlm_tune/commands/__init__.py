"""The user-facing commands (``lvlm-tune inspect`` and friends), one module each."""
