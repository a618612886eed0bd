"""epts-export: Elastic Post-Training Sparsity for Hugging Face causal LMs, and its export."""

__version__ = "0.1.0"
