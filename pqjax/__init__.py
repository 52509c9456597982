"""pqjax: PermuQuant 4-bit post-training quantization for diffusion transformers."""
