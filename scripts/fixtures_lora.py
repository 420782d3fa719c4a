"""LoRA fixtures for the tiny SD 1.x model, made with peft and checked with diffusers.

Imported by make_fixtures.py (which owns the model, the prompts and the helpers); kept apart
because LoRA is a subject of its own. Writes:

    loras/style.safetensors       diffusers/PEFT layout (`unet.*.lora_A/B.weight`,
                                  `text_encoder.*.lora_A/B.weight`), r=4, lora_alpha=8 (scale 2)
                                  in the file's `lora_adapter_metadata`; attention, feed-forward
                                  and the transformer's 1x1-conv projections.
    loras/locon.safetensors       kohya/A1111 layout (`lora_unet_*`, `lora_te_*`,
                                  `.lora_down/.lora_up/.alpha`), r=2, alpha=1 (scale 0.5),
                                  including 3x3 convolutions (LoCon).
    loras/style_old.safetensors   `style` again in diffusers' older `lora.down/lora.up` layout
                                  with `.alpha` tensors (loaded by diffusers to the same image).
    loras/lcm.safetensors         an "LCM-LoRA": kohya layout, UNet only.
    reference/lora.safetensors    references (see ref_lora).

The LoRA weights are random (peft initialises lora_B to zero, which would test nothing), sized so
that each delta is a fraction of the weight it adapts, as trained LoRAs are: the images move
visibly, and the model stays well-conditioned (LoRAs larger than the weights made the tiny UNet
amplify float32 rounding ~10^4-fold, so that even diffusers' fuse_lora and its unfused adapters
disagreed by 1e-3). ref_lora checks that conditioning.
"""
from __future__ import annotations

import json
from pathlib import Path

LORA_SEED = 4242
# Every LoRA-able layer of the tiny UNet: attention, feed-forward, the transformers' 1x1-conv
# projections, the resnets' 3x3 convolutions and time projections.
UNET_TARGETS_STYLE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_TARGETS_LOCON = ["to_q", "to_v", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "proj_out"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TWO_WEIGHTS = {"style": 0.7, "locon": -0.3}
LCM_STEPS = 4
LCM_GUIDANCE = 1.0


def _randomise(model, seed: int, std: float) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _lora_state(model, config, adapter: str, seed: int, std: float) -> dict:
    """Adds adapter `adapter` to `model` with peft, randomises it, returns its state dict
    (PEFT names: `<module>.lora_A.weight`), then removes it again."""
    from peft import get_peft_model_state_dict

    model.add_adapter(config, adapter_name=adapter)
    _randomise(model, seed, std)
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    model.delete_adapters(adapter) if hasattr(model, "delete_adapters") else model.delete_adapter(adapter)
    return state


def _te_kohya_module(module: str) -> str:
    # kohya's files name the text encoder as transformers 4 did (`text_model.encoder...`);
    # transformers 5's CLIPTextModel has no `text_model.` level.
    return module if module.startswith("text_model.") else "text_model." + module


def to_kohya(unet_state: dict, te_state: dict, alpha: float) -> dict:
    import torch

    out = {}
    for prefix, state, fix in (("lora_unet_", unet_state, lambda m: m), ("lora_te_", te_state, _te_kohya_module)):
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            name = prefix + fix(module).replace(".", "_")
            part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
            out[f"{name}.{part}"] = value
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def to_old_diffusers(unet_state: dict, te_state: dict, scale: float) -> dict:
    """diffusers' pre-PEFT layout: `unet.<module>.lora.down.weight` / `.lora.up.weight`,
    `text_encoder.<module>.lora_linear_layer.down.weight` / `.up.weight`. It has
    no alphas (scale 1), so the scale is folded into `up` (a power of two: exact)."""
    out = {}
    # The UNet's layers said `lora.down`, the text encoder's `lora_linear_layer.down`.
    for prefix, state, layer in (("unet.", unet_state, "lora"), ("text_encoder.", te_state, "lora_linear_layer")):
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            part = {"A.weight": f"{layer}.down.weight", "B.weight": f"{layer}.up.weight"}[kind]
            out[f"{prefix}{module}.{part}"] = value * scale if kind == "B.weight" else value
    return out


def make_loras(model_dir: Path, lora_dir: Path, load_pipeline) -> dict:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from safetensors.torch import save_file

    lora_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model_dir, PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler"))
    # style: diffusers/PEFT layout, alpha/r = 2 recorded in the metadata.
    style_unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS_STYLE, init_lora_weights="gaussian")
    style_te_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    style_unet = _lora_state(pipe.unet, style_unet_cfg, "style", LORA_SEED, 0.1)
    style_te = _lora_state(pipe.text_encoder, style_te_cfg, "style", LORA_SEED + 1, 0.1)
    StableDiffusionPipeline.save_lora_weights(
        lora_dir,
        unet_lora_layers=style_unet,
        text_encoder_lora_layers=style_te,
        weight_name="style.safetensors",
        unet_lora_adapter_metadata=style_unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=style_te_cfg.to_dict(),
    )
    save_file(to_old_diffusers(style_unet, style_te, 8.0 / 4), lora_dir / "style_old.safetensors")

    # locon: kohya layout with 3x3 convolutions, alpha 1 on rank 2.
    locon_unet_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=UNET_TARGETS_LOCON, init_lora_weights="gaussian")
    # Every attention projection, as kohya trains them: diffusers 0.42.1 silently drops a kohya
    # text-encoder `q_proj` whose file has no `out_proj` (it then misreads the layout), which
    # check_loaded below would catch.
    locon_te_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    locon_unet = _lora_state(pipe.unet, locon_unet_cfg, "locon", LORA_SEED + 2, 0.15)
    locon_te = _lora_state(pipe.text_encoder, locon_te_cfg, "locon", LORA_SEED + 3, 0.15)
    save_file(to_kohya(locon_unet, locon_te, 1.0), lora_dir / "locon.safetensors", metadata={"ss_network_module": "networks.lora"})

    # lcm: UNet only, kohya layout, no text encoder part.
    lcm_cfg = LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS_STYLE + ["conv1", "conv2"], init_lora_weights="gaussian")
    lcm_unet = _lora_state(pipe.unet, lcm_cfg, "lcm", LORA_SEED + 4, 0.12)
    save_file(to_kohya(lcm_unet, {}, 4.0), lora_dir / "lcm.safetensors")
    return {
        "style": {"layout": "diffusers-peft", "r": 4, "lora_alpha": 8, "modules": len(style_unet) // 2 + len(style_te) // 2},
        "style_old": {"layout": "diffusers-old", "same_as": "style"},
        "locon": {"layout": "kohya", "r": 2, "alpha": 1.0, "modules": len(locon_unet) // 2 + len(locon_te) // 2},
        "lcm": {"layout": "kohya", "r": 4, "alpha": 4.0, "modules": len(lcm_unet) // 2},
    }


def check_loaded(pipe, adapter: str, file: Path) -> None:
    """diffusers must have turned every pair of the file into an adapter layer: a pair it
    dropped would make the reference wrong without a word."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        pairs = sum(1 for k in f.keys() if k.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight")))
    layers = sum(
        1
        for model in (pipe.unet, pipe.text_encoder)
        for _, m in model.named_modules()
        if adapter in getattr(m, "scaling", {})
    )
    if layers != pairs:
        raise SystemExit(f"diffusers made {layers} adapter layers of the {pairs} pairs in {file.name}")


def ref_lora(ref_dir: Path, model_dir: Path, lora_dir: Path, h) -> dict:
    """References from diffusers' own LoRA loading (peft underneath).

    `h` is make_fixtures' namespace (load_pipeline, tokenize, to_uint8, save_tensors, prompts).

        lora.safetensors:
          input_ids [2,77]                   prompt, negative prompt
          te_base, te_style, te_two [2,77,32] text-encoder outputs without LoRA, with style
                                             (1.0), with style 0.7 + locon -0.3
          unet_out_style, unet_out_two [2,4,8,8]  the UNet on unet.safetensors' inputs, style
                                             alone, two LoRAs
          image_base, image_style, image_locon, image_two, image_two_fused  uint8 [1,64,64,3]
          image_lcm                          LCMScheduler, 4 steps, guidance 1, lcm LoRA
    """
    import numpy as np
    import torch
    from diffusers import LCMScheduler, PNDMScheduler

    info = make_loras(model_dir, lora_dir, h.load_pipeline)
    pipe = h.load_pipeline(model_dir, PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler"))
    prompts = [h.ASTRONAUT_PROMPT, h.CLIP_SKIP_NEGATIVE_PROMPT]
    ids = torch.tensor(h.tokenize(pipe.tokenizer, prompts), dtype=torch.int64)
    sample, timestep, ehs, *_ = h.unet_inputs()
    tensors = {"input_ids": ids}

    def te():
        with torch.no_grad():
            return pipe.text_encoder(ids).last_hidden_state.clone()

    def image(scheduler=None, steps=h.SCHEDULER_STEPS, guidance=h.GUIDANCE_SCALE):
        if scheduler is not None:
            pipe.scheduler = scheduler
        out = pipe(
            h.ASTRONAUT_PROMPT,
            negative_prompt=h.CLIP_SKIP_NEGATIVE_PROMPT,
            guidance_scale=guidance,
            num_inference_steps=steps,
            height=h.IMAGE_SIZE,
            width=h.IMAGE_SIZE,
            generator=torch.Generator("cpu").manual_seed(h.SCHEDULER_SEED),
            output_type="np",
        ).images
        return h.to_uint8(np.asarray(out, dtype=np.float32))

    tensors["te_base"] = te()
    base = image()
    tensors["image_base"] = torch.from_numpy(base)

    pipe.load_lora_weights(lora_dir, weight_name="style.safetensors", adapter_name="style")
    check_loaded(pipe, "style", lora_dir / "style.safetensors")
    pipe.set_adapters(["style"], [1.0])
    tensors["te_style"] = te()
    with torch.no_grad():
        tensors["unet_out_style"] = pipe.unet(sample, timestep, encoder_hidden_states=ehs).sample.clone()
    tensors["image_style"] = torch.from_numpy(image())
    pipe.unload_lora_weights()

    # The older layout must be the same LoRA to diffusers.
    pipe.load_lora_weights(lora_dir, weight_name="style_old.safetensors", adapter_name="style_old")
    check_loaded(pipe, "style_old", lora_dir / "style_old.safetensors")
    pipe.set_adapters(["style_old"], [1.0])
    old = image()
    if not np.array_equal(old, tensors["image_style"].numpy()):
        raise SystemExit("style_old.safetensors is not the same LoRA as style.safetensors to diffusers")
    pipe.unload_lora_weights()

    pipe.load_lora_weights(lora_dir, weight_name="locon.safetensors", adapter_name="locon")
    check_loaded(pipe, "locon", lora_dir / "locon.safetensors")
    pipe.set_adapters(["locon"], [1.0])
    tensors["image_locon"] = torch.from_numpy(image())
    pipe.unload_lora_weights()

    pipe.load_lora_weights(lora_dir, weight_name="style.safetensors", adapter_name="style")
    pipe.load_lora_weights(lora_dir, weight_name="locon.safetensors", adapter_name="locon")
    pipe.set_adapters(list(TWO_WEIGHTS), list(TWO_WEIGHTS.values()))
    tensors["te_two"] = te()
    with torch.no_grad():
        tensors["unet_out_two"] = pipe.unet(sample, timestep, encoder_hidden_states=ehs).sample.clone()
    two = image()
    tensors["image_two"] = torch.from_numpy(two)
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=list(TWO_WEIGHTS))
    # Fused and unfused are the same model up to float rounding; a reference where they differ
    # more than rounding explains is ill-conditioned and could not pin an implementation down.
    with torch.no_grad():
        fused_unet = pipe.unet(sample, timestep, encoder_hidden_states=ehs).sample
    conditioning = float((fused_unet - tensors["unet_out_two"]).abs().max())
    if conditioning > 1e-5:
        raise SystemExit(f"diffusers' fused and unfused UNet differ by {conditioning:.2e}: LoRAs too large")
    fused = image()
    tensors["image_two_fused"] = torch.from_numpy(fused)
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    # diffusers unfuses by subtracting the delta again, which need not give the same bits back
    # (sdbatch restores saved originals instead): record how far it drifted.
    unfused_drift = int(np.abs(image().astype("int16") - base.astype("int16")).max())

    changes = {}
    for name in ("image_style", "image_locon", "image_two"):
        changes[name] = float(np.abs(tensors[name].numpy().astype("int16") - base.astype("int16")).mean())
        if changes[name] < 2.0:
            raise SystemExit(f"{name} is nearly the image without LoRA: the fixture tests too little")
    fused_diff = int(np.abs(fused.astype("int16") - two.astype("int16")).max())

    # LCM-LoRA: LCMScheduler from the model's scheduler config, 4 steps, guidance 1.
    pipe.load_lora_weights(lora_dir, weight_name="lcm.safetensors", adapter_name="lcm")
    check_loaded(pipe, "lcm", lora_dir / "lcm.safetensors")
    pipe.set_adapters(["lcm"], [1.0])
    lcm_sched = LCMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tensors["image_lcm"] = torch.from_numpy(image(lcm_sched, LCM_STEPS, LCM_GUIDANCE))
    pipe.unload_lora_weights()
    tensors["image_lcm_base"] = torch.from_numpy(image(LCMScheduler.from_pretrained(model_dir, subfolder="scheduler"), LCM_STEPS, LCM_GUIDANCE))
    if np.array_equal(tensors["image_lcm"].numpy(), tensors["image_lcm_base"].numpy()):
        raise SystemExit("the LCM LoRA changes nothing: the fixture tests nothing")

    h.save_tensors(ref_dir / "lora.safetensors", tensors)
    return {
        "files": info,
        "prompt": h.ASTRONAUT_PROMPT,
        "negative_prompt": h.CLIP_SKIP_NEGATIVE_PROMPT,
        "seed": h.SCHEDULER_SEED,
        "num_inference_steps": h.SCHEDULER_STEPS,
        "guidance_scale": h.GUIDANCE_SCALE,
        "size": h.IMAGE_SIZE,
        "scheduler": "pndm",
        "two_weights": TWO_WEIGHTS,
        "fused_vs_unfused_max_pixel_diff": fused_diff,
        "fused_vs_unfused_unet_max_abs_diff": conditioning,
        "mean_abs_pixel_change_vs_no_lora": changes,
        "diffusers_unfuse_max_pixel_drift": unfused_drift,
        "lcm": {"scheduler": "lcm", "steps": LCM_STEPS, "guidance_scale": LCM_GUIDANCE, "lora": "lcm"},
    }


# The layers latent-consistency/lcm-lora-sdv1-5 adapts (rank 64), for a LoRA of the real size.
LCM_FULL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


def make_full_size_lcm_lora(model_dir: Path, out_file: Path) -> None:
    """A random LoRA with the shapes of lcm-lora-sdv1-5 (rank 64 on every layer it adapts) for a
    full-size SD 1.x folder, in kohya layout: for timing `sdbatch bench --fast-lora`, not for
    pictures (its weights are random)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant="fp16", torch_dtype=torch.float16)
    cfg = LoraConfig(r=64, lora_alpha=8, target_modules=LCM_FULL_TARGETS, init_lora_weights="gaussian")
    state = _lora_state(unet, cfg, "lcm", LORA_SEED + 5, 0.01)
    tensors = {k: v.to(torch.float16) for k, v in to_kohya(state, {}, 8.0).items()}
    save_file(tensors, out_file)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {out_file}: {len(state) // 2} layers, {size / 1e6:.0f} MB")


if __name__ == "__main__":
    import argparse
    import sys

    import make_fixtures as h

    ap = argparse.ArgumentParser(description="LoRA fixtures (normally run by make_fixtures.py)")
    ap.add_argument("--out", type=Path, default=h.DEFAULT_OUT, help="fixture tree to refresh the LoRA references in")
    ap.add_argument("--full-size-lcm", nargs=2, type=Path, metavar=("MODEL_DIR", "OUT_FILE"),
                    help="write a random LoRA shaped like lcm-lora-sdv1-5 for a full-size model folder")
    a = ap.parse_args()
    if a.full_size_lcm:
        make_full_size_lcm_lora(*a.full_size_lcm)
        sys.exit(0)
    print(json.dumps(ref_lora(a.out / "reference", a.out / "tiny-sd", a.out / "loras", h), indent=2))
