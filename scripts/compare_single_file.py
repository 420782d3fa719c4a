"""Full-size single-file checkpoints on the CPU: diffusers' from_single_file against
`sdbatch generate` on the same file.

    python scripts/make_fixtures.py --full-size --single-file --out DIR   # random SD 1.x and 2.x
    python scripts/compare_single_file.py --dir DIR --sdbatch PATH/TO/sdbatch [--size 256] [--steps 4]

diffusers loads each checkpoint with `config=DIR/<model>` (the configs of the random model, no
weights); sdbatch loads it with nothing but the file: its configs are inferred from the tensors'
shapes, its tokenizer is the built-in CLIP BPE (EOS padding for SD 1.x, "!" for SD 2.x) and its
scheduler the built-in default of the family (SD v1-4's PNDM, SD 2.1's v-prediction DDIM). Each side runs in its own process; the table gives the pixel
agreement and each side's peak RSS (from wait4). A development check, not part of the test suite
(it needs ~6 GB of random weights and several minutes of CPU).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry"
SEED = 1234
GUIDANCE = 7.5
MODELS = {"sd1": "pndm", "sd2": "ddim"}


def diffusers_child(ckpt: str, config: str, size: int, steps: int, out: str) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    torch.set_grad_enabled(False)
    pipe = StableDiffusionPipeline.from_single_file(
        ckpt, config=config, local_files_only=True, torch_dtype=torch.float32,
        safety_checker=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, num_inference_steps=steps,
        height=size, width=size, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images
    pixels = (np.asarray(images[0], dtype=np.float32) * 255).round().astype("uint8")
    Image.fromarray(pixels).save(out)


def run(cmd: list[str], env=None) -> tuple[float, int]:
    """Runs `cmd`; returns (seconds, peak RSS in MiB) of that process alone."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]}... failed with {p.returncode}")
    return time.time() - t0, usage.ru_maxrss // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--sdbatch", type=Path, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        ckpt, config, size, steps, out = args.child
        diffusers_child(ckpt, config, int(size), int(steps), out)
        return

    import numpy as np
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text(json.dumps({"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "id": "x"}) + "\n")
        for name, scheduler in MODELS.items():
            ckpt, folder = args.dir / f"{name}.safetensors", args.dir / name
            ref = tmp / f"{name}-diffusers.png"
            d_secs, d_rss = run([sys.executable, __file__, "--dir", str(args.dir), "--sdbatch", str(args.sdbatch),
                                 "--child", str(ckpt), str(folder), str(args.size), str(args.steps), str(ref)])
            out = tmp / f"{name}-sdbatch"
            s_secs, s_rss = run([
                str(args.sdbatch), "generate", "--model", str(ckpt),
                "--prompts", str(prompts), "--out", str(out), "--steps", str(args.steps),
                "--guidance", str(GUIDANCE), "--scheduler", scheduler, "--width", str(args.size),
                "--height", str(args.size), "--device", "cpu", "--dtype", "fp32",
            ])
            a = np.asarray(Image.open(ref).convert("RGB"), dtype=np.int16)
            b = np.asarray(Image.open(out / "x.png").convert("RGB"), dtype=np.int16)
            diff = np.abs(a - b)
            rows.append((name, scheduler, int(diff.max()), float((diff <= 1).mean() * 100), bool((diff == 0).all()),
                         float(a.std()), d_secs, d_rss, s_secs, s_rss, ckpt.stat().st_size / 1e9))
    print(f"\n{args.size}x{args.size}, {args.steps} steps, guidance {GUIDANCE}, CPU float32, random weights")
    print("| model | scheduler | checkpoint GB | max pixel diff | within 1 level | identical | pixel std "
          "| diffusers s | diffusers peak RSS MiB | sdbatch s | sdbatch peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, sch, mx, within, same, std, ds, dr, ss, sr, gb in rows:
        print(f"| {n} | {sch} | {gb:.2f} | {mx} | {within:.3f} % | {same} | {std:.1f} | {ds:.0f} | {dr} | {ss:.0f} | {sr} |")


if __name__ == "__main__":
    main()
