"""Data pipeline: readers -> canonical records -> dataset -> encoder (labels) -> collator (batches)."""
