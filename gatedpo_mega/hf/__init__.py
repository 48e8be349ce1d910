"""The transformers backend: a Hugging Face causal LM with the fused output layer, under DeepSpeed ZeRO."""
