"""`load_pipeline` of an sgm/LDM single file: the UNet, the VAE and the text encoders from the one file, the
tokenizers named by the user, and the sampler sgm's released demo uses.

The family is read off the text towers the file holds (sgm's embedders): SD 1.x one CLIP tower
(cond_stage_model.transformer.), SD 2.x one OpenCLIP tower (cond_stage_model.model.), SDXL base CLIP and
OpenCLIP (conditioner.embedders.0/1), the SDXL refiner OpenCLIP alone (conditioner.embedders.0.model.).
Each tower hands on what sgm's embedder does (flax_sgm.text.conditioner.EMBEDDERS; SDXL's CLIP layer_idx 11 of
12 written as "penultimate", the same layer, so smaller towers work too).

The sampler is sgm's scripts/demo default (init_sampling): EulerEDMSampler over LegacyDDPMDiscretization,
VanillaCFG of scale 5.0, 50 steps, and the denoiser of configs/inference/*.yaml: a DiscreteDenoiser of 1000
LegacyDDPM sigmas with EpsScaling, or VScaling for a v-prediction model (sd_2_1_768.yaml). No tensor says which:
`prediction=`, else the file's metadata, else diffusers' rule (prediction_of below).
The unconditional embeddings are sgm's demo's: SDXL base zeroes the text part when no negative prompt is given
(force_uc_zero_embeddings=["txt"]); SD and the refiner encode the negative prompt, "" by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from flax_sgm.autoencoder.load import load_vae
from flax_sgm.checkpoints.sources import open_source
from flax_sgm.errors import CheckpointError, first_line
from flax_sgm.pipeline.pipeline import Pipeline
from flax_sgm.sampling.sgm import SGM_KINDS, SgmSamplerConfig
from flax_sgm.text.conditioner import EmbedderSpec
from flax_sgm.text.layout import find_towers
from flax_sgm.text.load import load_text_encoder
from flax_sgm.text.tokenizer import pipeline_tokenizers
from flax_sgm.unet.load import load_unet
from flax_sgm.unet.layout import UnreleasedShapes

M = "sgm.modules.diffusionmodules."
# sgm's demo default sampler (scripts/demo/streamlit_helpers.py init_sampling with no options).
DEMO_SAMPLER = {"target": M + "sampling.EulerEDMSampler",
                "params": {"num_steps": 50, "discretization_config": {"target": M + "discretizer.LegacyDDPMDiscretization"},
                           "guider_config": {"target": M + "guiders.VanillaCFG", "params": {"scale": 5.0}}}}
# configs/inference/{sd_2_1,sd_xl_base,sd_xl_refiner}.yaml's denoiser_config.
RELEASED_DENOISER = {"target": M + "denoiser.DiscreteDenoiser",
                     "params": {"num_idx": 1000, "scaling_config": {"target": M + "denoiser_scaling.EpsScaling"},
                                "discretization_config": {"target": M + "discretizer.LegacyDDPMDiscretization"}}}
# (tower prefix, kind) of each family's embedders -> (pipeline family, diffusers' encoder names, embedder specs).
FAMILIES = {
    (("cond_stage_model.transformer.", "transformers"),): ("sd", ["text_encoder"], (EmbedderSpec("last"),)),
    (("cond_stage_model.model.", "open_clip"),): ("sd", ["text_encoder"], (EmbedderSpec("penultimate"),)),
    (("conditioner.embedders.0.transformer.", "transformers"), ("conditioner.embedders.1.model.", "open_clip")): (
        "sdxl", ["text_encoder", "text_encoder_2"],
        (EmbedderSpec("penultimate", final_norm=False), EmbedderSpec("penultimate", final_norm=False, pooled=True))),
    (("conditioner.embedders.0.model.", "open_clip"),): (
        "sdxl-refiner", ["text_encoder_2"], (EmbedderSpec("penultimate", final_norm=False, pooled=True),)),
}
LATENT_SIZE = {"sd": 64, "sdxl": 128, "sdxl-refiner": 128}  # sgm's demo: 512 (SD), 1024 (SDXL) images
# What the UNet predicts: no tensor says. A file's SAI ModelSpec metadata may (modelspec.prediction_type, or its
# architecture); else the rule of diffusers' _legacy_load_scheduler: an SD 2.x file is v-prediction (SD 2.x-768,
# 768 x 768 images) unless its global_step is SD 2.x base's; the rest epsilon. (diffusers itself unwraps a .ckpt's
# state_dict before it looks, so it reads SD 2.x base's .ckpt as v too; here its global_step counts.)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}  # diffusers' prediction_type -> sgm's denoiser scaling
MODELSPEC = {"modelspec.prediction_type": {"epsilon": "epsilon", "v": "v_prediction"},
             "modelspec.architecture": {"stable-diffusion-v2-512": "epsilon", "stable-diffusion-v2-768-v": "v_prediction"}}
SD2_BASE_STEP = 875000
SD2_V_LATENT = 96


def prediction_of(metadata, sd2: bool, source: str) -> str:
    """What a single file's UNet predicts when prediction= is not given: its ModelSpec metadata, else diffusers'
    rule (above)."""
    said = metadata.get("modelspec.prediction_type")
    if said is not None and said not in MODELSPEC["modelspec.prediction_type"]:
        raise CheckpointError(f"{source}: its metadata says modelspec.prediction_type {said!r}; sgm's denoisers take "
                              f"{' or '.join(MODELSPEC['modelspec.prediction_type'])} (pass prediction= to override)")
    for key, values in MODELSPEC.items():
        if metadata.get(key) in values:
            return values[metadata[key]]
    base = str(metadata.get("global_step")) == str(SD2_BASE_STEP)  # a safetensors header holds strings
    return "v_prediction" if sd2 and not base else "epsilon"


def family_of(towers, source: str) -> tuple[str, list[str], tuple[EmbedderSpec, ...]]:
    """(pipeline family, diffusers' encoder names, embedder specs) of a single file's text towers."""
    found = tuple((t.prefix, t.kind) for t in towers)
    if found not in FAMILIES:
        held = ", ".join(t.describe() for t in towers) or "none"
        raise CheckpointError(f"{source}: its text encoders ({held}) are none of SD 1.x's, SD 2.x's, SDXL's or the SDXL "
                              "refiner's; load its parts with load_unet, load_vae, load_text_encoder")
    return FAMILIES[found]


def sampler_config(scheduler) -> SgmSamplerConfig:
    """A single file's sampler: None (sgm's demo default), an SgmSamplerConfig, an sgm kind name (SGM_KINDS,
    with the demo's discretization and guider) or sgm's sampler_config mapping (with the released denoiser)."""
    if scheduler is None:
        return SgmSamplerConfig.from_sgm(DEMO_SAMPLER, RELEASED_DENOISER, source="sgm's demo sampler")
    if isinstance(scheduler, SgmSamplerConfig):
        return scheduler
    if isinstance(scheduler, str):
        if scheduler not in SGM_KINDS:
            raise CheckpointError(f"scheduler={scheduler!r}: a single file runs sgm's samplers; one of {list(SGM_KINDS)}")
        return SgmSamplerConfig.from_sgm(DEMO_SAMPLER, RELEASED_DENOISER).replace(kind=scheduler)
    if isinstance(scheduler, Mapping):
        try:
            return SgmSamplerConfig.from_sgm(scheduler, RELEASED_DENOISER, source="scheduler=")
        except ValueError as err:
            raise CheckpointError(first_line(err)) from None
    raise CheckpointError(f"scheduler=: an SgmSamplerConfig, an sgm sampler kind or sgm's sampler_config; got "
                          f"{type(scheduler).__name__}")


def load_single_file_pipeline(path: Path, *, tokenizer, dtype=None, scheduler=None, unet_config=None,
                              text_configs: Sequence | None = None, scaling_factor: float | None = None,
                              prediction: str | None = None) -> Pipeline:
    """See load_pipeline. unet_config, text_configs (one per tower) and scaling_factor: for a file whose shapes
    are no released model's (their loaders' config= and scaling_factor=); prediction: PREDICTIONS' keys."""
    if tokenizer is None:
        raise CheckpointError(f"{path}: a single file holds no tokenizer; pass tokenizer= (flax-sgm sample: "
                              "--tokenizer): a pipeline directory with tokenizer/ (and tokenizer_2/), or a list of "
                              "tokenizer folders, one per text encoder")
    with open_source(path) as source:
        towers = find_towers(list(source.infos))
        metadata = source.metadata
    family, encoders, specs = family_of(towers, str(path))
    if text_configs is not None and len(text_configs) != len(towers):
        raise CheckpointError(f"text_configs=: {len(text_configs)} given for {len(towers)} text encoders")
    if prediction is not None and prediction not in PREDICTIONS:
        raise CheckpointError(f"prediction={prediction!r}: one of {', '.join(PREDICTIONS)}")
    if prediction is not None and isinstance(scheduler, SgmSamplerConfig):
        raise CheckpointError("prediction=: the SgmSamplerConfig given as scheduler= says it (its scaling); pass only one "
                              "of them")
    sd2 = family == "sd" and towers[0].kind == "open_clip"
    cfg = sampler_config(scheduler)
    if not isinstance(scheduler, SgmSamplerConfig):  # an SgmSamplerConfig says it by its scaling
        cfg = cfg.replace(scaling=PREDICTIONS[prediction or prediction_of(metadata, sd2, str(path))])
    try:
        unet = load_unet(path, config=unet_config, dtype=dtype)
    except UnreleasedShapes:  # load_unet's own hint (heads=) is no argument of load_pipeline
        raise CheckpointError(f"{path}: its UNet is none of the released models by its shapes: give unet_config= (a "
                              "flax_sgm.UNetConfig; load_pipeline in Python: `flax-sgm sample` reads the released "
                              "models' single files only)") from None
    vae = load_vae(path, dtype=dtype, scaling_factor=scaling_factor)
    text_encoders = [load_text_encoder(path, embedder=i, dtype=dtype,
                                       config=None if text_configs is None else text_configs[i])
                     for i in range(len(towers))]
    tokenizers = pipeline_tokenizers(path, tokenizer, encoders, {})
    # SD 2.x's v model is the 768 one: the default size follows the sampler's scaling (an SgmSamplerConfig's too).
    unet_json = {"sample_size": SD2_V_LATENT if sd2 and cfg.scaling == "v" else LATENT_SIZE[family]}
    if family != "sd":  # the size/crop ids' width: the vector's features beside the pooled text vector
        pooled = text_encoders[-1].config.projection_dim or text_encoders[-1].config.hidden_size
        ids = 5 if family == "sdxl-refiner" else 6
        width, rest = divmod((unet.config.adm_in_channels or 0) - pooled, ids)
        if rest or width <= 0:
            raise CheckpointError(f"{path}: the UNet's vector embedding takes {unet.config.adm_in_channels} features, "
                                  f"not the pooled vector ({pooled}) and {ids} size/crop ids of one width")
        unet_json["addition_time_embed_dim"] = width
    flags = {"force_zeros_for_empty_prompt": family == "sdxl", "requires_aesthetics_score": family == "sdxl-refiner"}
    try:
        return Pipeline(family=family, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                        scheduler=cfg, unet_json=unet_json, flags=flags, source=str(path), specs=specs)
    except ValueError as err:
        raise CheckpointError(first_line(err)) from None
