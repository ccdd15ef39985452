"""Prompt to image: the pipeline that joins the text encoders, the UNet, a sampler and the autoencoder.

  pipeline.py  Pipeline (the call: prompts -> conditioning -> the compiled sampling loop -> images), PipelineOutput
  load.py      load_pipeline: a diffusers pipeline directory through each family's loader
"""

from flax_sgm.pipeline.load import load_pipeline
from flax_sgm.pipeline.pipeline import Pipeline, PipelineOutput, to_pil

__all__ = ["Pipeline", "PipelineOutput", "load_pipeline", "to_pil"]
