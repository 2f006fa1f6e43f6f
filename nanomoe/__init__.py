"""nanomoe: from nanoGPT to a modern LLM and a Mixture-of-Experts model, one switch at a time.

    from nanomoe import GPT, GPTConfig
"""

from importlib.metadata import PackageNotFoundError, version

from .config import GPTConfig, gpt2_config, modern_config, moe_config, preset
from .device import pick_device, pick_dtype, pick_precision
from .kv_cache import KVCache
from .model import GPT, GPTOutput
from .tokenizer import get_tokenizer, load_tokenizer

try:
    __version__ = version("nanomoe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "gpt2_config",
    "modern_config",
    "moe_config",
    "preset",
    "pick_device",
    "pick_dtype",
    "pick_precision",
    "get_tokenizer",
    "load_tokenizer",
]
