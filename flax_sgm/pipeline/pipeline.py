"""Pipeline: prompts -> text conditioning -> the sampler's compiled loop over the UNet -> the autoencoder's decoder.

The call is diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline `__call__` in JAX, NHWC: the same
prompt encoding (SD: the last layer of its one encoder; SDXL: the penultimate layers of both, concatenated, the
second's pooled vector beside the size and crop ids), classifier-free guidance batched [uncond, cond]
(guidance_scale > 1), SDXL's zeroed unconditional embeddings when no negative prompt is given
(force_zeros_for_empty_prompt), initial noise scaled by the sampler (flax_sgm.sampling.sample), and the latents
unscaled (SDXL: latents_mean/latents_std when the VAE config has them) and decoded to [0, 1].

The denoising loop is one jitted program (flax_sgm.sampling.sample's lax.scan) over the UNet's state (nnx.split),
compiled once per shapes, steps and sampler and kept; a progress callback is fed from inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.autoencoder.model import AutoencoderKL
from flax_sgm.sampling.sgm import SgmSamplerConfig
from flax_sgm.sharding import use_mesh
from flax_sgm.text.conditioner import EmbedderSpec, condition
from flax_sgm.text.model import CLIPTextModel
from flax_sgm.text.tokenizer import tokenize
from flax_sgm.unet.model import UNetModel, guidance_scale_embedding

# What each family's text encoders hand the UNet, as diffusers' pipelines take it (clip_skip None): SD the last
# layer with the final layer norm (SD 2.x's text_encoder/ is stored one layer short: its last is sgm's
# penultimate); SDXL both towers' penultimate layers without it, the last tower's pooled (projected) vector for y.
FAMILIES = {
    "sd": (EmbedderSpec("last"),),
    "sdxl": (EmbedderSpec("penultimate", final_norm=False), EmbedderSpec("penultimate", final_norm=False, pooled=True)),
    "sdxl-refiner": (EmbedderSpec("penultimate", final_norm=False, pooled=True),),
}
OUTPUTS = ("np", "latent", "pil")
SDXL_AESTHETIC_SCORE, SDXL_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' refiner defaults
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5  # StableDiffusionPipeline's (SDXL's guidance default is 5.0)


@dataclasses.dataclass
class PipelineOutput:
    """images: float [0, 1] NHWC (output="np"), the final latents NHWC ("latent"), or PIL images ("pil").
    timings: seconds for the prompt encoding, the compile (0.0 when cached), the denoising loop and the decoding."""

    images: Any
    timings: dict[str, float]
    steps: int


class _Progress:
    """Where the compiled loop's jax.debug.callback reports: one stable function (so a new listener never
    recompiles) forwarding to the listener of the call in flight. The callback runs on XLA's host thread, so
    the listener is the process's, not a thread's: one sampling call at a time reports progress."""

    lock = threading.Lock()
    listener: Callable[[int], None] | None = None

    @classmethod
    def report(cls, step) -> None:
        listener = cls.listener
        if listener is not None:
            listener(int(step))


class Pipeline:
    """The models, tokenizers and sampler config of one pipeline; call it with a prompt."""

    def __init__(self, *, family: str, unet: UNetModel, vae: AutoencoderKL, text_encoders: Sequence[CLIPTextModel],
                 tokenizers: Sequence, scheduler, unet_json: dict | None = None, flags: dict | None = None,
                 source: str = "pipeline", specs: Sequence[EmbedderSpec] | None = None):
        if family not in FAMILIES:
            raise ValueError(f"Pipeline: family must be one of {list(FAMILIES)}; got {family!r}")
        specs = FAMILIES[family] if specs is None else tuple(specs)  # an sgm single file: sgm's embedders
        if not len(text_encoders) == len(tokenizers) == len(specs):
            raise ValueError(f"Pipeline: a {family} pipeline takes {len(specs)} text encoders and tokenizers; got "
                             f"{len(text_encoders)} and {len(tokenizers)}")
        self.family, self.unet, self.vae, self.scheduler, self.source = family, unet, vae, scheduler, source
        self.text_encoders, self.tokenizers, self.specs = list(text_encoders), list(tokenizers), specs
        self.flags = dict(flags or {})
        self._replicas: dict = {}  # (mesh, the UNet's arrays) -> its state placed on the mesh
        unet_json = dict(unet_json or {})
        self.vae_scale_factor = 2 ** (len(vae.config.ch_mult) - 1)
        self.sample_size = unet_json.get("sample_size") or 64  # latents; the default image is this * the VAE factor
        if isinstance(self.sample_size, (list, tuple)):
            self.sample_size = self.sample_size[0]
        self.time_embed_dim = unet_json.get("addition_time_embed_dim") or 256
        self._check_vae()
        self._check_vector()

    # -- checks made once, at load ------------------------------------------------------------------------------

    def _check_vae(self) -> None:
        c = self.vae.config
        if c.shift_factor is not None:
            raise ValueError(f"{self.source}: the VAE's shift_factor = {c.shift_factor} is not applied by diffusers' "
                             "SD/SDXL pipelines; refused rather than ignored")
        if self.family == "sd" and (c.latents_mean is not None or c.latents_std is not None):
            raise ValueError(f"{self.source}: the VAE's latents_mean/latents_std are not applied by diffusers' "
                             "StableDiffusionPipeline; refused rather than ignored")
        if c.embed_dim != self.unet.config.in_channels:
            raise ValueError(f"{self.source}: the VAE's latents have {c.embed_dim} channels, the UNet takes "
                             f"{self.unet.config.in_channels} (inpainting and other extra-channel UNets are not supported)")

    def _check_vector(self) -> None:
        c = self.unet.config
        if self.family == "sd":
            if c.adm_in_channels is not None:
                raise ValueError(f"{self.source}: a StableDiffusionPipeline's UNet with a class/vector embedding "
                                 f"(adm_in_channels {c.adm_in_channels}) is not supported")
            return
        ids = 5 if self.family == "sdxl-refiner" else 6
        pooled = self.text_encoders[-1].config.projection_dim or self.text_encoders[-1].config.hidden_size
        want = pooled + ids * self.time_embed_dim
        if c.adm_in_channels != want:
            raise ValueError(f"{self.source}: the UNet's vector embedding takes {c.adm_in_channels} features; the pooled "
                             f"vector ({pooled}) and {ids} size/crop ids of {self.time_embed_dim} make {want}")

    # -- the call -----------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, latents=None, seed: int = 0,
                 num_images_per_prompt: int = 1, output: str = "np", image=None, strength: float | None = None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, aesthetic_score: float = SDXL_AESTHETIC_SCORE,
                 negative_aesthetic_score: float = SDXL_NEGATIVE_AESTHETIC_SCORE,
                 progress: Callable[[int], None] | None = None, mesh: jax.sharding.Mesh | None = None) -> PipelineOutput:
        """Sample images for `prompt` (a string or a list: a batch).

        latents: the initial noise as diffusers' `latents` argument, but NHWC: [batch * num_images_per_prompt,
          height / 8, width / 8, 4] (diffusers': NCHW), unscaled (the sampler scales it by its first sigma);
          default: standard normal from `seed`.
        num_inference_steps: default an sgm sampler's num_steps, else 50, as diffusers.
        guidance_scale: classifier-free guidance when > 1 (default 7.5; SDXL 5.0), as diffusers; with an sgm sampler
          its guider's scale (IdentityGuider: 1, none).
        height/width: default the UNet's sample_size times the VAE's factor, as diffusers.
        original_size/crops_coords_top_left/target_size (SDXL) and aesthetic scores (the refiner): diffusers'
          size and crop conditions and their defaults ((height, width), (0, 0), (height, width); 6.0 and 2.5).
        output: "np" (float [0, 1] NHWC), "latent" (the final latents NHWC), "pil" (PIL images).
        image/strength: img2img as diffusers' Img2Img pipelines: `image` (float [0, 1] NHWC, one or one per
          prompt, or PIL images) is encoded (a posterior sample keyed by `seed`), noised to the step `strength`
          reaches (int(num_inference_steps * strength) steps are run; strength in (0, 1], default 0.8) and
          sampled from there; `latents` is then the noise added. height/width come from the image.
        progress: called with each step's index, from inside the compiled loop.
        mesh: run the denoising loop data parallel over this mesh's `data` axis (flax_sgm.sharding.make_mesh(data=n);
          its seq and model axes 1): the batch (prompts * num_images_per_prompt) split over the devices, the UNet
          replicated on each (placed once per mesh and kept). The images equal one device's.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: a string or a non-empty list of strings; got {prompt!r}"[:200])
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int; got {seed!r}")
        if self.family == "sd" and (original_size, crops_coords_top_left, target_size) != (None, (0, 0), None):
            raise ValueError("original_size, crops_coords_top_left and target_size are SDXL's conditions; an SD "
                             "pipeline takes none (diffusers' StableDiffusionPipeline has no such argument)")
        if self.family != "sdxl-refiner" and (aesthetic_score, negative_aesthetic_score) != (
                SDXL_AESTHETIC_SCORE, SDXL_NEGATIVE_AESTHETIC_SCORE):
            raise ValueError(f"aesthetic_score and negative_aesthetic_score condition SDXL's refiner only; this is a "
                             f"{self.family} pipeline")
        if output not in OUTPUTS:
            raise ValueError(f"output: one of {', '.join(OUTPUTS)}; got {output!r}")
        sgm = isinstance(self.scheduler, SgmSamplerConfig)
        if num_inference_steps is None:  # an sgm sampler's num_steps, else diffusers' pipeline's default
            num_inference_steps = (self.scheduler.num_steps if sgm else None) or DEFAULT_STEPS
        steps = _positive_int("num_inference_steps", num_inference_steps)
        per_prompt = _positive_int("num_images_per_prompt", num_images_per_prompt)
        if guidance_scale is None:  # an sgm sampler's guider (IdentityGuider: none), else diffusers' default
            if sgm:
                guidance_scale = 1.0 if self.scheduler.guidance_scale is None else self.scheduler.guidance_scale
            else:
                guidance_scale = 5.0 if self.family != "sd" else DEFAULT_GUIDANCE
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number; got {guidance_scale!r}")
        guidance_scale = float(guidance_scale)
        lcm = self.unet.config.time_cond_proj_dim is not None
        guided = guidance_scale > 1.0 and not lcm  # diffusers' do_classifier_free_guidance
        if negative_prompt is not None and not guided:
            raise ValueError(f"negative_prompt is used only with classifier-free guidance (guidance_scale > 1"
                             f"{', and not by an LCM UNet' if lcm else ''}); got guidance_scale={guidance_scale}")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} for {len(prompts)} prompts")
        batch = len(prompts) * per_prompt
        self._data_parallel(mesh, batch)
        start_step = 0
        if image is not None:
            image, strength, start_step = self._image(image, strength, steps, len(prompts), per_prompt, height, width)
            height, width = image.shape[1:3]
        elif strength is not None:
            raise ValueError("strength: goes with image= (img2img)")
        height = self._size("height", height)
        width = self._size("width", width)
        shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor, self.unet.config.in_channels)
        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != shape:
                raise ValueError(f"latents: shape {tuple(noise.shape)}, but {batch} images of {height} x {width} take "
                                 f"{shape} (NHWC: [batch, height / {self.vae_scale_factor}, width / "
                                 f"{self.vae_scale_factor}, channels])")

        t0 = time.perf_counter()
        context, y = self._condition(prompts, negatives, guided, per_prompt, height, width, original_size,
                                     crops_coords_top_left, target_size, aesthetic_score, negative_aesthetic_score)
        timestep_cond = None
        if lcm:
            w = jnp.full((batch,), guidance_scale - 1.0, jnp.float32)
            timestep_cond = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim)
        jax.block_until_ready(context)
        t1 = time.perf_counter()
        key = sampler_key(seed)
        graph, state = nnx.split(self.unet)
        if image is not None:
            noise = self._noised(image, noise, steps, start_step, jax.random.fold_in(jax.random.key(seed), 2))
        if mesh is not None:
            state, noise, context, y, timestep_cond = self._place(mesh, state, noise, context, y, timestep_cond)
        args = (state, noise, context, y, timestep_cond, jnp.float32(guidance_scale), key)
        compiled, compile_s = _denoiser(graph, self.scheduler, steps, guided, start_step, image is not None, mesh, args)
        t2 = time.perf_counter()
        with _Progress.lock:
            _Progress.listener = progress
            try:
                final = jax.block_until_ready(compiled(*args))
                jax.effects_barrier()  # every step's callback has run
            finally:
                _Progress.listener = None
        t3 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "compile_s": compile_s, "denoise_s": t3 - t2, "decode_s": 0.0}
        if output == "latent":
            return PipelineOutput(np.asarray(final), timings, steps)
        if mesh is not None:  # decoded on the VAE's device: an nnx.jit over mesh-placed input would write the
            # VAE's parameters back replicated over the mesh, and a later one-device call would meet them there
            final = jax.device_put(final, next(iter(jax.tree.leaves(nnx.state(self.vae))[0].devices())))
        images = np.asarray(jax.block_until_ready(_decode(self.vae, self._unscale(final))))
        timings["decode_s"] = time.perf_counter() - t3
        if output == "pil":
            images = to_pil(images)
        return PipelineOutput(images, timings, steps)

    def _image(self, image, strength, steps: int, prompts: int, per_prompt: int, height, width):
        """img2img's image as [batch, h, w, c] in [-1, 1], its strength and the step sampling starts from."""
        strength = 0.8 if strength is None else strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength: a number in (0, 1] (the share of the steps run on the image); got {strength!r}")
        run = min(int(steps * strength), steps)  # diffusers' get_timesteps
        if run < 1:
            raise ValueError(f"strength {strength} of {steps} steps runs no step (int(num_inference_steps * strength) "
                             "is 0); raise either")
        if height is not None or width is not None:
            raise ValueError("height/width: img2img takes them from image=; leave them out")
        if hasattr(image, "convert"):  # one PIL image
            image = [image]
        if isinstance(image, (list, tuple)):
            image = np.stack([np.asarray(i.convert("RGB"), np.float32) / 255.0 for i in image])
        image = np.asarray(image, np.float32)
        image = image[None] if image.ndim == 3 else image
        c = self.vae.config.in_channels
        if image.ndim != 4 or image.shape[-1] != c:
            raise ValueError(f"image: [batch, height, width, {c}] floats in [0, 1] (NHWC) or PIL images; got shape "
                             f"{image.shape}")
        if image.shape[0] not in (1, prompts):
            raise ValueError(f"image: {image.shape[0]} images for {prompts} prompts; give one, or one per prompt")
        if image.min() < 0.0 or image.max() > 1.0:
            raise ValueError(f"image: values in [0, 1]; got [{image.min():.3g}, {image.max():.3g}]")
        for name, size in zip(("height", "width"), image.shape[1:3]):
            self._size(f"image {name}", size)
        image = np.repeat(image, prompts * per_prompt // image.shape[0], axis=0)
        return jnp.asarray(image * 2.0 - 1.0), strength, steps - run

    def _noised(self, image, noise, steps: int, start_step: int, key):
        """The image's latents (a posterior sample, scaled as diffusers' Img2Img pipelines) noised to start_step."""
        from flax_sgm.sampling import add_noise

        latents = _encode_image(self.vae, image, key)
        c = self.vae.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean = jnp.asarray(c.latents_mean, jnp.float32)
            latents = (latents - mean) * c.scaling_factor / jnp.asarray(c.latents_std, jnp.float32)
        else:
            latents = latents * c.scaling_factor
        return add_noise(self.scheduler, steps, latents, noise, start_step)

    def _data_parallel(self, mesh, batch: int) -> int:
        """The data axis' size of `mesh` (1 without one), checked against the batch."""
        if mesh is None:
            return 1
        if not isinstance(mesh, jax.sharding.Mesh) or "data" not in mesh.shape:
            raise ValueError(f"mesh: a jax Mesh with a 'data' axis (flax_sgm.sharding.make_mesh(data=n)); got {mesh!r}")
        others = {k: v for k, v in mesh.shape.items() if k != "data" and v != 1}
        if others:
            raise ValueError(f"mesh: the pipeline runs data parallel only; its other axes must have size 1, got {others}")
        data = mesh.shape["data"]
        if batch % data:
            raise ValueError(f"mesh: a batch of {batch} images (prompts x num_images_per_prompt) does not split over "
                             f"{data} devices of the data axis")
        return data

    def _place(self, mesh, state, *batched):
        """The UNet's state replicated over `mesh` (placed once per mesh) and the batched inputs split by batch."""
        from jax.sharding import NamedSharding, PartitionSpec

        leaves = jax.tree.leaves(state)
        weights = (mesh, tuple(map(id, leaves)))  # new weights in the UNet: placed anew
        placed = self._replicas.get(weights, (None, None))[1]
        if placed is None:
            placed = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
            self._replicas = {weights: (leaves, placed)}  # one kept; the leaves held, so no id is reused meanwhile
        split = NamedSharding(mesh, PartitionSpec("data"))
        return (placed, *(None if x is None else jax.device_put(x, split) for x in batched))

    def _size(self, name: str, value) -> int:
        if value is None:
            return self.sample_size * self.vae_scale_factor
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: a positive int; got {value!r}")
        if value % self.vae_scale_factor:
            raise ValueError(f"{name} = {value} is not divisible by {self.vae_scale_factor} (the VAE's downsampling)")
        levels = 2 ** (self.unet.config.levels - 1) * self.vae_scale_factor
        if value % levels:
            raise ValueError(f"{name} = {value} is not divisible by {levels} (the VAE's {self.vae_scale_factor} times "
                             f"the UNet's {levels // self.vae_scale_factor})")
        return int(value)

    # -- prompts to conditioning --------------------------------------------------------------------------------

    def _condition(self, prompts, negatives, guided, per_prompt, height, width, original_size, crop, target_size,
                   aesthetic_score, negative_aesthetic_score):
        """(context, y) of the prompts through sgm's conditioner (text.condition), [uncond, cond] when guided (as
        diffusers batches them), each repeated per image; y, SDXL's, from the size and crop ids (the refiner's:
        the aesthetic scores)."""
        ids = neg_ids = None
        if self.family != "sd":
            original = tuple(original_size or (height, width))
            if self.family == "sdxl-refiner":
                ids, neg_ids = (*original, *crop, aesthetic_score), (*original, *crop, negative_aesthetic_score)
            else:
                ids = neg_ids = (*original, *crop, *(target_size or (height, width)))

        def conditioned(texts, time_ids, zeros=False):
            tokens = [jnp.asarray(tokenize(t, texts)) for t in self.tokenizers]
            rows = None if time_ids is None else jnp.tile(jnp.asarray([time_ids], jnp.float32), (len(texts), 1))
            context, y = _conditioned(self.text_encoders, tokens, tuple(self.specs), rows, time_dim=self.time_embed_dim,
                                      force_zeros=zeros)
            return jnp.repeat(context, per_prompt, axis=0), None if y is None else jnp.repeat(y, per_prompt, axis=0)

        context, y = conditioned(prompts, ids)
        if not guided:
            return context, y
        # diffusers' force_zeros_for_empty_prompt: no negative prompt, SDXL: the text outputs zeroed, sizes kept
        zeros = negatives is None and self.family != "sd" and self.flags.get("force_zeros_for_empty_prompt", True)
        uncond, y_uncond = conditioned(negatives or [""] * len(prompts), neg_ids, zeros)
        return jnp.concatenate([uncond, context]), None if y is None else jnp.concatenate([y_uncond, y])

    # -- the compiled loop --------------------------------------------------------------------------------------

    def _unscale(self, latents: jax.Array) -> jax.Array:
        """The sampler's latents as the VAE's decoder takes them (diffusers: SDXL's latents_mean/std if given)."""
        c = self.vae.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean = jnp.asarray(c.latents_mean, jnp.float32)
            std = jnp.asarray(c.latents_std, jnp.float32)
            return latents * std / c.scaling_factor + mean
        return latents / c.scaling_factor

    # -- what the pipeline is -----------------------------------------------------------------------------------

    def describe(self) -> dict:
        return {"source": self.source, "family": self.family, "scheduler": _config_dict(self.scheduler),
                "default_size": self.sample_size * self.vae_scale_factor, "vae_scale_factor": self.vae_scale_factor}


def sampler_key(seed: int) -> jax.Array:
    """The key of a stochastic sampler's noise for `seed` (apart from the initial noise's): step i adds
    flax_sgm.sampling.step_noise(sampler_key(seed), i, latents.shape). A public contract, so a reference can be
    fed the same noise."""
    return jax.random.fold_in(jax.random.key(seed), 1)


_COMPILED: dict = {}  # (UNet graph, sampler, steps, guided, argument shapes) -> the compiled loop
_COMPILED_KEEP = 8


def _denoiser(graph, scheduler, steps: int, guided: bool, start_step: int, noised: bool, mesh, args):
    """The compiled denoising loop for this UNet structure, sampler, steps and shapes (kept for the next call of
    any pipeline alike), and the seconds its compile took (0.0 when kept)."""
    leaves, tree = jax.tree.flatten(args)
    key = (graph, scheduler, steps, guided, start_step, noised, mesh, tree, tuple((a.shape, a.dtype) for a in leaves))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    with contextlib.nullcontext() if mesh is None else use_mesh(mesh):  # the UNet's activation constraints apply
        compiled = jax.jit(_denoise, static_argnums=(0, 1, 2, 3, 4, 5)).lower(graph, scheduler, steps, guided,
                                                                              start_step, noised, *args).compile()
    while len(_COMPILED) >= _COMPILED_KEEP:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - t0


def _denoise(graph, scheduler, steps: int, guided: bool, start_step: int, noised: bool, state, noise, context, y, timestep_cond, guidance_scale, key):
    from flax_sgm.sampling import sample

    unet = nnx.merge(graph, state)

    def model(x, t):
        if guided:  # one UNet call on [uncond, cond], then uncond + g * (cond - uncond)
            both = unet(jnp.concatenate([x, x]), jnp.concatenate([t, t]), context, y, timestep_cond)
            uncond, cond = jnp.split(both.astype(jnp.float32), 2)
            return uncond + guidance_scale * (cond - uncond)
        return unet(x, t, context, y, timestep_cond).astype(jnp.float32)

    return sample(model, noise, scheduler, steps, key=key, start_step=start_step, progress=_Progress.report,
                  noised=noised, ordered=jax.sharding.get_abstract_mesh().empty)


@functools.partial(nnx.jit, static_argnames=("specs", "time_dim", "force_zeros"))
def _conditioned(encoders, tokens, specs, time_ids, *, time_dim, force_zeros):
    """text.condition, compiled once per (specs, sizes); the outputs in float32, as the UNet's loop takes them."""
    context, y = condition(encoders, tokens, specs, time_ids, time_dim=time_dim, force_zeros=force_zeros)
    return context.astype(jnp.float32), None if y is None else y.astype(jnp.float32)


@nnx.jit
def _encode_image(vae, image, key):
    return vae.encode(image).sample(key).astype(jnp.float32)


@nnx.jit
def _decode(vae, latents):
    image = vae.decode(latents).astype(jnp.float32)
    return jnp.clip(image * 0.5 + 0.5, 0.0, 1.0)  # diffusers' VaeImageProcessor.denormalize


def to_pil(images: np.ndarray) -> list:
    """float [0, 1] NHWC -> PIL images, rounded as diffusers' numpy_to_pil."""
    from PIL import Image

    pixels = (np.asarray(images) * 255).round().astype(np.uint8)
    return [Image.fromarray(p[..., 0], mode="L") if p.shape[-1] == 1 else Image.fromarray(p) for p in pixels]


def _positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: a positive int; got {value!r}")
    return int(value)


def _config_dict(config) -> dict:
    if dataclasses.is_dataclass(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"config": repr(config)}
