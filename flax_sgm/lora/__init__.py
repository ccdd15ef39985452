"""LoRA on the Flax models: apply the files users hold (load_lora), train adapters (add_adapters, LoRAParam),
write files diffusers loads (save_lora). Rooms: layout.py (file formats, module names), adapters.py (the
adapter layers), load.py, train.py, save.py."""

from flax_sgm.lora.adapters import Adapter, LoRAParam, LoRAScale
from flax_sgm.lora.load import fuse_lora, load_lora, lora_summary, set_lora_scale, unload_lora
from flax_sgm.lora.save import lora_state_dict, save_lora
from flax_sgm.lora.train import add_adapters

__all__ = ["Adapter", "LoRAParam", "LoRAScale", "add_adapters", "fuse_lora", "load_lora", "lora_state_dict", "lora_summary",
           "save_lora", "set_lora_scale", "unload_lora"]
