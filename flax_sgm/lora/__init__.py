"""LoRA on the Flax models: apply the files users hold (load_lora), train adapters (add_adapters, LoRAParam),
write files diffusers loads (save_lora). Rooms: layout.py (file formats, module names), adapters.py (the
adapter layers), load.py, train.py, save.py."""

from flax_sgm.lora.adapters import Adapter, LoRAParam
from flax_sgm.lora.load import load_lora, lora_summary, unload_lora

__all__ = ["Adapter", "LoRAParam", "load_lora", "lora_summary", "unload_lora"]
