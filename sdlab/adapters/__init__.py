"""Adapters that change a model's weights for a while (LoRA, ...), through one weight-patching mechanism."""
