"""sgm's KL autoencoder (the first stage): config, model, diffusers' config.json, key layouts, loader.

  config.py     AutoencoderConfig (sgm's ddconfig + embed_dim; scaling factor, force_upcast), presets
  model.py      Encoder, Decoder, DiagonalGaussian, AutoencoderKL (NHWC, images in [-1, 1])
  diffusers.py  the one reader of diffusers' AutoencoderKL config.json
  layout.py     sgm single-file and diffusers key layouts; a config read off a file's shapes
  load.py       load_vae (exported as flax_sgm.load_vae: a family's package imports no loader, which
                imports flax_sgm.models, which imports every family)
"""

from flax_sgm.autoencoder.config import PRESETS, AutoencoderConfig
from flax_sgm.autoencoder.model import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "PRESETS"]
