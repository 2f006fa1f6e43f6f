"""Hugging Face interop: weights in and out, init_from, the inference front-end, HellaSwag."""
