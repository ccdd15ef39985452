"""The seed's tier (sgm/modules/attention.py): policy (which backend runs and why), chunked (the memory-bounded
kernel), backends (the one attention function), modules (CrossAttention and friends), blocks, transformer
(SpatialTransformer), config (SpatialTransformerConfig), remat (checkpoint policies); and loading stacks on
their own: layout (where stacks sit in checkpoints), diffusers (a diffusers config.json as their spec), stacks
(planning), load (load_pretrained)."""
