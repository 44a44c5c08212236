"""Tree attention inside vLLM: the per-forward tree plan and the CPU backend that obeys it."""
