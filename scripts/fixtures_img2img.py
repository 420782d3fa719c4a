"""img2img fixtures for the tiny SD 1.x model: the VAE encoder and StableDiffusionImg2ImgPipeline.

Imported by make_fixtures.py (which owns the model, the prompts and the helpers). Writes:

    img2img/init.png                 a 64x64 synthetic init image (smooth shapes and noise)
    reference/img2img.safetensors    see ref_img2img
    reference/hires.safetensors      see ref_hires
    reference/hires_latent.safetensors  see ref_hires_latent
"""
from __future__ import annotations

import json
from pathlib import Path

INIT_SEED = 77
STRENGTH = 0.6
STEPS = 10
# (name in sdbatch, diffusers class, steps, strength); LCM samples in few steps.
RUNS = [
    ("pndm", "PNDMScheduler", STEPS, STRENGTH),
    ("ddim", "DDIMScheduler", STEPS, STRENGTH),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", STEPS, STRENGTH),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", STEPS, 0.75),
    ("euler", "EulerDiscreteScheduler", 7, 0.3),
    ("lcm", "LCMScheduler", 4, 0.5),
]


def init_image(size: int):
    """A smooth gradient with a disc and a little noise: structure the VAE can keep."""
    import numpy as np

    rng = np.random.default_rng(INIT_SEED)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    r = 0.35 + 0.5 * x
    g = 0.2 + 0.6 * y
    b = 0.5 + 0.4 * np.sin(6 * x * y)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.05
    r[disc], g[disc], b[disc] = 0.9, 0.1, 0.1
    img = np.stack([r, g, b], -1) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype("uint8")


def ref_img2img(out_dir: Path, ref_dir: Path, model_dir: Path, h) -> dict:
    """References from diffusers' own img2img.

        img2img.safetensors:
          init uint8 [64,64,3]                 the init image (also img2img/init.png)
          encoder_mean, encoder_std [1,4,8,8]  the VAE encoder's latent distribution of it
          <name>_init_latents [1,4,8,8]        the noised latents the loop starts from
          <name>_latents_NNN [1,4,8,8]         latents after each step
          <name>_image uint8 [1,64,64,3]
    """
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    size = h.IMAGE_SIZE
    img = init_image(size)
    (out_dir / "img2img").mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out_dir / "img2img" / "init.png")
    pil = Image.open(out_dir / "img2img" / "init.png").convert("RGB")
    tensors = {"init": torch.from_numpy(np.asarray(pil).copy())}

    base = h.load_pipeline(model_dir, diffusers.PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler"))
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        dist = base.vae.encode(pixels).latent_dist
        tensors["encoder_mean"], tensors["encoder_std"] = dist.mean.clone(), dist.std.clone()

    runs = {}
    for name, cls, steps, strength in RUNS:
        sched = getattr(diffusers, cls).from_pretrained(model_dir, subfolder="scheduler")
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
        pipe.scheduler = sched
        pipe.set_progress_bar_config(disable=True)
        latents, first = [], {}
        orig_prepare = pipe.prepare_latents

        def prepare_latents(*a, _orig=orig_prepare, **kw):
            out = _orig(*a, **kw)
            first["init"] = out.clone()
            return out

        def on_step_end(_pipe, i, t, kwargs):
            latents.append(kwargs["latents"].clone())
            return {}

        pipe.prepare_latents = prepare_latents
        out = pipe(
            h.ASTRONAUT_PROMPT,
            image=pil,
            strength=strength,
            negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
            guidance_scale=h.GUIDANCE_SCALE,
            num_inference_steps=steps,
            generator=[torch.Generator("cpu").manual_seed(h.SCHEDULER_SEED)],
            output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        image = h.to_uint8(np.asarray(out, dtype=np.float32))
        tensors[f"{name}_init_latents"] = first["init"]
        for i, lat in enumerate(latents):
            tensors[f"{name}_latents_{i:03d}"] = lat
        tensors[f"{name}_image"] = torch.from_numpy(image)
        change = float(np.abs(image[0].astype("int16") - img.astype("int16")).mean())
        runs[name] = {"steps": steps, "strength": strength, "steps_run": len(latents), "mean_abs_change_vs_init": change}
    h.save_tensors(ref_dir / "img2img.safetensors", tensors)
    return {
        "prompt": h.ASTRONAUT_PROMPT,
        "negative_prompt": h.CLIP_SKIP_NEGATIVE_PROMPT,
        "seed": h.SCHEDULER_SEED,
        "guidance_scale": h.GUIDANCE_SCALE,
        "size": size,
        "runs": runs,
    }


HIRES = {"scale": 2, "steps": 10, "strength": 0.5, "first_steps": 10}


def ref_hires(ref_dir: Path, model_dir: Path, h) -> dict:
    """A hires fix as diffusers users write it: txt2img at 64x64 (PNDM), PIL Lanczos resize to
    128x128, img2img (PNDM) of that at strength 0.5.

        hires.safetensors: first uint8 [1,64,64,3]; upscaled uint8 [128,128,3] (PIL);
        image uint8 [1,128,128,3]
    """
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    sched = diffusers.PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = h.load_pipeline(model_dir, sched)
    size = h.IMAGE_SIZE
    first = pipe(
        h.ASTRONAUT_PROMPT,
        negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
        guidance_scale=h.GUIDANCE_SCALE,
        num_inference_steps=HIRES["first_steps"],
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(h.SCHEDULER_SEED),
        output_type="np",
    ).images
    first = h.to_uint8(np.asarray(first, dtype=np.float32))
    big = size * HIRES["scale"]
    upscaled = Image.fromarray(first[0]).resize((big, big), Image.LANCZOS)
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.scheduler = diffusers.PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    i2i.set_progress_bar_config(disable=True)
    out = i2i(
        h.ASTRONAUT_PROMPT,
        image=upscaled,
        strength=HIRES["strength"],
        negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
        guidance_scale=h.GUIDANCE_SCALE,
        num_inference_steps=HIRES["steps"],
        generator=[torch.Generator("cpu").manual_seed(h.SCHEDULER_SEED)],
        output_type="np",
    ).images
    image = h.to_uint8(np.asarray(out, dtype=np.float32))
    h.save_tensors(ref_dir / "hires.safetensors", {
        "first": torch.from_numpy(first),
        "upscaled": torch.from_numpy(np.asarray(upscaled).copy()),
        "image": torch.from_numpy(image),
    })
    return dict(HIRES, prompt=h.ASTRONAUT_PROMPT, negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
                seed=h.SCHEDULER_SEED, guidance_scale=h.GUIDANCE_SCALE, size=size, scheduler="pndm",
                upscaler="PIL Image.LANCZOS")


HIRES_LATENT = {"scale": 2, "steps": 8, "strength": 0.6, "first_steps": 6}


def ref_hires_latent(ref_dir: Path, model_dir: Path, h) -> dict:
    """A latent hires fix (AUTOMATIC1111's "Latent" upscaler) as a diffusers user writes it:
    txt2img at 64x64 returning latents, `F.interpolate(..., mode="bilinear")` to the 128x128
    latent size, img2img from those latents (diffusers takes a 4-channel `image` as latents: no
    VAE encode, so no draw from the generator for it). Euler ancestral in both passes, so the
    order of every draw from each image's generator is checked too. Two images, two seeds.

        hires_latent.safetensors: first_latents f32 [2,4,8,8]; upscaled f32 [2,4,16,16];
        image uint8 [2,128,128,3]
    """
    import diffusers
    import numpy as np
    import torch
    import torch.nn.functional as F

    cfg = HIRES_LATENT
    seeds = [h.SCHEDULER_SEED, h.SCHEDULER_SEED + 1]
    make = lambda: diffusers.EulerAncestralDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = h.load_pipeline(model_dir, make())
    size = h.IMAGE_SIZE
    prompts = [h.ASTRONAUT_PROMPT] * 2
    negatives = [h.CLIP_SKIP_NEGATIVE_PROMPT] * 2
    first = pipe(
        prompts,
        negative_prompt=negatives,
        guidance_scale=h.GUIDANCE_SCALE,
        num_inference_steps=cfg["first_steps"],
        height=size,
        width=size,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="latent",
    ).images
    big = size * cfg["scale"]
    scale = pipe.vae_scale_factor
    upscaled = F.interpolate(first, size=(big // scale, big // scale), mode="bilinear")
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.scheduler = make()
    i2i.set_progress_bar_config(disable=True)
    out = i2i(
        prompts,
        image=upscaled,
        strength=cfg["strength"],
        negative_prompt=negatives,
        guidance_scale=h.GUIDANCE_SCALE,
        num_inference_steps=cfg["steps"],
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    image = h.to_uint8(np.asarray(out, dtype=np.float32))
    h.save_tensors(ref_dir / "hires_latent.safetensors", {
        "first_latents": first.float().contiguous(),
        "upscaled": upscaled.float().contiguous(),
        "image": torch.from_numpy(image),
    })
    return dict(cfg, prompt=h.ASTRONAUT_PROMPT, negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
                seeds=seeds, guidance_scale=h.GUIDANCE_SCALE, size=size, scheduler="euler_ancestral",
                upscaler="latent (F.interpolate bilinear)")


if __name__ == "__main__":
    import make_fixtures as h

    out = h.DEFAULT_OUT
    print(json.dumps(ref_img2img(out, out / "reference", out / "tiny-sd", h), indent=2))
    print(json.dumps(ref_hires(out / "reference", out / "tiny-sd", h), indent=2))
    print(json.dumps(ref_hires_latent(out / "reference", out / "tiny-sd", h), indent=2))
