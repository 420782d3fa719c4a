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
    reference/mask_blur.safetensors  see ref_mask_blur
    inpaint/crop_mask.png            a small off-centre mask for padding_mask_crop
    reference/mask_crop.safetensors  see ref_mask_crop
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


# Mask blur (diffusers' VaeImageProcessor.blur = PIL's ImageFilter.GaussianBlur): radii for the
# Pillow-only references (fractional, sub-pixel, and wider than the 40 px side, which takes
# BoxBlur.c's other edge branch), and pipeline runs (model, name in sdbatch, diffusers class,
# strength, blur radius).
BLUR_RADII = [0.5, 1.0, 2.0, 4.0, 7.3, 33.0, 64.0]
BLUR_RUNS = [
    ("unet9", "pndm", "PNDMScheduler", 1.0, 4.0),
    ("unet4", "ddim", "DDIMScheduler", 0.75, 7.3),
]


def blur_test_image():
    """A 72x40 (non-square) grey image with every kind of content a mask blur meets: hard
    black/white edges, a one-pixel line, a grey ramp and seeded noise."""
    import numpy as np

    rng = np.random.default_rng(20251130)
    m = np.zeros((40, 72), dtype="uint8")
    m[5:30, 10:35] = 255
    m[:, 50] = 255
    m[33:, :] = np.linspace(0, 255, 72).astype("uint8")[None, :]
    m[2:14, 40:70] = rng.integers(0, 256, size=(12, 30), dtype="uint8")
    return m


def radius_tag(r: float) -> str:
    return f"{r:g}".replace(".", "p")


def ref_mask_blur(out_dir: Path, ref_dir: Path, model_dir: Path, h) -> dict:
    """mask_blur.safetensors: PIL's GaussianBlur on 8-bit L images, and diffusers' inpainting
    with a blurred mask (run after ref_inpaint: it uses tiny-sd-inpaint/ and inpaint/mask.png).

        test_image uint8 [40,72]                  blur_test_image()
        blur_test_<r> uint8 [40,72]               Image.fromarray(test_image).filter(GaussianBlur(r))
        blur_mask_<r> uint8 [64,64]               the same on inpaint/mask.png converted to L
        <model>_<name>_<strength*100>_blur<r>_latents_NNN, ..._image
                                                  StableDiffusionInpaintPipeline with
                                                  mask_image = pipe.mask_processor.blur(mask_L, r)
    """
    import diffusers
    import numpy as np
    import torch
    from PIL import Image, ImageFilter

    size = h.IMAGE_SIZE
    inpaint_dir = out_dir / "tiny-sd-inpaint"
    mask_l = Image.open(out_dir / "inpaint" / "mask.png").convert("L")
    init = Image.open(out_dir / "img2img" / "init.png").convert("RGB")
    test = blur_test_image()
    tensors = {"test_image": torch.from_numpy(test)}
    for r in BLUR_RADII:
        for name, img in (("test", Image.fromarray(test)), ("mask", mask_l)):
            blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(r)))
            assert blurred.shape == np.asarray(img).shape
            tensors[f"blur_{name}_{radius_tag(r)}"] = torch.from_numpy(blurred.copy())

    runs = {}
    for model, name, cls, strength, radius in BLUR_RUNS:
        folder = inpaint_dir if model == "unet9" else model_dir
        base = h.load_pipeline(folder, diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler"))
        pipe = diffusers.StableDiffusionInpaintPipeline(**base.components)
        pipe.scheduler = getattr(diffusers, cls).from_pretrained(folder, subfolder="scheduler")
        pipe.set_progress_bar_config(disable=True)
        blurred = pipe.mask_processor.blur(mask_l, blur_factor=radius)
        # The blur must change what the model sees, or the run proves nothing: the binarised
        # mask at full size (the masked image, 9 channels) or at latent size (the 4-channel blend).
        full = lambda m: np.asarray(m) >= 128  # noqa: E731
        latent = lambda m: full(m)[::8, ::8]  # noqa: E731
        changed = latent if model == "unet4" else full
        assert (changed(blurred) != changed(mask_l)).any(), (model, radius)
        latents = []

        def on_step_end(_pipe, i, t, kwargs):
            latents.append(kwargs["latents"].clone())
            return {}

        out = pipe(
            h.ASTRONAUT_PROMPT,
            image=init,
            mask_image=blurred,
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
        run = f"{model}_{name}_{round(strength * 100)}_blur{radius_tag(radius)}"
        image = h.to_uint8(np.asarray(out, dtype=np.float32))
        for i, lat in enumerate(latents):
            tensors[f"{run}_latents_{i:03d}"] = lat
        tensors[f"{run}_image"] = torch.from_numpy(image)
        runs[run] = {
            "model": model,
            "scheduler": name,
            "steps": STEPS,
            "strength": strength,
            "mask_blur": radius,
            "steps_run": len(latents),
            "pixel_std": float(image.std()),
        }
    h.save_tensors(ref_dir / "mask_blur.safetensors", tensors)
    return {
        "radii": BLUR_RADII,
        "radius_tags": {radius_tag(r): r for r in BLUR_RADII},
        "prompt": h.ASTRONAUT_PROMPT,
        "negative_prompt": h.CLIP_SKIP_NEGATIVE_PROMPT,
        "seed": h.SCHEDULER_SEED,
        "guidance_scale": h.GUIDANCE_SCALE,
        "size": size,
        "runs": runs,
    }


# padding_mask_crop (diffusers: crop the mask's bounding box plus padding, inpaint it at the
# model's size, paste it back): PIL resizes that the crop makes (Lanczos, with and without a
# source box: _resize_and_fill's edge strips resize a zero-height box), get_crop_region cases,
# and pipeline runs (model, name, class, strength, padding) on crop_mask.png.
CROP_RESIZES = [
    # (mode, size, box or None)
    ("RGB", (64, 64), None),
    ("RGB", (30, 20), None),
    ("RGB", (128, 96), None),
    ("RGB", (7, 5), None),
    ("RGB", (200, 50), None),
    ("RGB", (61, 9), (0.0, 0.0, 61.0, 0.0)),
    ("RGB", (61, 9), (0.0, 47.0, 61.0, 47.0)),
    ("RGB", (6, 47), (0.0, 0.0, 0.0, 47.0)),
    ("RGB", (40, 33), (5.5, 3.25, 50.0, 40.0)),
    ("L", (64, 64), None),
    ("L", (29, 71), None),
    ("L", (61, 3), (0.0, 0.0, 61.0, 0.0)),
]
# (mask size w x h, white rectangles [(x0, y0, x1, y1)], processing width, height, pad)
CROP_REGIONS = [
    ((64, 64), [(24, 20, 44, 36)], 64, 64, 4),
    ((64, 64), [(24, 20, 44, 36)], 64, 64, 0),
    ((64, 64), [(0, 0, 10, 30)], 64, 64, 8),
    ((64, 64), [(50, 40, 64, 64)], 64, 64, 32),
    ((64, 64), [(30, 2, 33, 62)], 64, 64, 4),
    ((96, 40), [(10, 10, 20, 14), (70, 30, 80, 35)], 48, 64, 3),
    ((96, 40), [(40, 5, 60, 35)], 128, 32, 6),
    ((80, 120), [(5, 50, 75, 60)], 64, 64, 10),
    ((80, 120), [(38, 0, 42, 120)], 96, 32, 2),
    ((33, 65), [(16, 32, 17, 33)], 64, 96, 0),
]
CROP_RUNS = [
    ("unet9", "pndm", "PNDMScheduler", 1.0, 4),
    ("unet4", "ddim", "DDIMScheduler", 0.75, 8),
]


def crop_mask_image(size: int):
    """A small white area off the centre (so the crop is a real crop and needs its aspect
    widened), with a grey column on its left edge (the paste-back blends partial alpha)."""
    import numpy as np

    m = np.zeros((size, size, 3), dtype="uint8")
    m[20:36, 24:44] = 255
    m[20:36, 23] = 128
    return m


def ref_mask_crop(out_dir: Path, ref_dir: Path, model_dir: Path, h) -> dict:
    """mask_crop.safetensors: what diffusers' padding_mask_crop is made of, and the pipeline.

        resize_src_rgb uint8 [47,61,3], resize_src_l uint8 [47,61]   the resized images
        resize_<i> uint8                          PIL Image.resize(size, LANCZOS, box) (CROP_RESIZES[i])
        region_mask_<i> uint8 [h,w]               CROP_REGIONS[i]'s mask; the regions are in the meta
        <model>_<name>_<strength*100>_crop<pad>_latents_NNN, ..._image
                                                  StableDiffusionInpaintPipeline(padding_mask_crop=pad)
                                                  with inpaint/crop_mask.png
    """
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    size = h.IMAGE_SIZE
    rng = np.random.default_rng(20251201)
    yy, xx = np.mgrid[0:47, 0:61]
    smooth = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype("float64")
    src_rgb = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype("uint8")
    src_l = np.asarray(Image.fromarray(src_rgb).convert("L"))
    tensors = {"resize_src_rgb": torch.from_numpy(src_rgb.copy()), "resize_src_l": torch.from_numpy(src_l.copy())}
    for i, (mode, target, box) in enumerate(CROP_RESIZES):
        img = Image.fromarray(src_rgb if mode == "RGB" else src_l)
        out = img.resize(target, resample=Image.LANCZOS, box=box)
        tensors[f"resize_{i}"] = torch.from_numpy(np.asarray(out).copy())

    proc = diffusers.image_processor.VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    regions = []
    for i, ((w, hh), rects, pw, ph, pad) in enumerate(CROP_REGIONS):
        m = np.zeros((hh, w), dtype="uint8")
        for x0, y0, x1, y1 in rects:
            m[y0:y1, x0:x1] = 255
        tensors[f"region_mask_{i}"] = torch.from_numpy(m)
        region = proc.get_crop_region(Image.fromarray(m), pw, ph, pad=pad)
        regions.append({"width": pw, "height": ph, "pad": pad, "region": [int(v) for v in region]})

    Image.fromarray(crop_mask_image(size)).save(out_dir / "inpaint" / "crop_mask.png")
    mask = Image.open(out_dir / "inpaint" / "crop_mask.png").convert("RGB")
    init = Image.open(out_dir / "img2img" / "init.png").convert("RGB")
    runs = {}
    for model, name, cls, strength, pad in CROP_RUNS:
        folder = out_dir / "tiny-sd-inpaint" if model == "unet9" else model_dir
        base = h.load_pipeline(folder, diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler"))
        pipe = diffusers.StableDiffusionInpaintPipeline(**base.components)
        pipe.scheduler = getattr(diffusers, cls).from_pretrained(folder, subfolder="scheduler")
        pipe.set_progress_bar_config(disable=True)
        crop = pipe.mask_processor.get_crop_region(mask, size, size, pad=pad)
        # A real crop, and one whose aspect had to be widened.
        assert crop != (0, 0, size, size), crop
        latents = []

        def on_step_end(_pipe, i, t, kwargs):
            latents.append(kwargs["latents"].clone())
            return {}

        out = pipe(
            h.ASTRONAUT_PROMPT,
            image=init,
            mask_image=mask,
            height=size,
            width=size,
            strength=strength,
            padding_mask_crop=pad,
            negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
            guidance_scale=h.GUIDANCE_SCALE,
            num_inference_steps=STEPS,
            generator=[torch.Generator("cpu").manual_seed(h.SCHEDULER_SEED)],
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        image = np.asarray(out[0].convert("RGB"))[None]
        run = f"{model}_{name}_{round(strength * 100)}_crop{pad}"
        for i, lat in enumerate(latents):
            tensors[f"{run}_latents_{i:03d}"] = lat
        tensors[f"{run}_image"] = torch.from_numpy(image.copy())
        runs[run] = {
            "model": model,
            "scheduler": name,
            "steps": STEPS,
            "strength": strength,
            "padding_mask_crop": pad,
            "crop_region": [int(v) for v in crop],
            "steps_run": len(latents),
            "pixel_std": float(image.std()),
        }
    h.save_tensors(ref_dir / "mask_crop.safetensors", tensors)
    return {
        "resizes": [{"mode": m, "size": list(t), "box": list(b) if b else None} for m, t, b in CROP_RESIZES],
        "regions": regions,
        "mask": "inpaint/crop_mask.png",
        "prompt": h.ASTRONAUT_PROMPT,
        "negative_prompt": h.CLIP_SKIP_NEGATIVE_PROMPT,
        "seed": h.SCHEDULER_SEED,
        "guidance_scale": h.GUIDANCE_SCALE,
        "size": size,
        "runs": runs,
    }


if __name__ == "__main__":
    # Refreshes the inpainting references and their meta.json sections in an existing fixture
    # tree (make_fixtures.py, which setup.sh runs, makes them from scratch).
    import torch

    import make_fixtures as h

    torch.set_grad_enabled(False)
    out = h.DEFAULT_OUT
    ref = out / "reference"
    sections = {
        "inpaint": ref_inpaint(out, ref, out / "tiny-sd", h),
        "mask_blur": ref_mask_blur(out, ref, out / "tiny-sd", h),
        "mask_crop": ref_mask_crop(out, ref, out / "tiny-sd", h),
    }
    meta_path = ref / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(sections)
    meta_path.write_text(
        json.dumps(h._strict_json(meta), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    print(json.dumps(sections, indent=2))
