"""Paper benchmarks with their official metrics: the LLaVA-1.5 evaluation suite.

One module per family (:mod:`.vqa`: VQAv2, TextVQA, VizWiz, GQA; :mod:`.choice`: ScienceQA-IMG,
MMBench, SEED-Bench; :mod:`.yesno`: POPE, MME), each registering :class:`.base.Benchmark`
entries: the prompt suffix, ``max_new_tokens``, a reader of LLaVA's
``playground/data/eval/<name>/`` layout (and lmms-eval's Hugging Face layout) and the scorer.
:mod:`.sources` finds the questions, :mod:`.runner` answers them with a model or scores a saved
answers file. ``docs/benchmarks.md`` describes the computations.
"""

from lvlm_tune.inference.benchmarks.sources import get_benchmark, load_benchmark

__all__ = ["get_benchmark", "load_benchmark"]
