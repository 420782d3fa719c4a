#!/usr/bin/env python3
"""Compiles a Stable Diffusion UNet (and VAE decoder) ahead of time with AOTInductor.

Run by `sdbatch compile` (which resolves the weight files, hashes them and passes everything
here); not meant to be called by hand. Writes to --out:

  unet.pt2            the UNet: (sample [B,C,H,W], timesteps [B] float32, context [B,T,D]) -> eps
  vae_decoder.pt2     the VAE decoder: latents / scaling_factor [B,C,H,W] -> image [B,3,8H,8W]
  sdbatch-compiled.json  what the packages were compiled for (read by sdbatch before loading)

Both packages take a dynamic batch dimension (--min-batch..--max-batch); the spatial size and the
context length are fixed. The model is built with diffusers' classes from the config and loaded
from exactly the files sdbatch reads, so the compiled model is the model sdbatch runs eagerly.
diffusers is needed here, at compile time only: the packages are self-contained (weights inside)
and sdbatch loads them through libtorch without Python.
"""
import argparse
import json
import os
import time

import torch
from safetensors.torch import load_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UNetCall(torch.nn.Module):
    """The UNet's positional call, returning the prediction tensor alone."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timesteps, context):
        return self.unet(sample, timesteps, context, return_dict=False)[0]


class DecoderCall(torch.nn.Module):
    """post_quant_conv + decoder, as sdbatch's VaeDecoder::decode (latents already unscaled)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


def load(cls, config_path, weights_path, dtype, device):
    with open(config_path) as f:
        config = json.load(f)
    model = cls.from_config(config)
    state = load_file(weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Buffers diffusers recomputes are not in the files; real weights must all be there.
    if missing:
        raise SystemExit(f"{weights_path}: missing tensors, e.g. {sorted(missing)[:3]}")
    if unexpected:
        print(f"compile: {weights_path}: {len(unexpected)} unused tensors, e.g. {sorted(unexpected)[:3]}")
    return model.to(device=device, dtype=dtype).eval()


def package(module, example, dynamic_shapes, path):
    started = time.time()
    with torch.no_grad():
        exported = torch.export.export(module, example, dynamic_shapes=dynamic_shapes)
        torch._inductor.aoti_compile_and_package(exported, package_path=path)
    return time.time() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet-config", required=True)
    ap.add_argument("--unet-weights", required=True)
    ap.add_argument("--vae-config", required=True)
    ap.add_argument("--vae-weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--latent-height", type=int, required=True)
    ap.add_argument("--latent-width", type=int, required=True)
    ap.add_argument("--context-tokens", type=int, default=77)
    ap.add_argument("--min-batch", type=int, default=1, help="UNet batch (images x 2 with guidance)")
    ap.add_argument("--max-batch", type=int, required=True)
    ap.add_argument("--vae-max-batch", type=int, required=True)
    ap.add_argument("--no-vae", action="store_true", help="compile the UNet only")
    ap.add_argument("--model-sha256", required=True, help="computed by sdbatch over the four files")
    ap.add_argument("--gpu-name", default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from diffusers import AutoencoderKL, UNet2DConditionModel

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    timings = {}

    unet = load(UNet2DConditionModel, args.unet_config, args.unet_weights, dtype, device)
    ch = unet.config.in_channels
    dim = unet.config.cross_attention_dim
    h, w, tokens = args.latent_height, args.latent_width, args.context_tokens
    # Example inputs of batch 2: export specialises dimensions of size 0 and 1.
    example = (
        torch.randn(2, ch, h, w, device=device, dtype=dtype),
        torch.full((2,), 500.0, device=device, dtype=torch.float32),
        torch.randn(2, tokens, dim, device=device, dtype=dtype),
    )
    batch = torch.export.Dim("batch", min=args.min_batch, max=args.max_batch)
    dynamic = {"sample": {0: batch}, "timesteps": {0: batch}, "context": {0: batch}}
    timings["unet_s"] = package(UNetCall(unet), example, dynamic, os.path.join(args.out, "unet.pt2"))
    print(f"compile: unet.pt2 in {timings['unet_s']:.1f} s", flush=True)
    del unet

    vae_entry = None
    if not args.no_vae:
        vae = load(AutoencoderKL, args.vae_config, args.vae_weights, dtype, device)
        # The decoder needs no encoder: drop it so its weights stay out of the package.
        vae.encoder = None
        vae.quant_conv = None
        lat = vae.config.latent_channels
        z = torch.randn(2, lat, h, w, device=device, dtype=dtype)
        vbatch = torch.export.Dim("batch", min=1, max=args.vae_max_batch)
        timings["vae_decoder_s"] = package(
            DecoderCall(vae), (z,), {"z": {0: vbatch}}, os.path.join(args.out, "vae_decoder.pt2")
        )
        print(f"compile: vae_decoder.pt2 in {timings['vae_decoder_s']:.1f} s", flush=True)
        vae_entry = {
            "file": "vae_decoder.pt2",
            "min_batch": 1,
            "max_batch": args.vae_max_batch,
            "latent_channels": lat,
        }

    meta = {
        "format": 1,
        "torch_version": torch.__version__.split("+")[0],
        "device": "cuda" if device.type == "cuda" else "cpu",
        "gpu_name": args.gpu_name,
        "dtype": args.dtype,
        "model_sha256": args.model_sha256,
        "latent_height": h,
        "latent_width": w,
        "unet": {
            "file": "unet.pt2",
            "min_batch": args.min_batch,
            "max_batch": args.max_batch,
            "in_channels": ch,
            "context_tokens": tokens,
            "context_dim": dim,
        },
        "vae_decoder": vae_entry,
        "compile_seconds": timings,
    }
    with open(os.path.join(args.out, "sdbatch-compiled.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
