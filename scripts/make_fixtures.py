#!/usr/bin/env python3
"""Build the test fixtures sdbatch's Rust tests compare against.

Usage:
    python scripts/make_fixtures.py [--out DIR]            # tiny model + reference outputs
    python scripts/make_fixtures.py --full-size --out DIR  # random full-size SD v1-4 (fp16), no references

Everything is computed on the CPU in float32 with fixed seeds, so two runs give
byte-identical reference files on the same machine (and numerically very close
ones elsewhere). Nothing is downloaded: HF_HUB_OFFLINE=1 is set, the CLIP BPE
vocabulary comes from the open-clip-torch wheel, and all weights are random.

Default DIR is <repo>/tests/fixtures/generated. The run replaces DIR/tiny-sd, DIR/single-file,
DIR/tiny-clip and DIR/reference (and nothing else in DIR).

Contract (what the Rust tests may rely on)
==========================================

DIR/tiny-sd/  -- a tiny, randomly initialised model in the exact diffusers layout of
                 CompVis/stable-diffusion-v1-4:
    model_index.json                      StableDiffusionPipeline; safety_checker/feature_extractor are
                                          null while the references above are made, then set as in
                                          SD v1-4 when the checker is added (see the last section)
    scheduler/scheduler_config.json       verbatim SD v1-4 PNDM config (see SCHEDULER_CONFIG)
    tokenizer/vocab.json, merges.txt      the REAL CLIP BPE vocabulary (49408 tokens, 48894 merges)
    tokenizer/tokenizer.json, tokenizer_config.json, special_tokens_map.json
    text_encoder/config.json, model.safetensors, model.fp16.safetensors
        CLIPTextModel: vocab 49408, hidden 32, intermediate 37, 2 layers, 4 heads,
        77 positions, quick_gelu, layer_norm_eps 1e-5
    unet/config.json, diffusion_pytorch_model.safetensors, diffusion_pytorch_model.fp16.safetensors
        UNet2DConditionModel: block_out_channels (32,64,64), layers_per_block 2,
        attention_head_dim 4 (= number of heads), cross_attention_dim 32, norm groups 16,
        down (CrossAttnDown, CrossAttnDown, Down), up (Up, CrossAttnUp, CrossAttnUp)
    vae/config.json, diffusion_pytorch_model.safetensors, diffusion_pytorch_model.fp16.safetensors
        AutoencoderKL: block_out_channels (16,32,32,32) (4 blocks -> factor 8),
        layers_per_block 1, latent 4, norm groups 8, scaling_factor 0.18215
    The *.fp16.safetensors files hold the same weights rounded to float16.

DIR/single-file/  -- the tiny models as single-file checkpoints in the original CompVis/LDM layout,
                 written with this script's own diffusers -> LDM mapping and checked to load back
                 with diffusers' from_single_file(config=<folder>) tensor-for-tensor equal:
    tiny-sd.safetensors    SD 1.x: model.diffusion_model.*, first_stage_model.* (mid attention as
                           1x1 convs), cond_stage_model.transformer.text_model.* (+ position_ids),
                           plus model_ema.* copies of 4 keys (+1.0) and model_ema.decay to be ignored
    tiny-sd2.safetensors   SD 2.x: as above with an OpenCLIP text tower cond_stage_model.model.*
                           (fused attn.in_proj_*, ln_1/ln_2, mlp.c_fc/c_proj, positional_embedding,
                           ln_final, text_projection, logit_scale) and one extra, random, final
                           resblock (index 3) that readers must drop (penultimate-layer encoder)
    tiny-sd-inpaint.safetensors  tiny-sd-inpaint/ (9-channel UNet, stable-diffusion-inpainting
                           layout) as tiny-sd.safetensors; checked with
                           StableDiffusionInpaintPipeline.from_single_file
    Head counts and norm groups of the tiny models cannot be inferred from shapes: load them with
    the folder as the config (--model-config tiny-sd / tiny-sd2 / tiny-sd-inpaint).

DIR/reference/  -- safetensors files (float32 unless stated) and json:
    tokens.json        {"prompts": [str, ...], "ids": [[77 ints], ...]}  (>= 220 prompts)
                       tokenizer(p, padding="max_length", max_length=77, truncation=True)
    text_encoder.safetensors
        input_ids          int64 [4,77]   for TEXT_ENCODER_PROMPTS
        last_hidden_state  [4,77,32]      text_encoder(input_ids)[0], no attention mask
    unet.safetensors
        sample [2,4,8,8], timestep [2] = [999.0, 480.5], encoder_hidden_states [2,77,32],
        out [2,4,8,8]                     unet(sample, timestep, encoder_hidden_states).sample
        sample_b [1,4,16,8] (a 128x64 image), timestep_b [1] = [1.0],
        encoder_hidden_states_b [1,77,32], out_b [1,4,16,8]
    unet_fp16_weights.safetensors
        sample, timestep, encoder_hidden_states (same as unet.safetensors),
        out [2,4,8,8]   from the unet loaded from the fp16 variant, upcast to float32
    vae.safetensors
        latents [2,4,8,8], decoded [2,3,64,64] = vae.decode(latents).sample
        (raw decoder input: no division by scaling_factor here)
    scheduler_<name>.safetensors, name in scheduler_classes() (pndm, ddim, euler_ancestral, dpmpp_2m, …;
        ddim_zero_snr / euler_zero_snr: rescale_betas_zero_snr, trailing spacing, v_prediction)
        One full StableDiffusionPipeline run: prompt ASTRONAUT_PROMPT, no negative prompt,
        guidance 7.5, 10 steps, 64x64, generator=[torch.Generator("cpu").manual_seed(1234)].
        The scheduler is Cls.from_pretrained(tiny-sd, subfolder="scheduler").
        timesteps             [T]  (float32; the timesteps actually iterated; PNDM: T = 11)
        init_latents          [1,4,8,8]  latents before the first step (already * init_noise_sigma)
        prompt_embeds         [1,77,32]  text embeddings of the prompt
        negative_prompt_embeds[1,77,32]  text embeddings of "" (the unconditional branch)
        noise_pred_NNN        [1,4,8,8]  guided noise prediction given to scheduler.step at step NNN
        latents_NNN           [1,4,8,8]  latents after step NNN (NNN = 000 .. T-1, zero padded)
        step_noise_NNN        [1,4,8,8]  (euler_ancestral*, lcm only) the noise the scheduler drew at
                                         step NNN from the same generator, after init_latents
        image_f32             [1,64,64,3] pipeline output, output_type="np", in [0,1]
        image                 uint8 [1,64,64,3] = (image_f32*255).round() (what PIL output uses)
    batch.safetensors
        3 prompts BATCH_PROMPTS with negative prompts BATCH_NEGATIVE_PROMPTS through the PNDM
        pipeline, generators seeded BATCH_SEEDS (one per image), guidance 7.5, 8 steps, 64x64.
        timesteps [9], init_latents [3,4,8,8], images_f32 [3,64,64,3], images uint8 [3,64,64,3]
    batch_0.png .. batch_2.png   the batch images, for eyeballing
    meta.json          every parameter used above, plus library versions

Safety checker, CLIP preprocessing, CLIP score (made after everything above, with their own seeds,
so nothing above depends on them):

DIR/tiny-sd/safety_checker/config.json, model.safetensors, model.fp16.safetensors
        diffusers StableDiffusionSafetyChecker(CLIPConfig): vision tower TINY_VISION_CONFIG (hidden 32,
        2 layers, 4 heads, intermediate 37, image 32, patch 4, quick_gelu), projection_dim 16,
        concept_embeds [17,16], special_care_embeds [3,16] and their thresholds chosen from the
        reference images' cosines so that SAFETY_IMAGES get a mix of decisions (see safety.json)
DIR/tiny-sd/feature_extractor/preprocessor_config.json   CLIPImageProcessor, shortest edge 32, crop 32
DIR/tiny-clip/  -- transformers CLIPModel: text TINY_TEXT_CONFIG (real 49408 vocabulary), vision
                   TINY_VISION_CONFIG with hidden_act gelu, projection_dim 16;
    config.json, model.safetensors (text_model.*, vision_model.*, text_projection.weight,
    visual_projection.weight, logit_scale), preprocessor_config.json (as feature_extractor above),
    vocab.json, merges.txt, special_tokens_map.json (no tokenizer.json: 3.6 MB, sdbatch reads
    vocab.json/merges.txt; the references tokenize with the in-memory tokenizer)

DIR/reference/
    clip_preprocess.safetensors + clip_preprocess.json
        CLIPImageProcessor.from_pretrained(folder with the case's preprocessor_config.json) on a PIL
        RGB image. transformers 5.23 without torchvision falls back to CLIPImageProcessorPil: PIL
        resize on uint8, numpy crop/rescale/normalize. Cases (json "cases"): the legacy SD v1-4 file
        format (int size/crop_size) at 56 px on 128x128 (the 512->224 ratio), 40x24 (up-scaling,
        portrait), 100x150 (down-scaling, landscape) and 150x60 (tall: Pillow 13's vertical pass
        first); bilinear, shortest edge 24, crop 32x28 (crop larger than the image: zero padding)
        on 40x64; exact size 24x40 without crop on 60x30 (HxW).
        image_K uint8 [H,W,3], pixel_values_K [3,h,w]
    safety.safetensors + safety.json (image names, thresholds, which image is flagged how)
        images uint8 [N,64,64,3] (N = 10: batch images, two scheduler images, five synthetic)
        pixel_values [N,3,32,32]   pipe.feature_extractor(pipe.image_processor.numpy_to_pil(...))
        pooled_output [N,32], image_embeds [N,16]   vision_model(...)[1], visual_projection(...)
        special_cos_dist [N,3], cos_dist [N,17]   diffusers' cosine_distance
        special_scores [N,3], concept_scores [N,17]  the rounded per-concept scores of forward()
        has_nsfw_concepts uint8 [N]   StableDiffusionSafetyChecker.forward(clip_input, images)
    clip_score.safetensors + clip_score.json (prompts, image names, scores)
        input_ids int64 [N,77], text_embeds [N,16], image_embeds [N,16] (get_text_features /
        get_image_features pooler_output), text_embeds_norm, image_embeds_norm (x / ||x||),
        cosine [N], score_raw = 100 * cosine, score = max(score_raw, 0)  (torchmetrics CLIPScore)

Tokenizer note: transformers 5.x only has the tokenizers-backed CLIPTokenizer. It
normalises with NFC, collapses every run of whitespace to one space and lowercases;
it does NOT do ftfy or HTML unescaping (so "&amp;" stays literal). tokens.json is
produced by exactly that tokenizer, which is what diffusers uses.
"""

from __future__ import annotations

import os

# Must be set before transformers/diffusers/huggingface_hub are imported: nothing may
# ever be fetched from a model hub, only local folders are loaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import copy
import functools
import gzip
import hashlib
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_img2img  # noqa: E402  (beside this script)
import fixtures_inpaint  # noqa: E402  (beside this script)
import fixtures_lora  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "generated"

# --------------------------------------------------------------------------------------
# Parameters (all of them end up in meta.json)
# --------------------------------------------------------------------------------------

MAX_LENGTH = 77
WEIGHT_SEED = 0  # seed of the random re-initialisation of the tiny weights

# Verbatim content of CompVis/stable-diffusion-v1-4/scheduler/scheduler_config.json.
# Written by hand (not via save_pretrained) so missing keys take each scheduler class's
# own defaults when loaded, exactly as with the real checkpoint.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

TINY_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
    projection_dim=32,
)

TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    cross_attention_dim=32,
    norm_num_groups=16,
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),  # 4 blocks -> 3 down-samplings -> factor 8
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

# A tiny SD 2.x-style model (tiny-sd2/): what SD 2.1 changes from 1.x, at toy size.
# OpenCLIP-style text encoder as diffusers loads SD 2.x's (gelu, "!" as the pad token; SD 2.x
# ships the encoder truncated to its penultimate layer, so no clip skip is involved), a UNet with
# linear projections, upcast attention and per-block head counts, a v-prediction DDIM scheduler
# (SD 2.1-768's scheduler_config.json) and a native size other than 64.
TINY_SD2_TEXT_CONFIG = dict(
    TINY_TEXT_CONFIG,
    hidden_size=40,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=5,
    hidden_act="gelu",
    pad_token_id=0,
    projection_dim=40,
)

TINY_SD2_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    sample_size=12,  # x8 (the VAE) -> native 96x96, as SD 2.1's 96 -> 768
    attention_head_dim=(2, 4, 4),  # per block, number of heads (diffusers' legacy name)
    cross_attention_dim=40,
    use_linear_projection=True,
    upcast_attention=True,
)

# Verbatim stabilityai/stable-diffusion-2-1/scheduler/scheduler_config.json.
SD2_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_PAD_TOKEN = "!"
SD2_SIZE = 96
SD2_STEPS = 8
SD2_NEGATIVE_PROMPT = "blurry"

# Real SD v1-4 shapes for --full-size. The text encoder config mirrors the real
# text_encoder/config.json (including its legacy bos/eos ids 0/2).
FULL_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_factor=1.0,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    projection_dim=768,
)

FULL_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)

# Real SD 2.1 (768-v) shapes for --full-size --single-file: the OpenCLIP-H text encoder as
# diffusers keeps it (23 of its 24 layers), linear projections, per-block heads, upcast attention.
FULL_SD2_TEXT_CONFIG = dict(
    FULL_TEXT_CONFIG,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=0,
    projection_dim=512,
)

FULL_SD2_UNET_CONFIG = dict(
    FULL_UNET_CONFIG,
    sample_size=96,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
)

FULL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
)

TEXT_ENCODER_PROMPTS = [
    "a photo of a cat",
    "",
    "professional product photography of a red sneaker, studio lighting",
    "concept art of a floating castle, 4k, trending on artstation",
]

UNET_TIMESTEPS = [999.0, 480.5]
UNET_TIMESTEPS_B = [1.0]

SCHEDULER_NAMES = ["pndm", "ddim", "euler_ancestral", "dpmpp_2m"]
ASTRONAUT_PROMPT = "a photo of an astronaut riding a horse"
GUIDANCE_SCALE = 7.5
SCHEDULER_STEPS = 10
SCHEDULER_SEED = 1234
# Runs with their own number of steps (LCM samples in a few steps).
SCHEDULER_STEPS_BY_NAME = {"lcm": 4}
IMAGE_SIZE = 64  # height = width of every pipeline run

BATCH_PROMPTS = [
    "a red apple on a wooden table",
    "concept art of a dragon over a castle",
    "professional product photography of a leather handbag",
]
BATCH_NEGATIVE_PROMPTS = ["blurry", "", "low quality, watermark"]
BATCH_SEEDS = [7, 42, 2024]
BATCH_STEPS = 8

EXPECTED_CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def scheduler_classes():
    """Name -> (class, extra kwargs). Lazy so that importing this module stays cheap."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        LCMScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    class EulerAncestralKarrasScheduler(EulerAncestralDiscreteScheduler):
        """Euler ancestral on Karras sigmas (k-diffusion's sample_euler_ancestral on get_sigmas_karras).

        diffusers' EulerAncestralDiscreteScheduler has no use_karras_sigmas (it ignores the key), so
        the sigmas and timesteps come from EulerDiscreteScheduler(use_karras_sigmas=True) on the same
        config, and EulerAncestralDiscreteScheduler's own step runs on them."""

        def set_timesteps(self, num_inference_steps, device=None):
            super().set_timesteps(num_inference_steps, device)
            euler = EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
            euler.set_timesteps(num_inference_steps, device)
            self.sigmas = euler.sigmas
            self.timesteps = euler.timesteps

    karras = {"use_karras_sigmas": True}
    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    return {
        "pndm": (PNDMScheduler, {}),
        "ddim": (DDIMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_karras": (EulerDiscreteScheduler, karras),
        "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
        "euler_ancestral_karras": (EulerAncestralKarrasScheduler, {}),
        "heun": (HeunDiscreteScheduler, {}),
        "heun_karras": (HeunDiscreteScheduler, karras),
        "lms": (LMSDiscreteScheduler, {}),
        "lms_karras": (LMSDiscreteScheduler, karras),
        # dpmsolver++ / order 2 are the class defaults; spelled out to pin "DPM++ 2M".
        "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": (
            DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, **karras},
        ),
        # Not user-facing names: the options a zero-terminal-SNR model (SD 2.x style) carries in its
        # scheduler_config.json. v_prediction because DDIM's x0 from an epsilon prediction divides
        # by sqrt(alphas_cumprod[999]) = 0 there (zero-SNR models are v-prediction models).
        "ddim_zero_snr": (DDIMScheduler, zero_snr),
        "euler_zero_snr": (EulerDiscreteScheduler, zero_snr),
        # UniPC's defaults (bh2, order 2, predict_x0, lower_order_final, no disabled corrector).
        "unipc": (UniPCMultistepScheduler, {}),
        "unipc_karras": (UniPCMultistepScheduler, karras),
        "unipc_zero_snr": (UniPCMultistepScheduler, zero_snr),
        # Stochastic: re-noises with randn_tensor from the generator after every step but the last
        # (recorded as step_noise_NNN). An LCM scheduler on this non-LCM model is still a valid
        # per-step comparison; it runs LCM_STEPS steps (see SCHEDULER_STEPS_BY_NAME).
        "lcm": (LCMScheduler, {}),
    }


# --------------------------------------------------------------------------------------
# Tokenizer: the real CLIP BPE vocabulary, converted like OpenAI's SimpleTokenizer
# --------------------------------------------------------------------------------------


def find_bpe_file() -> Path:
    """Locate bpe_simple_vocab_16e6.txt.gz inside the open_clip package without importing
    it (its __init__ imports torchvision, which is not installed)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip (open-clip-torch) is not installed; it ships the CLIP BPE vocabulary")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    raise SystemExit("bpe_simple_vocab_16e6.txt.gz not found in the open_clip package")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab token->id, merges) exactly as CLIP's SimpleTokenizer builds them."""
    text = gzip.open(find_bpe_file()).read().decode("utf-8")
    lines = text.split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(merges) == 48894, len(merges)
    assert len(tokens) == 49408 and len(set(tokens)) == 49408
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab_files(
    folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = "<|endoftext|>"
) -> None:
    """vocab.json / merges.txt in the format of the real SD v1-4 tokenizer folder (SD 2.x's pads
    with "!")."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad_token,
                "unk_token": "<|endoftext|>",
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """transformers 5.x has only the tokenizers-backed CLIPTokenizer; given
    vocab_file=/merges_file= it silently builds an empty BPE, so pass the data itself."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    ids = tokenize(tok, ["a photo of a cat"])[0]
    expected = EXPECTED_CAT_IDS + [49407] * (MAX_LENGTH - len(EXPECTED_CAT_IDS))
    if ids != expected:
        raise SystemExit(f"tokenizer self-check failed: {ids[:12]}...")
    return tok


def tokenize(tok, prompts: list[str]) -> list[list[int]]:
    return tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids


# --------------------------------------------------------------------------------------
# Tokenizer corpus
# --------------------------------------------------------------------------------------

_HAND_WRITTEN_PROMPTS = [
    # plain English
    "a photo of a cat",
    "a photo of an astronaut riding a horse",
    "A beautiful sunset over the mountains",
    "the quick brown fox jumps over the lazy dog",
    "an oil painting of a lighthouse in a storm",
    "portrait of an old fisherman with a white beard",
    "a bowl of ramen with chopsticks",
    "a cozy cabin in a snowy forest at night",
    "watercolor illustration of a hummingbird",
    "a futuristic city skyline at dawn",
    # empty / whitespace
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "  leading spaces",
    "trailing spaces   ",
    "   both sides   ",
    "multiple     inner     spaces",
    "tab\tseparated\twords",
    "line one\nline two\nline three",
    "windows\r\nline endings",
    " \t\n mixed \t whitespace \n ",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "zero\u200bwidth\u200bspace",
    # punctuation of every kind
    "hello, world!",
    "wait... what?!",
    "really?!?! yes!!!",
    "a-b_c.d,e;f:g",
    "quotes \"double\" and 'single'",
    "brackets (round) [square] {curly} <angle>",
    "math: 1+1=2, 3*4=12, 10/2=5, 7-3=4, 2^8=256, 5%2=1",
    "symbols ~ ` ! @ # $ % ^ & * ( ) - _ = + [ ] { } \\ | ; : ' \" , . < > / ?",
    "email me at someone@example.com",
    "https://example.com/path?query=1&x=y#frag",
    "C:\\Users\\name\\file.txt",
    "#hashtag @mention $money",
    "em—dash and en–dash and hyphen-ated",
    "“curly quotes” and ‘single curly’",
    "ellipsis… and bullet • and section § and pilcrow ¶",
    "copyright © registered ® trademark ™",
    "arrows → ← ↑ ↓ ⇒",
    "!!!???...,,,;;;:::",
    "___---+++===",
    # apostrophes and contractions
    "it's a dog's life",
    "don't stop, can't stop, won't stop",
    "they're here and we've arrived",
    "I'm sure you'll like it, he'd say",
    "IT'S LOUD AND DON'T SHOUT",
    "rock 'n' roll",
    "the '90s were great",
    "o'clock o'neill rock'n'roll",
    "students' books and james's car",
    "it’s a typographic apostrophe",
    "'s 't 're 've 'm 'll 'd",
    # digits and numbers
    "1234567890",
    "3.14159 2.71828",
    "1,000,000 and 1.000.000 and 1 000 000",
    "$19.99 €5,50 £100 ¥1000",
    "100% cotton, 50/50 blend",
    "2024-01-31 12:34:56",
    "room 101, floor -3, 0.5x zoom",
    "4k 8k 16k uhd 1080p 720p",
    "phone +1 (555) 123-4567",
    "version v1.2.3-beta+build.45",
    "1st 2nd 3rd 4th 21st 100th",
    "0x1F 0b1010 1e-5 6.02e23",
    "٣ arabic-indic digit and ① circled one and Ⅻ roman twelve",
    # mixed case
    "MiXeD CaSe TeXt",
    "ALL CAPS PROMPT",
    "camelCaseWords and PascalCaseWords",
    "iPhone eBay YouTube McDonald's",
    # accents and diacritics
    "café au lait",
    "naïve façade résumé",
    "über straße grün",
    "señor niño mañana",
    "crème brûlée à la carte",
    "e\u0301 combining acute",
    "n\u0303 combining tilde and a\u0308 combining diaeresis",
    "Ångström Øresund Łódź",
    "ÉCOLE NORMALE SUPÉRIEURE",
    "İstanbul ǅ ß ẞ ﬁ ligature",
    # emoji
    "a cat 🐱 and a dog 🐶",
    "🔥🔥🔥",
    "family 👨‍👩‍👧‍👦 zwj sequence",
    "thumbs up 👍🏽 with skin tone",
    "flags 🇺🇸 🇯🇵 🇫🇷 🇩🇪",
    "rainbow flag 🏳️‍🌈",
    "heart ❤️ and red heart ❤",
    "keycap 1️⃣ #️⃣",
    "😀😃😄😁😆😅😂🤣",
    # CJK
    "一只可爱的猫",
    "中国山水画，高清，杰作",
    "猫の写真",
    "ひらがな と カタカナ と 漢字",
    "アニメ風の女の子、桜の木の下で",
    "고양이 사진",
    "한국어 프롬프트 테스트",
    "mixed 中文 English 日本語 한국어",
    "ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ １２３",
    # Arabic / Cyrillic / Greek / others
    "صورة قطة",
    "مرحبا بالعالم",
    "фотография кошки",
    "Привет, МИР!",
    "φωτογραφία μιας γάτας",
    "ΑΒΓΔ αβγδ λόγος",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    # HTML entities and markup (the HF tokenizer does not unescape them)
    "fish &amp; chips",
    "&lt;3 &gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;",
    "<b>bold</b> <i>italic</i>",
    "tom &amp;amp; jerry",
    # special tokens written literally
    "<|startoftext|>",
    "<|endoftext|>",
    "hello <|endoftext|> world",
    "<|startoftext|>a photo<|endoftext|>",
    # typical SD prompts: e-commerce
    "professional product photography of a red sneaker, studio lighting",
    "product shot of a minimalist white ceramic mug on a marble countertop, soft shadows, 85mm",
    "e-commerce photo of a luxury wristwatch, black background, rim light, high detail",
    "flat lay of skincare products, pastel background, top-down view, commercial photography",
    "a pair of wireless earbuds floating, white seamless background, octane render",
    "studio photo of a leather backpack, 50mm f/1.8, bokeh, color graded",
    "packshot: perfume bottle, glass reflections, gradient backdrop --ar 1:1",
    # typical SD prompts: game concept art with weights
    "concept art of a floating castle, 4k, trending on artstation",
    "(masterpiece:1.2), (best quality:1.1), fantasy warrior, intricate armor, unreal engine 5",
    "((epic)) landscape, [blurry], (dramatic lighting:1.3), matte painting",
    "{{best quality}}, 1girl, solo, looking at viewer, cyberpunk city, neon lights",
    "isometric game asset, treasure chest, low poly, (pixel art:0.8)",
    "character sheet of a goblin merchant, front/side/back view, by greg rutkowski and alphonse mucha",
    "[dragon|phoenix] hybrid creature, concept art, artstation hq, 8k",
    "sci-fi spaceship interior, volumetric fog, ray tracing, (cinematic:1.4), octane render, 16:9",
    "a knight in shining armor :: 2, a dark forest :: 1",
    "masterpiece, best quality, ultra-detailed, illustration, <lora:detail_tweaker:0.5>",
]


def _programmatic_prompts() -> list[str]:
    """Deterministic generated prompts (fixed seed, fixed orders)."""
    out: list[str] = []
    subjects = ["a red sneaker", "a vintage camera", "an elf archer", "a cyberpunk samurai",
                "a glass teapot", "a mechanical owl", "a desert outpost", "a cozy bookstore"]
    styles = ["studio lighting", "oil painting", "digital art, trending on artstation",
              "35mm film photo", "isometric 3d render", "watercolor"]
    for i, s in enumerate(subjects):
        for j, st in enumerate(styles):
            if (i + j) % 2 == 0:  # 24 of the 48 combinations, varied across both axes
                out.append(f"{s}, {st}")

    # weighted-prompt syntax with many weights
    for k, w in enumerate([0.5, 0.8, 1.0, 1.1, 1.25, 1.5, 2.0]):
        out.append(f"({subjects[k % len(subjects)]}:{w}), ({styles[k % len(styles)]}:{w + 0.1:.1f})")

    # numbers with separators and formats
    for n in [0, 7, 42, 999, 1000, 65536, 1234567, 3000000000]:
        out.append(f"{n} items, {n:,} units, {n:_} ids, #{n:08d}")
    for x in [0.001, 1.5, 3.14159, 2.5e-8, 12345.678]:
        out.append(f"value {x} ≈ {x:.3f} or {x:e}")

    # whitespace/case variants of one prompt
    base = "a photo of an astronaut riding a horse"
    out += [base.upper(), base.title(), "  " + base, base + "  ", base.replace(" ", "\t"),
            base.replace(" ", "\n"), base.replace(" ", "  "), base.replace(" ", "")]

    # truncation boundaries: bos + n content tokens + eos ("a" is a single token)
    for n in [74, 75, 76, 77, 100]:
        out.append(" ".join(["a"] * n))

    # several very long prompts (> 77 tokens)
    long_parts = ["masterpiece", "best quality", "ultra detailed", "8k wallpaper", "intricate details",
                  "cinematic lighting", "sharp focus", "volumetric fog", "highly detailed face",
                  "depth of field", "golden hour", "award winning photography", "hdr", "bokeh",
                  "by artgerm and greg rutkowski", "unreal engine 5", "octane render", "ray tracing"]
    for k in range(4):
        parts = [long_parts[(k * 5 + i) % len(long_parts)] for i in range(30 + 10 * k)]
        out.append(", ".join(parts))
    out.append("an extremely long description of a fantasy city " * 12)
    out.append("长" * 120)
    out.append("🐱" * 60)
    out.append("supercalifragilisticexpialidocious" * 8)

    # seeded random strings over a mixed character pool
    rng = random.Random(20240531)
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
            + list(" \t\n.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
            + list("éüñçøåßœæ") + ["e\u0301", "a\u0308"]
            + list("猫犬山水花火ねこイヌ고양이") + list("кошкаγάταقطة")
            + ["🐱", "👍🏽", "🇯🇵", "👨‍👩‍👧", "❤️", "✨"]
            + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "&amp;", "1,000", "3.5"])
    for k in range(60):
        n = rng.randint(1, 40)
        out.append("".join(rng.choice(pool) for _ in range(n)))

    # words with every contraction suffix in varied case
    words = ["it", "don", "they", "we", "i", "you", "he"]
    sufs = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'LL"]
    for k, w in enumerate(words):
        out.append(" ".join(w + s for s in sufs[k:] + sufs[:k]))
    return out


def build_corpus() -> list[str]:
    corpus: list[str] = []
    seen: set[str] = set()
    for p in _HAND_WRITTEN_PROMPTS + _programmatic_prompts():
        if p not in seen:
            seen.add(p)
            corpus.append(p)
    assert len(corpus) >= 220, len(corpus)
    return corpus


# --------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------


def reinit_parameters(model, seed: int) -> None:
    """Re-initialise every parameter from a fixed-seed normal.

    With the default inits some outputs are near zero and many biases/norm parameters
    are exactly 0/1, which would let a Rust bug that drops a bias, a norm affine or a
    whole layer pass the tests. So every tensor gets a non-trivial random value:
      - norm weights (LayerNorm/GroupNorm): 1 + 0.1 * randn, their biases 0.05 * randn
      - other biases and any other 1-d parameter: 0.05 * randn
      - matrices / conv kernels / embeddings: randn / sqrt(fan_in), fan_in = numel / out
    Parameters are visited in named_parameters() order with one generator -> deterministic.
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    norm_params = set()
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                norm_params.add(id(m.weight))
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if id(p) in norm_params:
            new = 1.0 + 0.1 * noise
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            new = noise / math.sqrt(fan_in)
        else:
            new = 0.05 * noise
        p.data.copy_(new.to(p.dtype))


def build_tiny_models():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(WEIGHT_SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)).eval()
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    reinit_parameters(text_encoder, WEIGHT_SEED + 1)
    reinit_parameters(unet, WEIGHT_SEED + 2)
    reinit_parameters(vae, WEIGHT_SEED + 3)
    return text_encoder, unet, vae


def pndm_from_dict():
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})


def write_scheduler_config(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n", encoding="utf-8")


def save_fp16_variant(model, folder: Path) -> None:
    """Save a float16 copy next to the float32 weights (diffusers' variant="fp16" names).

    save_pretrained also rewrites config.json, and transformers 5 records "dtype": "float16"
    there (from_pretrained's default dtype="auto" would then load the fp32 weights as fp16).
    So save into a scratch folder and move only the weight files into place."""
    import tempfile

    import torch

    half = copy.deepcopy(model).to(torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        half.save_pretrained(tmp, variant="fp16", safe_serialization=True)
        weights = sorted(Path(tmp).glob("*.fp16.safetensors"))
        assert weights, f"no fp16 weights written for {folder.name}"
        for w in weights:
            shutil.move(str(w), folder / w.name)
    del half


def save_model_folder(model_dir: Path, text_encoder, unet, vae, tokenizer, vocab, merges) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=pndm_from_dict(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    save_fp16_variant(unet, model_dir / "unet")
    save_fp16_variant(vae, model_dir / "vae")
    save_fp16_variant(text_encoder, model_dir / "text_encoder")
    # save_pretrained of the tokenizers-backed tokenizer writes only tokenizer.json and
    # tokenizer_config.json; add the real vocab.json/merges.txt the Rust side reads.
    write_vocab_files(model_dir / "tokenizer", vocab, merges)
    # Replace the save_pretrained scheduler config by the verbatim SD v1-4 one.
    write_scheduler_config(model_dir / "scheduler")


def check_model_folder(model_dir: Path, text_encoder, unet, vae) -> None:
    """The folder must contain what the contract lists, and reload to identical weights."""
    import torch
    from safetensors.torch import load_file

    required = [
        "model_index.json", "scheduler/scheduler_config.json",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer.json",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    missing = [r for r in required if not (model_dir / r).is_file()]
    if missing:
        raise SystemExit(f"model folder incomplete: {missing}")
    te_cfg = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    assert te_cfg.get("dtype", te_cfg.get("torch_dtype")) in (None, "float32"), te_cfg
    pairs = [
        (text_encoder, "text_encoder/model"),
        (unet, "unet/diffusion_pytorch_model"),
        (vae, "vae/diffusion_pytorch_model"),
    ]
    for model, stem in pairs:
        sd = model.state_dict()
        f32 = load_file(model_dir / f"{stem}.safetensors")
        f16 = load_file(model_dir / f"{stem}.fp16.safetensors")
        if set(f32) != set(sd) or set(f16) != set(sd):
            extra = set(f32) ^ set(sd)
            raise SystemExit(f"{stem}: saved keys differ from the model's: {sorted(extra)[:5]}")
        for k, v in sd.items():
            assert f32[k].dtype == torch.float32 and torch.equal(f32[k], v), (stem, k)
            assert f16[k].dtype == torch.float16 and torch.equal(f16[k], v.half()), (stem, k)


# --------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------


def save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def ref_tokens(ref_dir: Path, tokenizer) -> dict:
    corpus = build_corpus()
    ids = tokenize(tokenizer, corpus)
    assert all(len(r) == MAX_LENGTH for r in ids)
    (ref_dir / "tokens.json").write_text(
        json.dumps({"prompts": corpus, "ids": ids}, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
    )
    n_trunc = sum(1 for r in tokenizer(corpus).input_ids if len(r) > MAX_LENGTH)
    return {"count": len(corpus), "truncated": n_trunc}


def ref_text_encoder(ref_dir: Path, tokenizer, text_encoder) -> None:
    import torch

    input_ids = torch.tensor(tokenize(tokenizer, TEXT_ENCODER_PROMPTS), dtype=torch.int64)
    # StableDiffusionPipeline passes no attention mask (config has no use_attention_mask).
    hidden = text_encoder(input_ids)[0]
    save_tensors(ref_dir / "text_encoder.safetensors", {"input_ids": input_ids, "last_hidden_state": hidden})


def unet_inputs():
    import torch

    torch.manual_seed(100)
    sample = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, MAX_LENGTH, TINY_TEXT_CONFIG["hidden_size"])
    timestep = torch.tensor(UNET_TIMESTEPS, dtype=torch.float32)
    torch.manual_seed(101)
    sample_b = torch.randn(1, 4, 16, 8)  # non-square latents: a 128x64 (HxW) image
    ehs_b = torch.randn(1, MAX_LENGTH, TINY_TEXT_CONFIG["hidden_size"])
    timestep_b = torch.tensor(UNET_TIMESTEPS_B, dtype=torch.float32)
    return sample, timestep, ehs, sample_b, timestep_b, ehs_b


def ref_unet(ref_dir: Path, unet) -> dict:
    sample, timestep, ehs, sample_b, timestep_b, ehs_b = unet_inputs()
    out = unet(sample, timestep, encoder_hidden_states=ehs).sample
    out_b = unet(sample_b, timestep_b, encoder_hidden_states=ehs_b).sample
    check_std("unet out", out)
    check_std("unet out_b", out_b)
    save_tensors(ref_dir / "unet.safetensors", {
        "sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "out": out,
        "sample_b": sample_b, "timestep_b": timestep_b, "encoder_hidden_states_b": ehs_b, "out_b": out_b,
    })
    return {"out": float(out.std()), "out_b": float(out_b.std())}


def ref_unet_fp16(ref_dir: Path, model_dir: Path) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    unet16 = UNet2DConditionModel.from_pretrained(
        # dtype= is diffusers 0.42's name for torch_dtype= (which still works but warns).
        model_dir, subfolder="unet", variant="fp16", dtype=torch.float32
    ).eval()
    assert all(p.dtype == torch.float32 for p in unet16.parameters())
    sample, timestep, ehs, *_ = unet_inputs()
    out = unet16(sample, timestep, encoder_hidden_states=ehs).sample
    save_tensors(ref_dir / "unet_fp16_weights.safetensors",
                 {"sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "out": out})
    return {"out": float(out.std())}


def ref_vae(ref_dir: Path, vae) -> dict:
    import torch

    torch.manual_seed(200)
    latents = torch.randn(2, 4, 8, 8)
    decoded = vae.decode(latents).sample  # raw decoder input, no 1/scaling_factor
    check_std("vae decoded", decoded)
    save_tensors(ref_dir / "vae.safetensors", {"latents": latents, "decoded": decoded})
    return {"decoded": float(decoded.std())}


def check_std(what: str, t) -> None:
    import torch

    s = float(t.std())
    if not (torch.isfinite(t).all() and 0.1 <= s <= 10.0):
        raise SystemExit(f"{what}: std {s} outside 0.1..10 (weights init needs adjusting)")


def load_pipeline(model_dir: Path, scheduler):
    """Load the saved folder (not the in-memory models) so the references are what the
    files on disk produce."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, scheduler=scheduler, dtype=torch.float32,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images_f32):
    """Exactly what diffusers' numpy_to_pil does."""
    return (images_f32 * 255).round().astype("uint8")


def run_pipeline(pipe, prompt, negative_prompt, seeds, steps):
    """Run the pipeline once, recording init latents, per-step noise predictions, latents
    and (for ancestral samplers) the noise drawn inside scheduler.step."""
    import numpy as np
    import torch

    rec = {"init": None, "latents": [], "t": [], "noise_pred": [], "step_noise": []}

    orig_prepare = pipe.prepare_latents

    def prepare_latents(*a, **kw):
        out = orig_prepare(*a, **kw)
        rec["init"] = out.clone()
        return out

    sched = pipe.scheduler
    orig_step = sched.step

    # functools.wraps matters: the pipeline inspects step's signature to decide whether to
    # pass `generator` and `eta`; a bare (*a, **kw) wrapper would silently drop them and
    # the ancestral noise would come from the global RNG instead of the generator.
    @functools.wraps(orig_step)
    def step(model_output, timestep, *a, **kw):
        rec["noise_pred"].append(model_output.clone())
        return orig_step(model_output, timestep, *a, **kw)

    sched_module = sys.modules[type(sched).__module__]
    orig_randn = getattr(sched_module, "randn_tensor", None)

    def randn_tensor(*a, **kw):
        out = orig_randn(*a, **kw)
        rec["step_noise"].append(out.clone())
        return out

    def on_step_end(_pipe, i, t, kwargs):
        rec["latents"].append(kwargs["latents"].clone())
        rec["t"].append(float(t))
        return {}

    pipe.prepare_latents = prepare_latents
    sched.step = step
    if orig_randn is not None:
        sched_module.randn_tensor = randn_tensor
    try:
        result = pipe(
            prompt,
            negative_prompt=negative_prompt,
            guidance_scale=GUIDANCE_SCALE,
            num_inference_steps=steps,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    finally:
        del pipe.prepare_latents
        del sched.step
        if orig_randn is not None:
            sched_module.randn_tensor = orig_randn

    timesteps = pipe.scheduler.timesteps.to(torch.float32)
    assert [float(x) for x in timesteps] == rec["t"], (timesteps, rec["t"])
    images = np.asarray(result.images, dtype=np.float32)

    # The instrumentation must not change anything: rerun bare (fresh scheduler state,
    # fresh generators) and require a bit-identical image.
    pipe.scheduler = type(sched).from_config(sched.config)
    plain = pipe(
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=GUIDANCE_SCALE,
        num_inference_steps=steps,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    if not np.array_equal(np.asarray(plain, dtype=np.float32), images):
        raise SystemExit(f"{type(sched).__name__}: instrumented run differs from a plain run")
    pipe.scheduler = sched
    return rec, timesteps, images


def ref_schedulers(ref_dir: Path, model_dir: Path) -> dict:
    import torch

    info = {}
    pipe = None
    for name, (cls, kwargs) in scheduler_classes().items():
        # from_pretrained on the folder: keys absent from the v1-4 file take the class defaults.
        sched = cls.from_pretrained(model_dir, subfolder="scheduler", **kwargs)
        if pipe is None:
            pipe = load_pipeline(model_dir, sched)
        else:
            pipe.scheduler = sched
        steps = SCHEDULER_STEPS_BY_NAME.get(name, SCHEDULER_STEPS)
        rec, timesteps, images = run_pipeline(pipe, ASTRONAUT_PROMPT, None, [SCHEDULER_SEED], steps)
        # prompt embeddings exactly as the pipeline computes them (cond, and uncond for "")
        cond, uncond = pipe.encode_prompt(ASTRONAUT_PROMPT, torch.device("cpu"), 1, True, None)
        tensors = {
            "timesteps": timesteps,
            "init_latents": rec["init"],
            "prompt_embeds": cond,
            "negative_prompt_embeds": uncond,
            "image_f32": torch.from_numpy(images),
            "image": torch.from_numpy(to_uint8(images)),
        }
        for i, (lat, npred) in enumerate(zip(rec["latents"], rec["noise_pred"])):
            tensors[f"latents_{i:03d}"] = lat
            tensors[f"noise_pred_{i:03d}"] = npred
        for i, noise in enumerate(rec["step_noise"]):
            tensors[f"step_noise_{i:03d}"] = noise
        assert len(rec["latents"]) == len(timesteps) == len(rec["noise_pred"])
        pix_std = float(to_uint8(images).astype("float64").std())
        if pix_std <= 5.0:
            raise SystemExit(f"scheduler {name}: image is (nearly) constant, pixel std {pix_std}")
        save_tensors(ref_dir / f"scheduler_{name}.safetensors", tensors)
        info[name] = {
            "class": cls.__name__,
            "config": {k: v for k, v in dict(sched.config).items() if not k.startswith("_")},
            "num_inference_steps": steps,
            "steps_iterated": len(timesteps),
            "step_noise_draws": len(rec["step_noise"]),
            "pixel_std": pix_std,
        }
    return info


CLIP_SKIP_NEGATIVE_PROMPT = "blurry, low quality"


def ref_clip_skip(ref_dir: Path, model_dir: Path) -> dict:
    """Clip skip as AUTOMATIC1111 and ComfyUI number it (c = 1: every layer; c = 2: the
    penultimate layer's output, diffusers' clip_skip=1), applied to the prompt and the negative
    prompt alike, then the final layer norm.

    Made from the text encoder's hidden states, not diffusers' `clip_skip` argument: that path of
    diffusers 0.42.1 raises AttributeError with transformers 5.x, and it would skip layers for the
    prompt only.

        clip_skip.safetensors: input_ids [2,77] (prompt, negative prompt); embeds_C [2,77,32] for
        C in 1..=layers; image_2 uint8 [1,64,64,3]: the pipeline on embeds_2 (PNDM).
    """
    import numpy as np
    import torch
    from diffusers import PNDMScheduler

    sched = PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = load_pipeline(model_dir, sched)
    te = pipe.text_encoder
    layers = te.config.num_hidden_layers
    ids = torch.tensor(tokenize(pipe.tokenizer, [ASTRONAUT_PROMPT, CLIP_SKIP_NEGATIVE_PROMPT]), dtype=torch.int64)
    tensors = {"input_ids": ids}
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        # hidden_states: the embeddings, then each layer's output (before the final layer norm).
        assert len(out.hidden_states) == layers + 1
        # transformers 4 nests the layers under `text_model`; 5 does not.
        final_layer_norm = getattr(te, "text_model", te).final_layer_norm
        for c in range(1, layers + 1):
            tensors[f"embeds_{c}"] = final_layer_norm(out.hidden_states[-c])
        # c = 1 is the plain path.
        if not torch.equal(tensors["embeds_1"], out.last_hidden_state):
            raise SystemExit("clip skip 1 differs from last_hidden_state")
    emb = tensors["embeds_2"]

    def run(prompt_embeds, negative_prompt_embeds):
        return pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=GUIDANCE_SCALE,
            num_inference_steps=SCHEDULER_STEPS,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=torch.Generator("cpu").manual_seed(SCHEDULER_SEED),
            output_type="np",
        ).images

    images = np.asarray(run(emb[0:1], emb[1:2]), dtype=np.float32)
    plain = np.asarray(run(tensors["embeds_1"][0:1], tensors["embeds_1"][1:2]), dtype=np.float32)
    skipped, unskipped = to_uint8(images), to_uint8(plain)
    if np.array_equal(skipped, unskipped):
        raise SystemExit("clip skip 2 gives the same image as no skip: the fixture tests nothing")
    pix_std = float(skipped.astype("float64").std())
    if pix_std <= 5.0:
        raise SystemExit(f"clip skip image is (nearly) constant, pixel std {pix_std}")
    tensors["image_2"] = torch.from_numpy(skipped)
    save_tensors(ref_dir / "clip_skip.safetensors", tensors)
    changed = float((skipped.astype("int16") - unskipped.astype("int16")).__abs__().mean())
    return {
        "prompt": ASTRONAUT_PROMPT,
        "negative_prompt": CLIP_SKIP_NEGATIVE_PROMPT,
        "layers": layers,
        "seed": SCHEDULER_SEED,
        "num_inference_steps": SCHEDULER_STEPS,
        "guidance_scale": GUIDANCE_SCALE,
        "size": IMAGE_SIZE,
        "scheduler": "pndm",
        "mean_abs_pixel_change_vs_no_skip": changed,
        "pixel_std": pix_std,
    }


GUIDANCE_RESCALE = 0.7


def ref_guidance_rescale(ref_dir: Path, model_dir: Path) -> dict:
    """diffusers' guidance_rescale (0.7) on the PNDM run of the scheduler references.

        guidance_rescale.safetensors: latents_NNN [1,4,8,8] after each step; image uint8 [1,64,64,3].
    """
    import numpy as np
    import torch
    from diffusers import PNDMScheduler

    sched = PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = load_pipeline(model_dir, sched)
    latents = []

    def on_step_end(_pipe, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return {}

    def run(rescale, callback=None):
        return pipe(
            ASTRONAUT_PROMPT,
            guidance_scale=GUIDANCE_SCALE,
            guidance_rescale=rescale,
            num_inference_steps=SCHEDULER_STEPS,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=torch.Generator("cpu").manual_seed(SCHEDULER_SEED),
            output_type="np",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images

    images = to_uint8(np.asarray(run(GUIDANCE_RESCALE, on_step_end), dtype=np.float32))
    plain = to_uint8(np.asarray(run(0.0), dtype=np.float32))
    if np.array_equal(images, plain):
        raise SystemExit("guidance_rescale changes nothing: the fixture tests nothing")
    tensors = {f"latents_{i:03d}": lat for i, lat in enumerate(latents)}
    tensors["image"] = torch.from_numpy(images)
    save_tensors(ref_dir / "guidance_rescale.safetensors", tensors)
    return {
        "prompt": ASTRONAUT_PROMPT,
        "guidance_rescale": GUIDANCE_RESCALE,
        "seed": SCHEDULER_SEED,
        "num_inference_steps": SCHEDULER_STEPS,
        "guidance_scale": GUIDANCE_SCALE,
        "size": IMAGE_SIZE,
        "scheduler": "pndm",
        "mean_abs_pixel_change_vs_off": float(np.abs(images.astype("int16") - plain.astype("int16")).mean()),
    }


# A long AUTOMATIC1111-syntax prompt (over two 75-token chunks: weights, nesting, an escape, a
# comma near the first chunk's end, BREAK) and a short negative one.
A1111_PROMPT = (
    "a (photo:1.3) of an astronaut riding a [horse] on the moon, ((highly detailed)), "
    "sharp focus, dramatic lighting, \\(film grain\\), 35mm lens, golden hour, volumetric fog, "
    "(intricate details:0.8), trending on artstation, octane render, cinematic composition, "
    "soft shadows, rim light, (bokeh:1.2), a red flag planted in grey dust, earth rising over "
    "the horizon, stars in a black sky, [[lens flare]], ultra wide angle, reflections on the "
    "visor, dust particles floating, long exposure, hyperrealistic, award winning photograph "
    "BREAK (oil painting:0.6), muted colours, a small (dog:1.4) beside the horse"
)
A1111_NEGATIVE = "(blurry:1.2), [low quality], watermark"
A1111_CLIP_SKIP = 2
A1111_COMMA_BACKTRACK = 20


def a1111_parse_prompt_attention(text):
    """AUTOMATIC1111's modules/prompt_parser.py parse_prompt_attention, transcribed."""
    import re

    re_attention = re.compile(
        r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
        re.X,
    )
    re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)
    res = []
    round_brackets = []
    square_brackets = []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def a1111_tokenize_line(tokenizer, line, embeddings=None):
    """A1111's FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line: chunks of (tokens,
    multipliers), each BOS + 75 + EOS, padded with EOS.

    `embeddings`: {trigger: ids of its vectors in an extended vocabulary}. As A1111's
    EmbeddingDatabase.find_embedding_at_position, a trigger is the token sequence of its name
    (`tokenizer` must be the plain one), the longest first; its vectors stand in its place (A1111
    writes them over placeholder tokens after the embedding lookup, the same as these ids) and
    move whole to the next chunk when they do not fit."""
    embeddings = embeddings or {}
    names = sorted(
        ((tokenizer(name, add_special_tokens=False)["input_ids"], ids) for name, ids in embeddings.items()),
        key=lambda e: -len(e[0]),
    )
    parsed = a1111_parse_prompt_attention(line)
    tokenized = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab()[",</w>"]
    length = 75
    chunks = []
    chunk = [[], []]
    last_comma = -1

    def next_chunk():
        nonlocal chunk, last_comma
        to_add = length - len(chunk[0])
        chunk[0] += [eos] * to_add
        chunk[1] += [1.0] * to_add
        chunks.append(([bos] + chunk[0] + [eos], [1.0] + chunk[1] + [1.0]))
        last_comma = -1
        chunk = [[], []]

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk[0])
            elif len(chunk[0]) == length and last_comma != -1 and len(chunk[0]) - last_comma <= A1111_COMMA_BACKTRACK:
                at = last_comma + 1
                moved = [chunk[0][at:], chunk[1][at:]]
                chunk = [chunk[0][:at], chunk[1][:at]]
                next_chunk()
                chunk = moved
            if len(chunk[0]) == length:
                next_chunk()
            found = next(((n, ids) for n, ids in names if tokens[position:position + len(n)] == n), None)
            if found is None:
                chunk[0].append(token)
                chunk[1].append(weight)
                position += 1
                continue
            name_tokens, ids = found
            if len(chunk[0]) + len(ids) > length:
                next_chunk()
            chunk[0] += ids
            chunk[1] += [weight] * len(ids)
            position += len(name_tokens)
    if chunk[0] or not chunks:
        next_chunk()
    return chunks


def ref_weighted_prompts(ref_dir: Path, model_dir: Path) -> dict:
    """AUTOMATIC1111's weighted, chunked conditioning on the real transformers CLIPTextModel, its
    arithmetic written out: each prompt's chunks (the negative padded with empty chunks to the
    prompt's count) encoded at clip skip 2, each token scaled by its weight, the chunk's mean
    restored (A1111's "Original" emphasis, on a batch of one prompt), chunks concatenated.

        weighted_prompts.safetensors: embeds [2, 77*k, hidden] (negative, prompt), weights [2, 77*k]
    """
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    te = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    final_layer_norm = getattr(te, "text_model", te).final_layer_norm
    lines = [A1111_NEGATIVE, A1111_PROMPT]
    chunked = [a1111_tokenize_line(tokenizer, line) for line in lines]
    k = max(len(c) for c in chunked)
    if len(chunked[1]) < 3:
        raise SystemExit(f"the long prompt makes {len(chunked[1])} chunks: the fixture should test 3")
    empty = ([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 76, [1.0] * 77)
    embeds, weights = [], []
    with torch.no_grad():
        for chunks in chunked:
            zs = []
            for i in range(k):
                tokens, mults = chunks[i] if i < len(chunks) else empty
                out = te(torch.tensor([tokens]), output_hidden_states=True)
                z = final_layer_norm(out.hidden_states[-A1111_CLIP_SKIP])
                original_mean = z.mean()
                z = z * torch.tensor(mults).reshape(1, -1, 1).expand(z.shape)
                z = z * (original_mean / z.mean())
                zs.append(z)
                weights.append(torch.tensor(mults))
            embeds.append(torch.hstack(zs))
    tensors = {"embeds": torch.cat(embeds), "weights": torch.cat(weights).reshape(2, -1)}
    save_tensors(ref_dir / "weighted_prompts.safetensors", tensors)
    return {
        "prompt": A1111_PROMPT,
        "negative_prompt": A1111_NEGATIVE,
        "clip_skip": A1111_CLIP_SKIP,
        "chunks": k,
        "prompt_tokens": sum(1 for c in chunked[1] for t in c[0][1:-1] if t != tokenizer.eos_token_id),
        "parsed": a1111_parse_prompt_attention(A1111_PROMPT),
    }


# Textual inversion: an A1111-layout file (2 vectors, triggered by its stem) and a diffusers-layout
# file (1 vector, triggered by the token it names), in a subfolder to exercise the folder walk.
TI_A1111_TOKEN = "tinyneg"
TI_A1111_FILE = f"{TI_A1111_TOKEN}.safetensors"
TI_DIFFUSERS_TOKEN = "<tiny-style>"
TI_DIFFUSERS_FILE = "style/learned_embeds.safetensors"
TI_PROMPT = f"a photo of {TI_DIFFUSERS_TOKEN} riding a horse"
TI_NEGATIVE = f"{TI_A1111_TOKEN}, blurry"
# Text-encoder prompts: both triggers, repeated, next to punctuation, and none at all.
TI_PROMPTS = [
    TI_PROMPT,
    TI_NEGATIVE,
    f"{TI_A1111_TOKEN} {TI_DIFFUSERS_TOKEN} and {TI_A1111_TOKEN}",
    ASTRONAUT_PROMPT,
]
TI_A1111_NEGATIVE = f"({TI_A1111_TOKEN}:1.2), [blurry]"


def ti_a1111_prompt(tokenizer) -> str:
    """An A1111-syntax prompt whose first `tinyneg` (2 vectors) comes after exactly 74 tokens of
    the first chunk: its vectors must move whole to the second chunk."""
    head = f"({TI_DIFFUSERS_TOKEN}:1.3) portrait of a cat, "
    # <tiny-style> takes one place (its one vector), then the words.
    head_tokens = 1 + len(tokenizer("portrait of a cat,", add_special_tokens=False)["input_ids"])
    filler = " ".join(["red"] * (74 - head_tokens))
    return f"{head}{filler} {TI_A1111_TOKEN} ({TI_A1111_TOKEN}:0.8) [dog]"


def ref_textual_inversion(out_dir: Path, ref_dir: Path, model_dir: Path) -> dict:
    """Textual-inversion embeddings loaded with diffusers' `load_textual_inversion` (the A1111
    file with token="tinyneg", as A1111 names it after the file), the diffusers file first so that
    the new ids are in the folder's path order, as sdbatch assigns them.

        embeddings/tinyneg.safetensors              {"emb_params": [2, hidden]}
        embeddings/style/learned_embeds.safetensors {"<tiny-style>": [hidden]}
        textual_inversion.safetensors: input_ids [4,77], embeds [4,77,hidden] (TI_PROMPTS);
          a1111_embeds [2, 77*k, hidden], a1111_weights [2, 77*k] (negative, prompt; clip skip 1);
          latents_NNN [1,4,8,8] after each step and image uint8 [1,64,64,3]: the pipeline (PNDM)
          on TI_PROMPT / TI_NEGATIVE.
    """
    import numpy as np
    import torch
    from diffusers import PNDMScheduler
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    emb_dir = out_dir / "embeddings"
    (emb_dir / "style").mkdir(parents=True)
    sched = PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = load_pipeline(model_dir, sched)
    table = pipe.text_encoder.get_input_embeddings().weight
    hidden = table.shape[1]
    # Vectors of the vocabulary's own scale, so they act like words.
    gen = torch.Generator().manual_seed(WEIGHT_SEED + 40)
    neg = torch.randn(2, hidden, generator=gen) * float(table.std())
    style = torch.randn(hidden, generator=gen) * float(table.std())
    save_file({"emb_params": neg.contiguous()}, str(emb_dir / TI_A1111_FILE))
    save_file({TI_DIFFUSERS_TOKEN: style.contiguous()}, str(emb_dir / TI_DIFFUSERS_FILE))

    # Without the embeddings, for the check that they change the image.
    _, _, plain_images = run_pipeline(pipe, TI_PROMPT, TI_NEGATIVE, [SCHEDULER_SEED], SCHEDULER_STEPS)
    vocab_size = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(emb_dir / TI_DIFFUSERS_FILE))
    pipe.load_textual_inversion(str(emb_dir / TI_A1111_FILE), token=TI_A1111_TOKEN)
    tok, te = pipe.tokenizer, pipe.text_encoder
    ids_of = {
        TI_DIFFUSERS_TOKEN: tok.convert_tokens_to_ids([TI_DIFFUSERS_TOKEN]),
        TI_A1111_TOKEN: tok.convert_tokens_to_ids([TI_A1111_TOKEN, f"{TI_A1111_TOKEN}_1"]),
    }
    if ids_of != {TI_DIFFUSERS_TOKEN: [vocab_size], TI_A1111_TOKEN: [vocab_size + 1, vocab_size + 2]}:
        raise SystemExit(f"unexpected textual-inversion ids {ids_of}")
    rows = te.get_input_embeddings().weight
    if not (torch.equal(rows[vocab_size], style) and torch.equal(rows[vocab_size + 1:vocab_size + 3], neg)):
        raise SystemExit("diffusers did not put the vectors where expected")

    # Plain prompts, as the pipeline's encode_prompt makes them (maybe_convert_prompt expands a
    # multi-vector trigger to `tinyneg tinyneg_1`).
    converted = [pipe.maybe_convert_prompt(p, tok) for p in TI_PROMPTS]
    ids = torch.tensor(tokenize(tok, converted), dtype=torch.int64)
    with torch.no_grad():
        embeds = te(ids).last_hidden_state
        cond, uncond = pipe.encode_prompt(TI_PROMPT, torch.device("cpu"), 1, True, TI_NEGATIVE)
    if not (torch.equal(cond, embeds[0:1]) and torch.equal(uncond, embeds[1:2])):
        raise SystemExit("encode_prompt differs from the text encoder on the converted prompts")

    # AUTOMATIC1111 syntax: the transcription of tokenize_line with its embedding matching, on the
    # plain tokenizer, the vectors taken through the extended text encoder by their ids.
    base_tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    a1111_prompt = ti_a1111_prompt(base_tok)
    chunked = [a1111_tokenize_line(base_tok, line, ids_of) for line in (TI_A1111_NEGATIVE, a1111_prompt)]
    first = chunked[1][0][0]
    if len(chunked[1]) != 2 or first[75] != tok.eos_token_id or first[74] == ids_of[TI_A1111_TOKEN][0]:
        raise SystemExit("the A1111 prompt should push tinyneg's two vectors whole into chunk 2")
    if chunked[1][1][0][1:3] != ids_of[TI_A1111_TOKEN]:
        raise SystemExit("chunk 2 should start with tinyneg's vectors")
    k = max(len(c) for c in chunked)
    empty = ([tok.bos_token_id] + [tok.eos_token_id] * 76, [1.0] * 77)
    a1111_embeds, a1111_weights = [], []
    with torch.no_grad():
        for chunks in chunked:
            zs = []
            for i in range(k):
                tokens, mults = chunks[i] if i < len(chunks) else empty
                z = te(torch.tensor([tokens])).last_hidden_state
                original_mean = z.mean()
                z = z * torch.tensor(mults).reshape(1, -1, 1).expand(z.shape)
                z = z * (original_mean / z.mean())
                zs.append(z)
                a1111_weights.append(torch.tensor(mults))
            a1111_embeds.append(torch.hstack(zs))

    rec, timesteps, images = run_pipeline(pipe, TI_PROMPT, TI_NEGATIVE, [SCHEDULER_SEED], SCHEDULER_STEPS)
    image, plain = to_uint8(images), to_uint8(plain_images)
    if np.array_equal(image, plain):
        raise SystemExit("the embeddings do not change the image: the fixture tests nothing")
    pix_std = float(image.astype("float64").std())
    if pix_std <= 5.0:
        raise SystemExit(f"textual-inversion image is (nearly) constant, pixel std {pix_std}")
    tensors = {
        "input_ids": ids,
        "embeds": embeds,
        "a1111_embeds": torch.cat(a1111_embeds),
        "a1111_weights": torch.cat(a1111_weights).reshape(2, -1),
        "image": torch.from_numpy(image),
    }
    tensors.update({f"latents_{i:03d}": lat for i, lat in enumerate(rec["latents"])})
    save_tensors(ref_dir / "textual_inversion.safetensors", tensors)
    return {
        "folder": "embeddings",
        "files": {TI_A1111_FILE: {"trigger": TI_A1111_TOKEN, "vectors": 2, "layout": "a1111"},
                  TI_DIFFUSERS_FILE: {"trigger": TI_DIFFUSERS_TOKEN, "vectors": 1, "layout": "diffusers"}},
        "ids": ids_of,
        "prompts": TI_PROMPTS,
        "converted_prompts": converted,
        "a1111_prompt": a1111_prompt,
        "a1111_negative_prompt": TI_A1111_NEGATIVE,
        "a1111_chunks": k,
        "prompt": TI_PROMPT,
        "negative_prompt": TI_NEGATIVE,
        "seed": SCHEDULER_SEED,
        "num_inference_steps": SCHEDULER_STEPS,
        "guidance_scale": GUIDANCE_SCALE,
        "size": IMAGE_SIZE,
        "scheduler": "pndm",
        "mean_abs_pixel_change_vs_without": float(np.abs(image.astype("int16") - plain.astype("int16")).mean()),
        "pixel_std": pix_std,
    }


def build_tiny_sd2(model_dir: Path, vocab, merges) -> None:
    """Writes tiny-sd2/ (see TINY_SD2_*) the way diffusers saves an SD 2.x pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(WEIGHT_SEED + 20)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD2_TEXT_CONFIG)).eval()
    unet = UNet2DConditionModel(**TINY_SD2_UNET_CONFIG).eval()
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    reinit_parameters(text_encoder, WEIGHT_SEED + 21)
    reinit_parameters(unet, WEIGHT_SEED + 22)
    reinit_parameters(vae, WEIGHT_SEED + 23)
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=SD2_PAD_TOKEN,
    )
    ids = tokenize(tokenizer, ["a photo of a cat"])[0]
    pad_id = vocab[SD2_PAD_TOKEN]
    assert ids == EXPECTED_CAT_IDS + [pad_id] * (MAX_LENGTH - len(EXPECTED_CAT_IDS)), ids[:12]
    scheduler = DDIMScheduler.from_config({k: v for k, v in SD2_SCHEDULER_CONFIG.items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    write_vocab_files(model_dir / "tokenizer", vocab, merges, pad_token=SD2_PAD_TOKEN)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SD2_SCHEDULER_CONFIG, indent=2) + "\n", encoding="utf-8"
    )
    # What Rust reads for the pad token must say "!" (transformers writes it in either file).
    special = model_dir / "tokenizer" / "special_tokens_map.json"
    config = json.loads((model_dir / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    named = json.loads(special.read_text(encoding="utf-8")) if special.is_file() else config
    pad = named.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    assert pad == SD2_PAD_TOKEN, (special, pad)


def ref_sd2(ref_dir: Path, model_dir: Path) -> dict:
    """SD 2.x end to end on tiny-sd2: the text encoder (gelu, "!" padding), and the pipeline
    with v-prediction under DDIM (the model's own scheduler), DPM++ 2M and Euler, guidance
    rescale 0.7 on the DDIM run.

        sd2.safetensors: input_ids [2,77] (prompt, negative), text_embeds [2,77,40];
        <sched>_latents_NNN [1,4,12,12] after each step and <sched>_image uint8 [1,96,96,3]
        for sched in ddim, dpmpp_2m, euler; ddim_rescaled_latents_NNN, ddim_rescaled_image.
    """
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ids = torch.tensor(tokenize(pipe.tokenizer, [ASTRONAUT_PROMPT, SD2_NEGATIVE_PROMPT]), dtype=torch.int64)
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
    tensors = {"input_ids": ids, "text_embeds": embeds}
    info = {"prompt": ASTRONAUT_PROMPT, "negative_prompt": SD2_NEGATIVE_PROMPT, "seed": SCHEDULER_SEED,
            "num_inference_steps": SD2_STEPS, "guidance_scale": GUIDANCE_SCALE, "size": SD2_SIZE, "runs": {}}
    runs = [
        ("ddim", DDIMScheduler, 0.0),
        ("ddim_rescaled", DDIMScheduler, 0.7),
        ("dpmpp_2m", DPMSolverMultistepScheduler, 0.0),
        ("euler", EulerDiscreteScheduler, 0.0),
    ]
    for name, cls, rescale in runs:
        pipe.scheduler = cls.from_pretrained(model_dir, subfolder="scheduler")
        assert pipe.scheduler.config.prediction_type == "v_prediction", name
        latents = []

        def on_step_end(_pipe, i, t, kwargs):
            latents.append(kwargs["latents"].clone())
            return {}

        images = pipe(
            ASTRONAUT_PROMPT,
            negative_prompt=SD2_NEGATIVE_PROMPT,
            guidance_scale=GUIDANCE_SCALE,
            guidance_rescale=rescale,
            num_inference_steps=SD2_STEPS,
            generator=torch.Generator("cpu").manual_seed(SCHEDULER_SEED),
            output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        images = to_uint8(np.asarray(images, dtype=np.float32))
        # No height/width given: the pipeline used the model's native size.
        assert images.shape == (1, SD2_SIZE, SD2_SIZE, 3), images.shape
        pix_std = float(images.astype("float64").std())
        if pix_std <= 5.0:
            raise SystemExit(f"sd2 {name}: image is (nearly) constant, pixel std {pix_std}")
        for i, lat in enumerate(latents):
            tensors[f"{name}_latents_{i:03d}"] = lat
        tensors[f"{name}_image"] = torch.from_numpy(images)
        info["runs"][name] = {"guidance_rescale": rescale, "steps": len(latents), "pixel_std": pix_std}
    save_tensors(ref_dir / "sd2.safetensors", tensors)
    return info


def ref_batch(ref_dir: Path, model_dir: Path) -> dict:
    import torch
    from diffusers import PNDMScheduler
    from PIL import Image

    sched = PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe = load_pipeline(model_dir, sched)
    rec, timesteps, images = run_pipeline(pipe, BATCH_PROMPTS, BATCH_NEGATIVE_PROMPTS, BATCH_SEEDS, BATCH_STEPS)
    images_u8 = to_uint8(images)
    for i, img in enumerate(images_u8):
        Image.fromarray(img).save(ref_dir / f"batch_{i}.png")
        if float(img.astype("float64").std()) <= 5.0:
            raise SystemExit(f"batch image {i} is (nearly) constant")
    save_tensors(ref_dir / "batch.safetensors", {
        "timesteps": timesteps,
        "init_latents": rec["init"],
        "images_f32": torch.from_numpy(images),
        "images": torch.from_numpy(images_u8),
    })
    return {"pixel_std": [float(im.astype("float64").std()) for im in images_u8]}


def write_meta(ref_dir: Path, extra: dict) -> None:
    import diffusers
    import numpy
    import safetensors
    import torch
    import transformers

    meta = {
        "generator": "scripts/make_fixtures.py",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": numpy.__version__,
            "python": sys.version.split()[0],
        },
        "device": "cpu",
        "dtype": "float32",
        "weight_seed": WEIGHT_SEED,
        "max_length": MAX_LENGTH,
        "tiny_configs": {
            "text_encoder": TINY_TEXT_CONFIG,
            "unet": TINY_UNET_CONFIG,
            "vae": TINY_VAE_CONFIG,
        },
        "vae_scaling_factor": 0.18215,
        "scheduler_config_file": SCHEDULER_CONFIG,
        "text_encoder": {"prompts": TEXT_ENCODER_PROMPTS, "attention_mask": None},
        "unet": {
            "timestep": UNET_TIMESTEPS, "sample_shape": [2, 4, 8, 8],
            "timestep_b": UNET_TIMESTEPS_B, "sample_b_shape": [1, 4, 16, 8],
            "fp16_variant_loaded_as": "float32",
        },
        "vae": {"latents_shape": [2, 4, 8, 8], "scaling_factor_applied": False},
        "schedulers": {
            "names": SCHEDULER_NAMES,
            "prompt": ASTRONAUT_PROMPT,
            "negative_prompt": None,
            "guidance_scale": GUIDANCE_SCALE,
            "num_inference_steps": SCHEDULER_STEPS,
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
            "seeds": [SCHEDULER_SEED],
            "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
            "eta": 0.0,
            "output": "image = (np_output*255).round().astype(uint8)",
        },
        "batch": {
            "scheduler": "pndm",
            "prompts": BATCH_PROMPTS,
            "negative_prompts": BATCH_NEGATIVE_PROMPTS,
            "seeds": BATCH_SEEDS,
            "guidance_scale": GUIDANCE_SCALE,
            "num_inference_steps": BATCH_STEPS,
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
        },
    }
    meta.update(extra)
    # Strict JSON (no Infinity/NaN literals, e.g. DPM-Solver's lambda_min_clipped = -inf): the
    # Rust tests parse this file with serde_json.
    (ref_dir / "meta.json").write_text(
        json.dumps(_strict_json(meta), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )


def print_summary(out_dir: Path, stds: dict) -> None:
    from safetensors import safe_open

    ref_dir = out_dir / "reference"
    print()
    print(f"{'file':<34} {'tensor':<24} {'dtype':<8} shape")
    print("-" * 90)
    for f in sorted(ref_dir.iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as h:
                keys = sorted(h.keys())
                shown = [k for k in keys if not k[-3:].isdigit() or k.endswith("_000")]
                for k in shown:
                    sl = h.get_slice(k)
                    print(f"{f.name:<34} {k:<24} {sl.get_dtype():<8} {list(sl.get_shape())}")
                hidden = len(keys) - len(shown)
                if hidden:
                    print(f"{f.name:<34} {'(+ ' + str(hidden) + ' more _NNN)':<24}")
        else:
            print(f"{f.name:<34} ({f.stat().st_size} bytes)")
    print("-" * 90)
    for k, v in stds.items():
        print(f"std {k}: {v}")
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"total size of {out_dir}: {total / 1e6:.1f} MB")


# --------------------------------------------------------------------------------------
# Safety checker, CLIP image preprocessing, CLIP score
# (made after every reference above, each with its own seed: the files above never depend on them)
# --------------------------------------------------------------------------------------

TINY_VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=4,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
TINY_PROJECTION_DIM = 16
# CLIPImageProcessor for a 32-px tower; OpenAI mean/std, bicubic and 1/255 are the class defaults.
TINY_PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
SAFETY_WEIGHT_SEED = 10
CLIP_WEIGHT_SEED = 20
SYNTHETIC_IMAGE_SEED = 30
# Every unrounded checker score stays this far from the decision boundary, so float noise between
# implementations cannot flip a decision.
SAFETY_MARGIN = 0.002
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# name -> (preprocessor_config.json, (height, width) of the input image)
PREPROCESS_CASES = [
    # The legacy format of CompVis/stable-diffusion-v1-4/feature_extractor (ints, no do_rescale keys),
    # at 56 px instead of 224 to keep the files small: 128 -> 56 is the 512 -> 224 ratio.
    ("legacy_56_square_down", "legacy", (128, 128)),
    ("legacy_56_portrait_up", "legacy", (40, 24)),
    ("legacy_56_landscape_down", "legacy", (100, 150)),
    # Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    # pixels as the width (python-pillow/Pillow#9549): 150x60 -> 140x56 is such a case.
    ("legacy_56_tall_down", "legacy", (150, 60)),
    ("bilinear_pad", "bilinear_pad", (40, 64)),
    # Exact size, no crop: height down, width up (vertical pass first again).
    ("exact_no_crop", "exact_no_crop", (60, 30)),
]
PREPROCESS_CONFIGS = {
    "legacy": {
        "crop_size": 56, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "resample": 3, "size": 56,
    },
    # Bilinear, and a crop larger than the resized image in one direction (numpy zero padding).
    "bilinear_pad": {
        "crop_size": {"height": 32, "width": 28}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
        "image_processor_type": "CLIPImageProcessor", "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 24},
    },
    "exact_no_crop": {
        "do_center_crop": False, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "image_processor_type": "CLIPImageProcessor", "resample": 3,
        "size": {"height": 24, "width": 40},
    },
}

CLIP_SCORE_PROMPTS = {
    "batch_0": BATCH_PROMPTS[0],
    "batch_1": BATCH_PROMPTS[1],
    "batch_2": BATCH_PROMPTS[2],
    "scheduler_pndm": ASTRONAUT_PROMPT,
    "scheduler_euler_ancestral": "an astronaut on horseback, digital art",
    "solid_red": "a plain red square",
    "gradient": "a smooth colour gradient",
    "noise": ", ".join(["colourful static noise"] * 30),  # > 77 tokens: truncated
    "checkerboard": "a black and white checkerboard",
    "solid_gray": "",
}


def synthetic_image(rng, height: int, width: int):
    """A uint8 RGB image with gradients, edges and noise (every resampling tap matters)."""
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     ((xx // 5 + yy // 7) % 2) * 200 + 20], -1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def checker_images(ref_dir: Path):
    """(name, uint8 [64,64,3]) for the safety checker and CLIP score references: pipeline outputs
    recorded above plus synthetic images."""
    import numpy as np
    from safetensors.torch import load_file

    out = []
    batch = load_file(str(ref_dir / "batch.safetensors"))["images"].numpy()
    out += [(f"batch_{i}", batch[i]) for i in range(len(batch))]
    for name in ("pndm", "euler_ancestral"):
        out.append((f"scheduler_{name}", load_file(str(ref_dir / f"scheduler_{name}.safetensors"))["image"][0].numpy()))
    rng = np.random.default_rng(SYNTHETIC_IMAGE_SEED)
    s = IMAGE_SIZE
    yy, xx = np.mgrid[0:s, 0:s]
    out.append(("solid_red", np.broadcast_to(np.array([200, 30, 30], np.uint8), (s, s, 3)).copy()))
    out.append(("gradient", np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)))
    out.append(("noise", rng.integers(0, 256, (s, s, 3), dtype=np.uint8)))
    out.append(("checkerboard", np.repeat(((xx // 8 + yy // 8) % 2 * 255).astype(np.uint8)[..., None], 3, -1)))
    out.append(("solid_gray", np.full((s, s, 3), 128, np.uint8)))
    assert [n for n, _ in out] == list(CLIP_SCORE_PROMPTS)
    return out


def load_image_processor(config: dict):
    """CLIPImageProcessor.from_pretrained on a folder holding `config`, as diffusers loads it."""
    import tempfile

    from transformers import CLIPImageProcessor

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        proc = CLIPImageProcessor.from_pretrained(tmp)
    check_pil_backend(proc)
    return proc


def check_pil_backend(proc) -> None:
    # sdbatch mirrors the PIL backend (PIL resampling on uint8). With torchvision installed
    # transformers would pick its torchvision backend instead, and these references would change.
    if getattr(proc, "backend", None) != "pil":
        raise SystemExit(f"CLIPImageProcessor backend is {getattr(proc, 'backend', None)!r}, expected 'pil'")


def ref_clip_preprocess(ref_dir: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(SYNTHETIC_IMAGE_SEED + 1)
    tensors, cases = {}, []
    for k, (name, cfg_name, (h, w)) in enumerate(PREPROCESS_CASES):
        cfg = PREPROCESS_CONFIGS[cfg_name]
        image = synthetic_image(rng, h, w)
        pv = load_image_processor(cfg)(Image.fromarray(image), return_tensors="pt").pixel_values[0]
        tensors[f"image_{k}"] = torch.from_numpy(image)
        tensors[f"pixel_values_{k}"] = pv
        cases.append({"name": name, "config": cfg, "image": f"image_{k}", "pixel_values": f"pixel_values_{k}",
                      "input_hw": [h, w], "output_chw": list(pv.shape)})
    save_tensors(ref_dir / "clip_preprocess.safetensors", tensors)
    (ref_dir / "clip_preprocess.json").write_text(
        json.dumps({"backend": "pil", "cases": cases}, indent=2) + "\n", encoding="utf-8")
    return {"clip_preprocess cases": [c["name"] for c in cases]}


def safety_scores(cos, sp, concept_w, special_w):
    """StableDiffusionSafetyChecker.forward's per-image loop, verbatim (float32 numpy with Python
    float thresholds; `adjustment` turns 0.01 inside the special-care loop)."""
    out = []
    for i in range(cos.shape[0]):
        adjustment = 0.0
        special, concept, special_care = [], [], False
        for j in range(sp.shape[1]):
            score = round(sp[i][j] - float(special_w[j]) + adjustment, 3)
            special.append(score)
            if score > 0:
                special_care = True
                adjustment = 0.01
        for j in range(cos.shape[1]):
            concept.append(round(cos[i][j] - float(concept_w[j]) + adjustment, 3))
        out.append({"special_scores": special, "concept_scores": concept, "special_care": special_care,
                    "nsfw": any(c > 0 for c in concept)})
    return out


def safety_margins_ok(cos, sp, concept_w, special_w, margin: float) -> bool:
    """Every unrounded score, with the adjustment its image really gets, keeps `margin` from the
    decision boundary (round(s, 3) > 0 <=> s > 0.0005)."""
    for i in range(cos.shape[0]):
        adjustment = 0.0
        for j in range(sp.shape[1]):
            s = float(sp[i][j]) - float(special_w[j]) + adjustment
            if abs(s - 0.0005) < margin:
                return False
            if s > 0.0005:
                adjustment = 0.01
        for j in range(cos.shape[1]):
            if abs(float(cos[i][j]) - float(concept_w[j]) + adjustment - 0.0005) < margin:
                return False
    return True


def design_safety_concepts(checker, embeds) -> dict:
    """Sets the checker's concept / special-care embeddings and thresholds from the reference
    images' embeddings so that the batch gets every kind of decision:
      - about half flagged through one concept ("direct"),
      - image s flagged only through the +0.01 adjustment of a special-care hit; s's special-care
        concept 1 is a hit only through the adjustment set inside that same loop,
      - image s2 with a special-care hit but not flagged,
      - the rest clean; every score SAFETY_MARGIN away from the boundary.
    The embeddings of s / s2 are their own normalised image embeddings (cosine 1 for them, well
    below for the others, which must all be < 0.9 alike)."""
    import numpy as np
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    en = torch.nn.functional.normalize(embeds)
    sim = (en @ en.T).numpy()
    n = en.shape[0]
    distinct = [i for i in range(n) if max(sim[i, k] for k in range(n) if k != i) < 0.9]
    base_concepts = checker.concept_embeds.detach().clone()
    base_special = checker.special_care_embeds.detach().clone()
    cos0 = cosine_distance(embeds, base_concepts).numpy()
    for m in range(n // 2 - 1, 1, -1):
        for jstar in range(2, cos0.shape[1]):
            order = np.argsort(-cos0[:, jstar])
            hi, lo = cos0[order[m - 1], jstar], cos0[order[m], jstar]
            if hi - lo < 0.03:
                continue
            direct = {int(x) for x in order[:m]}
            for s in (i for i in distinct if i not in direct):
                for s2 in (i for i in distinct if i not in direct and i != s):
                    concepts, special = base_concepts.clone(), base_special.clone()
                    special[0] = en[s]
                    special[1] = en[s]
                    special[2] = en[s2]
                    concepts[1] = en[s]
                    sp = cosine_distance(embeds, special).numpy()
                    cos = cosine_distance(embeds, concepts).numpy()
                    special_w = np.array([sp[s, 0] - 0.05, sp[s, 1] + 0.005, sp[s2, 2] - 0.05], np.float32)
                    concept_w = np.array([cos[:, j].max() + 0.02 + 0.01 * (j % 3) for j in range(cos.shape[1])],
                                         np.float32)
                    concept_w[jstar] = 0.5 * (hi + lo)
                    concept_w[1] = cos[s, 1] + 0.005
                    if not safety_margins_ok(cos, sp, concept_w, special_w, SAFETY_MARGIN):
                        continue
                    res = safety_scores(cos, sp, concept_w, special_w)
                    flagged = {i for i in range(n) if res[i]["nsfw"]}
                    without_adjustment = safety_scores(cos, sp * 0 - 1, concept_w, special_w)
                    if flagged != direct | {s} or without_adjustment[s]["nsfw"]:
                        continue
                    if not res[s2]["special_care"] or res[s2]["nsfw"] or res[s]["special_scores"][1] <= 0:
                        continue
                    with torch.no_grad():
                        checker.concept_embeds.copy_(concepts)
                        checker.special_care_embeds.copy_(special)
                        checker.concept_embeds_weights.copy_(torch.from_numpy(concept_w))
                        checker.special_care_embeds_weights.copy_(torch.from_numpy(special_w))
                    return {"flagged_directly": sorted(direct), "flagged_by_adjustment": s,
                            "special_care_not_flagged": s2, "direct_concept": jstar, "adjustment_concept": 1,
                            "margin": SAFETY_MARGIN}
    raise SystemExit("safety checker fixture: no thresholds give a mixed batch; change SAFETY_WEIGHT_SEED")


def check_saved_weights(folder: Path, model, stem: str = "model") -> None:
    """The saved fp32/fp16 files hold exactly the model's state dict."""
    import torch
    from safetensors.torch import load_file

    sd = model.state_dict()
    for suffix, dtype in ((".safetensors", torch.float32), (".fp16.safetensors", torch.float16)):
        path = folder / f"{stem}{suffix}"
        if not path.is_file():
            continue
        saved = load_file(str(path))
        if set(saved) != set(sd):
            raise SystemExit(f"{path}: saved keys differ: {sorted(set(saved) ^ set(sd))[:5]}")
        for k, v in sd.items():
            assert saved[k].dtype == dtype and torch.equal(saved[k], v.to(dtype)), (path, k)


def ref_safety_checker(model_dir: Path, ref_dir: Path, images) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor

    names = [n for n, _ in images]
    u8 = np.stack([im for _, im in images])
    pil = [Image.fromarray(im) for im in u8]

    torch.manual_seed(SAFETY_WEIGHT_SEED)
    config = CLIPConfig(text_config=dict(TINY_TEXT_CONFIG), vision_config=dict(TINY_VISION_CONFIG),
                        projection_dim=TINY_PROJECTION_DIM)
    checker = StableDiffusionSafetyChecker(config).eval()
    reinit_parameters(checker, SAFETY_WEIGHT_SEED + 1)
    processor = CLIPImageProcessor(**TINY_PROCESSOR)
    check_pil_backend(processor)
    embeds = checker.visual_projection(checker.vision_model(processor(pil, return_tensors="pt").pixel_values)[1])
    design = design_safety_concepts(checker, embeds)

    checker.save_pretrained(model_dir / "safety_checker", safe_serialization=True)
    save_fp16_variant(checker, model_dir / "safety_checker")
    check_saved_weights(model_dir / "safety_checker", checker)
    processor.save_pretrained(model_dir / "feature_extractor")
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["requires_safety_checker"] = True
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # Everything below from the files on disk, through the pipeline exactly as diffusers runs it.
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker), type(pipe.safety_checker)
    check_pil_backend(pipe.feature_extractor)
    images_f32 = u8.astype(np.float32) / 255.0  # what output_type="np" gives; numpy_to_pil rounds back
    fe_input = pipe.image_processor.numpy_to_pil(images_f32)
    assert all(np.array_equal(np.asarray(p), im) for p, im in zip(fe_input, u8))
    pixel_values = pipe.feature_extractor(fe_input, return_tensors="pt").pixel_values
    sc = pipe.safety_checker
    pooled = sc.vision_model(pixel_values)[1]
    image_embeds = sc.visual_projection(pooled)
    special_cos = cosine_distance(image_embeds, sc.special_care_embeds)
    cos = cosine_distance(image_embeds, sc.concept_embeds)
    _, flags = sc(clip_input=pixel_values, images=images_f32.copy())
    _, flags_pipe = pipe.run_safety_checker(images_f32.copy(), torch.device("cpu"), torch.float32)
    res = safety_scores(cos.numpy(), special_cos.numpy(), sc.concept_embeds_weights.numpy(),
                        sc.special_care_embeds_weights.numpy())
    assert list(flags) == list(flags_pipe) == [r["nsfw"] for r in res], (flags, flags_pipe)
    expected = set(design["flagged_directly"]) | {design["flagged_by_adjustment"]}
    assert {i for i, f in enumerate(flags) if f} == expected, (flags, design)

    save_tensors(ref_dir / "safety.safetensors", {
        "images": torch.from_numpy(u8),
        "pixel_values": pixel_values,
        "pooled_output": pooled,
        "image_embeds": image_embeds,
        "special_cos_dist": special_cos,
        "cos_dist": cos,
        "special_scores": torch.tensor([r["special_scores"] for r in res], dtype=torch.float32),
        "concept_scores": torch.tensor([r["concept_scores"] for r in res], dtype=torch.float32),
        "has_nsfw_concepts": torch.tensor([bool(f) for f in flags], dtype=torch.uint8),
    })
    names_of = lambda idx: [names[i] for i in idx]
    info = {
        "images": names,
        "has_nsfw_concepts": [bool(f) for f in flags],
        "special_care": [r["special_care"] for r in res],
        "flagged_directly": names_of(design["flagged_directly"]),
        "flagged_by_adjustment": names[design["flagged_by_adjustment"]],
        "special_care_not_flagged": names[design["special_care_not_flagged"]],
        "design": design,
        "concept_embeds_weights": sc.concept_embeds_weights.tolist(),
        "special_care_embeds_weights": sc.special_care_embeds_weights.tolist(),
        "feature_extractor": TINY_PROCESSOR,
        "vision_config": TINY_VISION_CONFIG,
        "projection_dim": TINY_PROJECTION_DIM,
    }
    (ref_dir / "safety.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {"safety flags": [int(f) for f in flags]}


def ref_clip_score(out_dir: Path, ref_dir: Path, tokenizer, vocab, merges, images) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    clip_dir = out_dir / "tiny-clip"
    if clip_dir.exists():
        shutil.rmtree(clip_dir)
    torch.manual_seed(CLIP_WEIGHT_SEED)
    config = CLIPConfig(text_config=dict(TINY_TEXT_CONFIG),
                        vision_config=dict(TINY_VISION_CONFIG, hidden_act="gelu"),
                        projection_dim=TINY_PROJECTION_DIM)
    model = CLIPModel(config).eval()
    reinit_parameters(model, CLIP_WEIGHT_SEED + 1)
    model.save_pretrained(clip_dir, safe_serialization=True)
    check_saved_weights(clip_dir, model)
    write_vocab_files(clip_dir, vocab, merges)
    CLIPImageProcessor(**TINY_PROCESSOR).save_pretrained(clip_dir)

    model = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    check_pil_backend(processor)
    names = [n for n, _ in images]
    prompts = [CLIP_SCORE_PROMPTS[n] for n in names]
    pixel_values = processor([Image.fromarray(im) for _, im in images], return_tensors="pt").pixel_values
    input_ids = torch.tensor(tokenize(tokenizer, prompts), dtype=torch.int64)
    text_embeds = model.get_text_features(input_ids=input_ids).pooler_output
    image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
    # torchmetrics tokenizes with padding=True and an attention mask; with the causal mask and the
    # first-EOS pooling that is the same as max-length padding without a mask.
    padded = tokenizer(prompts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    alt = model.get_text_features(input_ids=padded.input_ids, attention_mask=padded.attention_mask).pooler_output
    assert torch.allclose(alt, text_embeds, atol=1e-5), (alt - text_embeds).abs().max()
    tn = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    im = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    cosine = (tn * im).sum(dim=-1)
    score_raw = 100 * cosine
    score = score_raw.clamp(min=0)
    save_tensors(ref_dir / "clip_score.safetensors", {
        "input_ids": input_ids, "text_embeds": text_embeds, "image_embeds": image_embeds,
        "text_embeds_norm": tn, "image_embeds_norm": im, "cosine": cosine, "score_raw": score_raw, "score": score,
    })
    info = {
        "images": names,
        "prompts": prompts,
        "eos_token_id": model.config.text_config.eos_token_id,
        "logit_scale": float(model.logit_scale),
        "score_raw": score_raw.tolist(),
        "score": score.tolist(),
        "formula": "score = max(100 * cos(text_embeds, image_embeds), 0) (torchmetrics CLIPScore)",
    }
    (ref_dir / "clip_score.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if not (score_raw.min() < 0 < score_raw.max()):
        print(f"note: CLIP scores are not of mixed sign: {score_raw.tolist()}")
    return {"clip score_raw": [round(float(x), 3) for x in score_raw]}


def make_checker_fixtures(out_dir: Path, model_dir: Path, ref_dir: Path, tokenizer, vocab, merges) -> dict:
    info = {}
    info.update(ref_clip_preprocess(ref_dir))
    images = checker_images(ref_dir)
    info.update(ref_safety_checker(model_dir, ref_dir, images))
    info.update(ref_clip_score(out_dir, ref_dir, tokenizer, vocab, merges, images))
    return info


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Single-file checkpoints in the original CompVis/LDM layout (single-file/), written from the
# tiny diffusers folders with our own diffusers -> LDM key mapping (the inverse of what sdbatch's
# src/pipeline/single_file.rs reads), then loaded back with diffusers' from_single_file and checked
# tensor for tensor against the folders.

LDM_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
LDM_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class _KeyMover:
    """Moves tensors from a diffusers state dict to LDM names; every key must be moved once."""

    def __init__(self, state: dict):
        self.left = dict(state)
        self.out = {}

    def move(self, src: str, dst: str, rename=None, transform=None) -> None:
        keys = [k for k in self.left if k.startswith(src + ".")]
        assert keys, f"no keys under {src}"
        for k in keys:
            rest = k[len(src) + 1 :]
            if rename is not None:
                module, _, param = rest.rpartition(".")
                rest = f"{rename.get(module, module)}.{param}"
            value = self.left.pop(k)
            self.out[f"{dst}.{rest}"] = transform(rest, value) if transform else value

    def done(self) -> dict:
        assert not self.left, f"unmapped keys: {sorted(self.left)[:5]}"
        return self.out


def unet_to_ldm(state: dict, config: dict) -> dict:
    m = _KeyMover(state)
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    m.move("time_embedding.linear_1", "time_embed.0")
    m.move("time_embedding.linear_2", "time_embed.2")
    m.move("conv_in", "input_blocks.0.0")
    m.move("conv_norm_out", "out.0")
    m.move("conv_out", "out.2")
    idx = 1
    for i in range(n):
        for j in range(lpb):
            m.move(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", LDM_RESNET_NAMES)
            if down_attn[i]:
                m.move(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1")
            idx += 1
        if i < n - 1:
            m.move(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op")
            idx += 1
    m.move("mid_block.resnets.0", "middle_block.0", LDM_RESNET_NAMES)
    m.move("mid_block.attentions.0", "middle_block.1")
    m.move("mid_block.resnets.1", "middle_block.2", LDM_RESNET_NAMES)
    idx = 0
    for u in range(n):
        for j in range(lpb + 1):
            m.move(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{idx}.0", LDM_RESNET_NAMES)
            if up_attn[u]:
                m.move(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{idx}.1")
            if j == lpb and u < n - 1:
                m.move(f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if up_attn[u] else 1}.conv")
            idx += 1
    return m.done()


def vae_to_ldm(state: dict, config: dict) -> dict:
    m = _KeyMover(state)
    n = len(config["block_out_channels"])
    vae_resnet = {"conv_shortcut": "nin_shortcut"}

    def attention_conv(rest, value):  # LDM's mid attention projections are 1x1 convs
        return value[:, :, None, None] if value.dim() == 2 else value

    for half in ("encoder", "decoder"):
        m.move(f"{half}.conv_in", f"{half}.conv_in")
        m.move(f"{half}.conv_out", f"{half}.conv_out")
        m.move(f"{half}.conv_norm_out", f"{half}.norm_out")
        m.move(f"{half}.mid_block.resnets.0", f"{half}.mid.block_1", vae_resnet)
        m.move(f"{half}.mid_block.resnets.1", f"{half}.mid.block_2", vae_resnet)
        m.move(f"{half}.mid_block.attentions.0", f"{half}.mid.attn_1", LDM_VAE_ATTENTION_NAMES, attention_conv)
    for level in range(n):
        for j in range(config["layers_per_block"]):
            m.move(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", vae_resnet)
        if level < n - 1:
            m.move(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv")
    for u in range(n):
        level = n - 1 - u  # LDM numbers the decoder levels from the highest resolution
        for j in range(config["layers_per_block"] + 1):
            m.move(f"decoder.up_blocks.{u}.resnets.{j}", f"decoder.up.{level}.block.{j}", vae_resnet)
        if u < n - 1:
            m.move(f"decoder.up_blocks.{u}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    m.move("quant_conv", "quant_conv")
    m.move("post_quant_conv", "post_quant_conv")
    return m.done()


def clip_to_ldm(state: dict) -> dict:
    """SD 1.x: transformers' CLIPTextModel names under cond_stage_model.transformer.text_model."""
    import torch

    out = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}
    # Real SD 1.x checkpoints carry the position_ids buffer; readers must ignore it.
    out["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


def clip_to_open_clip(state: dict, config: dict, seed: int) -> dict:
    """SD 2.x: OpenCLIP names, q/k/v fused into in_proj, plus one more final resblock (random), a
    text_projection and logit_scale — what the full tower in an SD 2.x checkpoint has and
    diffusers drops (it keeps the penultimate layer's output)."""
    import torch

    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    m = _KeyMover(s)
    m.move("embeddings.token_embedding", "token_embedding")
    m.out["positional_embedding"] = m.left.pop("embeddings.position_embedding.weight")
    m.move("final_layer_norm", "ln_final")
    layers = config["num_hidden_layers"]
    for i in range(layers):
        src, dst = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        for p in ("weight", "bias"):
            m.out[f"{dst}.attn.in_proj_{p}"] = torch.cat(
                [m.left.pop(f"{src}.self_attn.{x}_proj.{p}") for x in "qkv"], 0
            )
        m.move(f"{src}.self_attn.out_proj", f"{dst}.attn.out_proj")
        m.move(f"{src}.layer_norm1", f"{dst}.ln_1")
        m.move(f"{src}.layer_norm2", f"{dst}.ln_2")
        m.move(f"{src}.mlp.fc1", f"{dst}.mlp.c_fc")
        m.move(f"{src}.mlp.fc2", f"{dst}.mlp.c_proj")
    out = m.done()
    g = torch.Generator().manual_seed(seed)
    last = f"transformer.resblocks.{layers}"
    for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        v = out[k]
        out[last + k[len("transformer.resblocks.0") :]] = torch.randn(v.shape, generator=g) * 0.1
    d = config["hidden_size"]
    out["text_projection"] = torch.randn((d, d), generator=g)
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v.contiguous() for k, v in state.items()}


def check_single_file(path: Path, model_dir: Path, pipeline: str = "StableDiffusionPipeline") -> None:
    """pipeline.from_single_file(path, config=model_dir) must give the folder's tensors exactly."""
    import diffusers
    import torch

    cls = getattr(diffusers, pipeline)
    folder = cls.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    single = cls.from_single_file(
        str(path), config=str(model_dir), local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(folder, name).state_dict()
        got = getattr(single, name).state_dict()
        assert set(want) == set(got), (path, name, set(want) ^ set(got))
        for k, v in want.items():
            assert torch.equal(v, got[k]), f"{path}: {name}.{k} differs after from_single_file"
    assert single.scheduler.config.prediction_type == folder.scheduler.config.prediction_type


def make_single_file(out_dir: Path, sd1_dir: Path, sd2_dir: Path, inpaint_dir: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    target = out_dir / "single-file"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    info = {}
    # The inpainting one (9-channel conv_in, the stable-diffusion-inpainting layout) goes through
    # diffusers' inpainting pipeline, whose from_single_file is what such checkpoints are for.
    models = (
        ("tiny-sd", sd1_dir, False, "StableDiffusionPipeline"),
        ("tiny-sd2", sd2_dir, True, "StableDiffusionPipeline"),
        ("tiny-sd-inpaint", inpaint_dir, False, "StableDiffusionInpaintPipeline"),
    )
    for name, model_dir, sd2, pipeline in models:
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
        vae = AutoencoderKL.from_pretrained(model_dir / "vae")
        text = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
        ckpt = _prefixed("model.diffusion_model.", unet_to_ldm(unet.state_dict(), dict(unet.config)))
        ckpt.update(_prefixed("first_stage_model.", vae_to_ldm(vae.state_dict(), dict(vae.config))))
        if sd2:
            tower = clip_to_open_clip(text.state_dict(), text.config.to_dict(), WEIGHT_SEED + 30)
            ckpt.update(_prefixed("cond_stage_model.model.", tower))
        else:
            ckpt.update(_prefixed("cond_stage_model.transformer.", clip_to_ldm(text.state_dict())))
            # EMA copies (LDM names them without dots) must be ignored by every reader.
            for k in sorted(ckpt)[:4]:
                ema = "model_ema." + k.removeprefix("model.").replace(".", "")
                ckpt[ema] = ckpt[k].clone() + 1.0
            ckpt["model_ema.decay"] = torch.tensor(0.9999)
        path = target / f"{name}.safetensors"
        save_file(ckpt, str(path))
        check_single_file(path, model_dir, pipeline)
        info[name] = {"file": f"single-file/{name}.safetensors", "tensors": len(ckpt), "config": name}
        print(f"single-file: {path.name} ({len(ckpt)} tensors) loads back identically with from_single_file")
    return info


def make_tiny(out_dir: Path) -> None:
    import torch

    t0 = time.time()
    model_dir = out_dir / "tiny-sd"
    ref_dir = out_dir / "reference"
    emb_dir = out_dir / "embeddings"
    owned = (model_dir, ref_dir, emb_dir, out_dir / "loras", out_dir / "img2img", out_dir / "inpaint", out_dir / "tiny-sd-inpaint")
    for d in owned:  # only the folders this script owns
        if d.exists():
            shutil.rmtree(d)
    ref_dir.mkdir(parents=True)

    vocab, merges = build_clip_vocab()
    tokenizer = build_tokenizer(vocab, merges)
    text_encoder, unet, vae = build_tiny_models()
    save_model_folder(model_dir, text_encoder, unet, vae, tokenizer, vocab, merges)
    check_model_folder(model_dir, text_encoder, unet, vae)

    # The saved tokenizer folder must tokenize exactly like the in-memory one.
    from transformers import CLIPTokenizer

    reloaded = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    corpus = build_corpus()
    assert tokenize(reloaded, corpus) == tokenize(tokenizer, corpus), "tokenizer folder round trip differs"

    stds = {}
    tok_info = ref_tokens(ref_dir, tokenizer)
    ref_text_encoder(ref_dir, tokenizer, text_encoder)
    stds.update({f"unet {k}": v for k, v in ref_unet(ref_dir, unet).items()})
    stds.update({f"unet_fp16_weights {k}": v for k, v in ref_unet_fp16(ref_dir, model_dir).items()})
    stds.update({f"vae {k}": v for k, v in ref_vae(ref_dir, vae).items()})
    sched_info = ref_schedulers(ref_dir, model_dir)
    batch_info = ref_batch(ref_dir, model_dir)
    clip_skip_info = ref_clip_skip(ref_dir, model_dir)
    rescale_info = ref_guidance_rescale(ref_dir, model_dir)
    weighted_info = ref_weighted_prompts(ref_dir, model_dir)
    lora_info = fixtures_lora.ref_lora(ref_dir, model_dir, out_dir / "loras", sys.modules[__name__])
    img2img_info = fixtures_img2img.ref_img2img(out_dir, ref_dir, model_dir, sys.modules[__name__])
    hires_info = fixtures_img2img.ref_hires(ref_dir, model_dir, sys.modules[__name__])
    hires_latent_info = fixtures_img2img.ref_hires_latent(ref_dir, model_dir, sys.modules[__name__])
    # After img2img: reuses its init image.
    inpaint_info = fixtures_inpaint.ref_inpaint(out_dir, ref_dir, model_dir, sys.modules[__name__])
    mask_blur_info = fixtures_inpaint.ref_mask_blur(out_dir, ref_dir, model_dir, sys.modules[__name__])
    mask_crop_info = fixtures_inpaint.ref_mask_crop(out_dir, ref_dir, model_dir, sys.modules[__name__])
    ti_info = ref_textual_inversion(out_dir, ref_dir, model_dir)
    sd2_dir = out_dir / "tiny-sd2"
    build_tiny_sd2(sd2_dir, vocab, merges)
    sd2_info = ref_sd2(ref_dir, sd2_dir)
    make_single_file(out_dir, model_dir, sd2_dir, out_dir / "tiny-sd-inpaint")
    write_meta(
        ref_dir,
        {
            "tokens": tok_info,
            "scheduler_runs": sched_info,
            "batch_result": batch_info,
            "clip_skip": clip_skip_info,
            "guidance_rescale": rescale_info,
            "weighted_prompts": weighted_info,
            "textual_inversion": ti_info,
            "sd2": sd2_info,
            "lora": lora_info,
            "img2img": img2img_info,
            "hires": hires_info,
            "hires_latent": hires_latent_info,
            "inpaint": inpaint_info,
            "mask_blur": mask_blur_info,
            "mask_crop": mask_crop_info,
        },
    )
    stds.update(make_checker_fixtures(out_dir, model_dir, ref_dir, tokenizer, vocab, merges))
    for name, i in sched_info.items():
        stds[f"scheduler_{name} image pixels (0..255)"] = i["pixel_std"]
    stds["batch image pixels (0..255)"] = batch_info["pixel_std"]
    print_summary(out_dir, stds)
    print(f"done in {time.time() - t0:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} threads)")


def make_full_size(out_dir: Path) -> None:
    """Random full-size SD v1-4: fp16 variant weights + configs + tokenizer + scheduler.

    Models are built one at a time in float32 with default init and immediately cast to
    float16 in place, so peak memory is about one fp32 UNet (3.4 GB) plus the fp16 rest.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab()
    tokenizer = build_tokenizer(vocab, merges)

    torch.manual_seed(WEIGHT_SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(**FULL_TEXT_CONFIG)).eval().half()
    print(f"text_encoder built ({time.time() - t0:.0f} s)", flush=True)
    unet = UNet2DConditionModel(**FULL_UNET_CONFIG).eval().half()
    print(f"unet built ({time.time() - t0:.0f} s)", flush=True)
    vae = AutoencoderKL(**FULL_VAE_CONFIG).eval().half()
    print(f"vae built ({time.time() - t0:.0f} s)", flush=True)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=pndm_from_dict(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True, variant="fp16")
    write_vocab_files(out_dir / "tokenizer", vocab, merges)
    write_scheduler_config(out_dir / "scheduler")
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in
                (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))}
    print(f"parameters: {n_params}")
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"wrote {out_dir} ({total / 1e9:.2f} GB) in {time.time() - t0:.1f} s")


def make_full_size_single_file(out_dir: Path) -> None:
    """Random full-size SD 1.x and SD 2.1-768-v as single-file fp16 checkpoints in the LDM
    layout (out/sd1.safetensors, out/sd2.safetensors, written with this script's own
    diffusers -> LDM mapping) plus, for diffusers' `from_single_file(..., config=...)`, their
    diffusers config folders without weights (out/sd1/, out/sd2/). No references: compare with
    scripts/compare_single_file.py.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab()
    models = (
        ("sd1", FULL_TEXT_CONFIG, FULL_UNET_CONFIG, "<|endoftext|>", False),
        ("sd2", FULL_SD2_TEXT_CONFIG, FULL_SD2_UNET_CONFIG, SD2_PAD_TOKEN, True),
    )
    for name, text_config, unet_config, pad, sd2 in models:
        torch.manual_seed(WEIGHT_SEED + (40 if sd2 else 0))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval().half()
        unet = UNet2DConditionModel(**unet_config).eval().half()
        vae = AutoencoderKL(**FULL_VAE_CONFIG).eval().half()
        print(f"{name}: models built ({time.time() - t0:.0f} s)", flush=True)
        tokenizer = CLIPTokenizer(
            vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH,
            bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad,
        )
        if sd2:
            config = {k: v for k, v in SD2_SCHEDULER_CONFIG.items() if not k.startswith("_")}
            scheduler = DDIMScheduler.from_config(config)
        else:
            scheduler = pndm_from_dict()
        folder = out_dir / name
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
        for weights in folder.rglob("*.safetensors"):  # configs only: the weights are the single file
            weights.unlink()
        write_vocab_files(folder / "tokenizer", vocab, merges, pad_token=pad)
        if sd2:
            (folder / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(SD2_SCHEDULER_CONFIG, indent=2) + "\n", encoding="utf-8"
            )
        else:
            write_scheduler_config(folder / "scheduler")
        ckpt = _prefixed("model.diffusion_model.", unet_to_ldm(unet.state_dict(), dict(unet.config)))
        ckpt.update(_prefixed("first_stage_model.", vae_to_ldm(vae.state_dict(), dict(vae.config))))
        if sd2:
            tower = clip_to_open_clip(text_encoder.state_dict(), text_encoder.config.to_dict(), WEIGHT_SEED + 41)
            ckpt.update(_prefixed("cond_stage_model.model.", {k: v.half() for k, v in tower.items()}))
        else:
            ckpt.update(_prefixed("cond_stage_model.transformer.", clip_to_ldm(text_encoder.state_dict())))
        path = out_dir / f"{name}.safetensors"
        save_file(ckpt, str(path))
        print(f"{name}: wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {len(ckpt)} tensors) "
              f"and {folder}/ ({time.time() - t0:.0f} s)", flush=True)
        del pipe, text_encoder, unet, vae, ckpt


def _strict_json(value):
    """Replaces non-finite floats by the strings "inf", "-inf", "nan" so the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--full-size", action="store_true",
                    help="write random full-size SD v1-4 fp16 weights to --out (required), no references")
    ap.add_argument("--single-file", action="store_true",
                    help="with --full-size: random full-size SD 1.x and 2.x as single-file LDM checkpoints "
                         "plus their config folders (see scripts/compare_single_file.py)")
    args = ap.parse_args(argv)

    import diffusers.utils.logging
    import torch
    import transformers.utils.logging

    # Progress bars ("Loading weights", "Writing model shards") only clutter the log.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    # Deterministic CPU float32 everywhere; no autograd.
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)

    if args.full_size:
        if args.out is None:
            ap.error("--full-size needs an explicit --out (it writes ~2 GB)")
        if args.single_file:
            make_full_size_single_file(args.out)
        else:
            make_full_size(args.out)
    else:
        make_tiny(args.out or DEFAULT_OUT)


if __name__ == "__main__":
    main()
