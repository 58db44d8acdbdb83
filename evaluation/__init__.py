"""The quality benchmark: loss, perplexity and accuracy of a model on fixed masks (DESIGN)."""
