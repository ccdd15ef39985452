"""`load_pipeline`: a diffusers pipeline directory as one Pipeline, through each family's loader.

model_index.json names the pipeline class (StableDiffusionPipeline: SD 1.x/2.x; StableDiffusionXLPipeline:
SDXL base; the img2img classes of both, the SDXL refiner among them) and its flags (force_zeros_for_empty_prompt,
requires_aesthetics_score); scheduler/scheduler_config.json is the sampler's spec (flax_sgm.sampling); unet/,
vae/, text_encoder(_2)/ and tokenizer(_2)/ go through load_unet, load_vae, load_text_encoder and load_tokenizer.
A class or flag that changes the result and is not honoured is refused in one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flax_sgm.autoencoder.load import load_vae
from flax_sgm.errors import CheckpointError, first_line
from flax_sgm.pipeline.pipeline import Pipeline
from flax_sgm.pipeline.sgm_file import load_single_file_pipeline
from flax_sgm.text.load import load_text_encoder
from flax_sgm.text.tokenizer import pipeline_tokenizers
from flax_sgm.unet.load import load_unet

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = ("scheduler", "scheduler_config.json")

# diffusers' pipeline class -> the family it runs as (pipeline.FAMILIES).
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
# model_index.json's components the pipeline does not run, and why that changes no image here.
UNUSED_COMPONENTS = {
    "safety_checker": "diffusers' NSFW filter (blacks out flagged images); not run here",
    "feature_extractor": "the safety checker's image preprocessing",
    "image_encoder": "IP-Adapter's image tower, used only with ip_adapter_image",
}
# The flags of model_index.json (beside the components) and what is done with each.
FLAGS = {
    "force_zeros_for_empty_prompt": "SDXL: no negative prompt -> zero unconditional embeddings",
    "requires_aesthetics_score": "the SDXL refiner: an aesthetic score in the size/crop ids",
    "requires_safety_checker": "a warning in diffusers when the safety checker is missing",
    "add_watermarker": "SDXL's invisible watermark (diffusers applies it only when the package is installed)",
}


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object; got {type(value).__name__}")
    return value


def load_pipeline(path, *, tokenizer=None, variant: str | None = None, dtype=None, scheduler=None,
                  unet_config=None, text_configs=None, scaling_factor: float | None = None,
                  prediction: str | None = None) -> Pipeline:
    """A ready Pipeline (models in inference mode) from a diffusers pipeline directory or an sgm single file.

    path: a directory holding model_index.json (StableDiffusionPipeline: SD 1.x/2.x; StableDiffusionXLPipeline:
      SDXL; their Img2Img classes, the SDXL refiner among them), scheduler/scheduler_config.json and the models.
    tokenizer: the tokenizers to use instead of the directory's: a pipeline directory or tokenizer folder
      (path), or a list of them / of transformers tokenizers, one per text encoder.
    variant: the models' variant files ("fp16"), as diffusers' from_pretrained(variant=...).
    dtype: the compute dtype of every model (parameters stay as stored); latents are float32 throughout.
    scheduler: another sampler than the directory's (a flax_sgm.sampling.KINDS name: "ddim", "euler", ...), its
      config made from the directory's as diffusers' `OtherScheduler.from_config(pipe.scheduler.config)`; or an
      SgmSamplerConfig (sgm's sampler and denoiser over the directory's models).

    An sgm/LDM single file (SD 1.x, SD 2.x, SDXL base or refiner; flax_sgm.pipeline.sgm_file): the UNet, VAE and
    text encoders from the file, `tokenizer=` required; `scheduler` an sgm sampler (None: sgm's demo default,
    EulerEDM over LegacyDDPM with VanillaCFG 5.0; an SgmSamplerConfig; a flax_sgm.sampling.SGM_KINDS name; or
    sgm's sampler_config mapping). unet_config, text_configs (one per text encoder) and scaling_factor: only for
    a single file whose shapes are no released model's. prediction: what a single file's UNet predicts,
    "epsilon" or "v_prediction" (default: the file's ModelSpec metadata, else diffusers' rule: SD 2.x
    v-prediction at 768 x 768 unless its global_step is SD 2.x base's, every other family epsilon).
    """
    path = Path(path)
    if path.is_file():
        if variant is not None:
            raise CheckpointError(f"{path}: variant= picks a diffusers directory's files; a single file has none")
        return load_single_file_pipeline(path, tokenizer=tokenizer, dtype=dtype, scheduler=scheduler,
                                         unet_config=unet_config, text_configs=text_configs,
                                         scaling_factor=scaling_factor, prediction=prediction)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory; load_pipeline reads a diffusers pipeline directory "
                              "or an sgm single file")
    for name, value in (("unet_config", unet_config), ("text_configs", text_configs), ("scaling_factor", scaling_factor),
                        ("prediction", prediction)):
        if value is not None:
            raise CheckpointError(f"{path}: {name}= is for a single file; a pipeline directory's configs say it")
    if not (path / MODEL_INDEX).is_file():
        raise CheckpointError(f"{path}: no {MODEL_INDEX}; not a diffusers pipeline directory")
    index = read_json(path / MODEL_INDEX, MODEL_INDEX)
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise CheckpointError(f"{path / MODEL_INDEX}: pipeline class {cls!r} is not supported; supported: "
                              f"{', '.join(PIPELINE_CLASSES)}")
    components = {k: v for k, v in index.items() if not k.startswith("_") and k not in FLAGS}
    present = {k for k, v in components.items() if isinstance(v, (list, tuple)) and v and v[0] is not None}
    for name in sorted(present - {"unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
                                  "tokenizer_2"} - set(UNUSED_COMPONENTS)):
        raise CheckpointError(f"{path / MODEL_INDEX}: component {name!r} is not supported by flax_sgm's pipeline")
    flags = {k: index[k] for k in FLAGS if k in index}

    scheduler_path = path.joinpath(*SCHEDULER_CONFIG)
    if "scheduler" not in present or not scheduler_path.is_file():
        raise CheckpointError(f"{path}: no scheduler ({'/'.join(SCHEDULER_CONFIG)} is missing); the pipeline needs "
                              "its sampler's config")
    scheduler_json = read_json(scheduler_path, "the scheduler config")

    for name in ("unet", "vae"):
        if name not in present:
            raise CheckpointError(f"{path / MODEL_INDEX}: the pipeline has no {name}")
    encoders = [n for n in ("text_encoder", "text_encoder_2") if n in present]
    if not encoders:
        raise CheckpointError(f"{path / MODEL_INDEX}: the pipeline has no text encoder")
    family = PIPELINE_CLASSES[cls]
    if family == "sd" and encoders != ["text_encoder"]:
        raise CheckpointError(f"{path / MODEL_INDEX}: a {cls} takes one text encoder (text_encoder); got {encoders}")
    if family == "sdxl" and "text_encoder_2" not in encoders:
        raise CheckpointError(f"{path / MODEL_INDEX}: a {cls} needs text_encoder_2 (its pooled vector)")
    if family == "sdxl" and flags.get("requires_aesthetics_score"):
        family = "sdxl-refiner"

    unet_json = read_json(path / "unet" / "config.json", "the UNet config")
    unet = load_unet(path / "unet", variant=variant, dtype=dtype)
    vae = load_vae(path / "vae", variant=variant, dtype=dtype)
    text_encoders = [load_text_encoder(path / name, variant=variant, dtype=dtype) for name in encoders]
    tokenizers = pipeline_tokenizers(path, tokenizer, encoders, index)
    return Pipeline(
        family=family, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
        scheduler=_scheduler_config(scheduler_json, str(scheduler_path), scheduler),
        unet_json=unet_json, flags=flags, source=str(path),
    )


def _scheduler_config(config: dict, source: str, kind):
    from flax_sgm.sampling import SchedulerConfig, SgmSamplerConfig

    if isinstance(kind, SgmSamplerConfig):  # sgm's sampler over the directory's models
        return kind
    if kind is not None and not isinstance(kind, str):
        raise CheckpointError(f"scheduler=: a sampler kind name or an SgmSamplerConfig; got {type(kind).__name__}")
    try:
        return SchedulerConfig.from_diffusers(config, source=source, kind=kind)
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(first_line(err)) from None
