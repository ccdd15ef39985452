"""sgm's UNetModel: config (UNetConfig and presets), model, diffusers (the reader of diffusers' UNet
config.json), layout (sgm and diffusers key tables), load (load_unet)."""
