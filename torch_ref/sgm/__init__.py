"""sgm's samplers, made to run: the reference flax_sgm.sampling.sgm is compared against.

Copied from Stability-AI/generative-models at commit 0ad7de9a5cb53fd63d6d30a4f385485e72e08597
(sgm/modules/diffusionmodules/{sampling,sampling_utils,discretizer,denoiser,denoiser_scaling,guiders}.py),
Copyright (c) 2023 Stability AI, MIT License (LICENSE in this folder). The files are unchanged except
their imports (relative imports point at this folder; omegaconf, used only in type hints, is not
required); util.py holds the helpers they import from sgm, also unchanged, and says its two shims.
"""
