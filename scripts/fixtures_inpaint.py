"""Inpainting fixtures: diffusers' StableDiffusionInpaintPipeline on the tiny SD 1.x model (an
ordinary 4-channel UNet: diffusers blends the kept area back in at every step) and on a tiny
9-channel inpainting UNet (latents 4 + mask 1 + masked-image latents 4, the
stable-diffusion-inpainting layout).

Imported by make_fixtures.py (which owns the model, the prompts and the helpers); run after
fixtures_img2img (it reuses img2img/init.png). Writes:

    tiny-sd-inpaint/                 the tiny model with a 9-input-channel UNet (random weights)
    inpaint/mask.png                 a 64x64 RGB mask: white = repaint, black = keep, plus two
                                     coloured patches on either side of the grey-level threshold
    reference/inpaint.safetensors    see ref_inpaint
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

STEPS = 10
# (model, name in sdbatch, diffusers class, strength): both strength paths (pure noise at 1.0,
# noised image latents below) for PNDM (DDPM-style add_noise at an integer timestep) and Euler
# ancestral (sigma-space add_noise, a noise draw per step); DDIM and DPM++ for the 4-channel
# blend's add_noise at later steps.
RUNS = [
    ("unet9", "pndm", "PNDMScheduler", 1.0),
    ("unet9", "pndm", "PNDMScheduler", 0.75),
    ("unet9", "euler_ancestral", "EulerAncestralDiscreteScheduler", 1.0),
    ("unet9", "euler_ancestral", "EulerAncestralDiscreteScheduler", 0.75),
    ("unet4", "pndm", "PNDMScheduler", 1.0),
    ("unet4", "pndm", "PNDMScheduler", 0.75),
    ("unet4", "euler_ancestral", "EulerAncestralDiscreteScheduler", 1.0),
    ("unet4", "euler_ancestral", "EulerAncestralDiscreteScheduler", 0.75),
    ("unet4", "ddim", "DDIMScheduler", 0.75),
    ("unet4", "dpmpp_2m", "DPMSolverMultistepScheduler", 0.75),
]


def mask_image(size: int):
    """White rectangle (edges off the 8-pixel latent grid, so the nearest-neighbour downscale
    matters) on black, with two coloured patches: (100, 200, 50) is grey level 153 (repaint) and
    (200, 100, 50) is 124 (keep) under PIL's RGB -> L conversion and diffusers' 0.5 threshold."""
    import numpy as np

    m = np.zeros((size, size, 3), dtype="uint8")
    m[21:50, 13:45] = 255
    m[2:12, 2:30] = (100, 200, 50)
    m[30:40, 13:30] = (200, 100, 50)
    return m


def build_inpaint_model(model_dir: Path, inpaint_dir: Path, h) -> None:
    """The tiny model folder with its UNet replaced by a 9-input-channel one."""
    from diffusers import UNet2DConditionModel

    if inpaint_dir.exists():
        shutil.rmtree(inpaint_dir)
    shutil.copytree(model_dir, inpaint_dir)
    shutil.rmtree(inpaint_dir / "unet")
    unet = UNet2DConditionModel(**{**h.TINY_UNET_CONFIG, "in_channels": 9}).eval()
    h.reinit_parameters(unet, h.WEIGHT_SEED + 20)
    unet.save_pretrained(inpaint_dir / "unet", safe_serialization=True)
    h.save_fp16_variant(unet, inpaint_dir / "unet")


def ref_inpaint(out_dir: Path, ref_dir: Path, model_dir: Path, h) -> dict:
    """References from diffusers' own inpainting pipeline.

        inpaint.safetensors:
          mask uint8 [64,64,3]                       the mask (also inpaint/mask.png)
          <model>_<name>_<strength*100>_latents_NNN  latents after each step [1,4,8,8]
          <model>_<name>_<strength*100>_image        uint8 [1,64,64,3]
          mask_latent [1,1,8,8], masked_image_latents [1,4,8,8]
                                                     what prepare_mask_latents made (first run)
    """
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    size = h.IMAGE_SIZE
    inpaint_dir = out_dir / "tiny-sd-inpaint"
    build_inpaint_model(model_dir, inpaint_dir, h)
    (out_dir / "inpaint").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask_image(size)).save(out_dir / "inpaint" / "mask.png")
    mask = Image.open(out_dir / "inpaint" / "mask.png").convert("RGB")
    init = Image.open(out_dir / "img2img" / "init.png").convert("RGB")
    tensors = {"mask": torch.from_numpy(np.asarray(mask).copy())}

    bases = {}
    for key, folder in (("unet4", model_dir), ("unet9", inpaint_dir)):
        bases[key] = h.load_pipeline(folder, diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler"))
        assert bases[key].unet.config.in_channels == int(key[4:]), key

    runs = {}
    for model, name, cls, strength in RUNS:
        base = bases[model]
        folder = inpaint_dir if model == "unet9" else model_dir
        pipe = diffusers.StableDiffusionInpaintPipeline(**base.components)
        pipe.scheduler = getattr(diffusers, cls).from_pretrained(folder, subfolder="scheduler")
        pipe.set_progress_bar_config(disable=True)
        latents, extra = [], {}
        orig_prepare_mask = pipe.prepare_mask_latents

        def prepare_mask_latents(*a, _orig=orig_prepare_mask, **kw):
            m, mil = _orig(*a, **kw)
            extra["mask"], extra["masked"] = m.clone(), mil.clone()
            return m, mil

        def on_step_end(_pipe, i, t, kwargs):
            latents.append(kwargs["latents"].clone())
            return {}

        pipe.prepare_mask_latents = prepare_mask_latents
        out = pipe(
            h.ASTRONAUT_PROMPT,
            image=init,
            mask_image=mask,
            height=size,
            width=size,
            strength=strength,
            negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
            guidance_scale=h.GUIDANCE_SCALE,
            num_inference_steps=STEPS,
            generator=[torch.Generator("cpu").manual_seed(h.SCHEDULER_SEED)],
            output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        if "mask_latent" not in tensors:
            # Guided: the first half is the one the batch's image uses.
            tensors["mask_latent"] = extra["mask"][:1]
            tensors["masked_image_latents"] = extra["masked"][:1]
        run = f"{model}_{name}_{round(strength * 100)}"
        image = h.to_uint8(np.asarray(out, dtype=np.float32))
        for i, lat in enumerate(latents):
            tensors[f"{run}_latents_{i:03d}"] = lat
        tensors[f"{run}_image"] = torch.from_numpy(image)
        runs[run] = {
            "model": model,
            "scheduler": name,
            "steps": STEPS,
            "strength": strength,
            "steps_run": len(latents),
            "pixel_std": float(image.std()),
        }
    h.save_tensors(ref_dir / "inpaint.safetensors", tensors)
    return {
        "model_dir": "tiny-sd-inpaint",
        "prompt": h.ASTRONAUT_PROMPT,
        "negative_prompt": h.CLIP_SKIP_NEGATIVE_PROMPT,
        "seed": h.SCHEDULER_SEED,
        "guidance_scale": h.GUIDANCE_SCALE,
        "size": size,
        "runs": runs,
    }


if __name__ == "__main__":
    import make_fixtures as h

    out = h.DEFAULT_OUT
    print(json.dumps(ref_inpaint(out, out / "reference", out / "tiny-sd", h), indent=2))
