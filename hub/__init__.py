"""To and from the Hugging Face Hub: import, export and push of esm2 checkpoints with a model card."""
