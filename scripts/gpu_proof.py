"""The Python half of scripts/gpu-proof.sh: a random SD v1-4-architecture model folder, the
diffusers reference images on it, the comparison with sdbatch's images, and the summary table.

  python scripts/gpu_proof.py model DIR [--tiny]
  python scripts/gpu_proof.py reference MODEL PROMPTS.jsonl OUT_DIR --steps N --size S [--device D]
  python scripts/gpu_proof.py compare REF_DIR OURS_DIR OUT.json
  python scripts/gpu_proof.py messages PROMPTS.jsonl OUT.jsonl --steps N --size S
  python scripts/gpu_proof.py worker REPORT.json STORE_DIR IMAGES_DIR REF_DIR OUT.json
  python scripts/gpu_proof.py summary WORK_DIR OUT.json

No model hub is reachable on a GPU machine, so the weights are random; speed does not depend on
their values, and equality with diffusers holds for any weights. The tokenizer is the real CLIP
one, built from the BPE file the sdbatch binary embeds (data/clip), so prompts tokenize as SD v1-4's.
"""
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BPE = ROOT / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"

# SD v1-4's published configs (unet/, vae/, text_encoder/ config.json) and its scheduler.
FULL_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 center_input_sample=False, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
                 mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
                 sample_size=64, up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
FULL_VAE = dict(act_fn="silu", block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, in_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
                up_block_types=("UpDecoderBlock2D",) * 4)
FULL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768)
# The same architecture families, small enough for a CPU run in CI.
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                 out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=32)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=32)
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None}
GUIDANCE = 7.5


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab():
    """(vocab, merges) as CLIP's SimpleTokenizer builds them from its BPE file."""
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    tokens = bytes_to_unicode()
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def make_model(out: Path, tiny: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.time()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else FULL_UNET)).eval()
    vae = AutoencoderKL(**(TINY_VAE if tiny else FULL_VAE)).eval()
    text = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else FULL_TEXT))).eval()
    # As the anchor benchmark does: halve the matrices so random activations stay finite in fp16.
    with torch.no_grad():
        for m in (unet, vae, text):
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        m.save_pretrained(out / name, safe_serialization=True)
        half = m.to(torch.float16)
        half.save_pretrained(out / f"{name}-fp16", safe_serialization=True, variant="fp16")
        for w in (out / f"{name}-fp16").glob("*.fp16.safetensors"):
            w.rename(out / name / w.name)
        for leftover in (out / f"{name}-fp16").iterdir():
            leftover.unlink()
        (out / f"{name}-fp16").rmdir()
    # transformers records the dtype of the last save in config.json; the folder's is float32.
    cfg_path = out / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    PNDMScheduler.from_config({k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    vocab, merges = clip_vocab()
    tok = out / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (tok / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2) + "\n")
    print(f"model: {'tiny' if tiny else 'full-size SD v1-4'} random weights in {out} ({time.time() - t0:.1f} s)")


def reference(model: Path, prompts: Path, out: Path, steps: int, size: int, device: str) -> None:
    """diffusers' images for every line of PROMPTS (prompt, seed), one seeded CPU generator per
    image as sdbatch draws its noise, fp16 on CUDA and fp32 on the CPU as sdbatch's defaults."""
    import numpy as np
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77,
                              bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                              unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    variant = "fp16" if dtype == torch.float16 else None
    scheduler = PNDMScheduler.from_config({k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline.from_pretrained(
        model, tokenizer=tokenizer, scheduler=scheduler, dtype=dtype, variant=variant,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    lines = [json.loads(l) for l in prompts.read_text().splitlines() if l.strip()]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = pipe([l["prompt"] for l in lines], guidance_scale=GUIDANCE, num_inference_steps=steps,
                  height=size, width=size, output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(l["seed"]) for l in lines])
    for i, img in enumerate(result.images):
        Image.fromarray((np.asarray(img) * 255).round().astype("uint8")).save(out / f"{i}.png")
    print(f"reference: {len(lines)} diffusers image(s) on {device} in {time.time() - t0:.1f} s")


def compare(ref: Path, ours: Path, out: Path) -> dict:
    import numpy as np
    from PIL import Image

    rows = []
    for r in sorted(ref.glob("*.png"), key=lambda p: int(p.stem)):
        a = np.asarray(Image.open(r).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(ours / r.name).convert("RGB"), dtype=np.int16)
        d = np.abs(a - b)
        rows.append(dict(image=r.name, max_diff=int(d.max()), within_1=float((d <= 1).mean()),
                         mean_diff=float(d.mean())))
    if not rows:
        raise SystemExit(f"no reference images in {ref}")
    summary = dict(images=len(rows), worst_max_diff=max(r["max_diff"] for r in rows),
                   worst_within_1=min(r["within_1"] for r in rows), rows=rows)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"compare: {len(rows)} image(s), worst max diff {summary['worst_max_diff']}, "
          f"worst share within 1 level {summary['worst_within_1']:.4%}")
    return summary


def messages(prompts: Path, out: Path, steps: int, size: int) -> None:
    """The prompts as batch messages: consecutive lines of one prompt with consecutive seeds make
    one item (its seed the first, `num_images` the count), so image i of the messages, in order,
    is line i of PROMPTS."""
    lines = [json.loads(l) for l in prompts.read_text().splitlines() if l.strip()]
    groups = []
    for line in lines:
        last = groups[-1] if groups else None
        if last and last["prompt"] == line["prompt"] and last["seed"] + last["num_images"] == line["seed"]:
            last["num_images"] += 1
        else:
            groups.append(dict(prompt=line["prompt"], seed=line["seed"], num_images=1))
    with out.open("w") as f:
        for k, g in enumerate(groups):
            f.write(json.dumps({
                "schema_version": 1, "batch_id": f"proof-{k}",
                "items": [dict(id="item", **g)],
                "params": {"steps": steps, "guidance_scale": GUIDANCE, "width": size, "height": size,
                           "scheduler": "pndm"},
            }) + "\n")
    print(f"messages: {len(lines)} image(s) in {len(groups)} message(s)")


def worker(report_path: Path, store: Path, images: Path, ref: Path, out: Path) -> None:
    """Checks a `sdbatch worker --messages` run (every message completed), puts its stored images
    in message order under IMAGES, compares them with the reference images."""
    import shutil

    report = json.loads(report_path.read_text())
    bad = [m for m in report["messages"] if m.get("outcome") != "acked"]
    if bad:
        raise SystemExit(f"worker: messages not completed: {bad}")
    completed = {e["body"]["batch_id"]: e["body"] for e in report["events"]
                 if e["routing_key"] == "batch.completed"}
    images.mkdir(parents=True, exist_ok=True)
    i = 0
    for k in range(len(report["messages"])):
        for record in sorted(completed[f"proof-{k}"]["images"], key=lambda r: r["n"]):
            shutil.copy(store / record["bucket"] / record["key"], images / f"{i}.png")
            i += 1
    result = compare(ref, images, out)
    result.update(messages=len(report["messages"]), completed=len(completed), images=i)
    out.write_text(json.dumps(result, indent=1) + "\n")


def summary(work: Path, out: Path) -> None:
    """One table from the parts' JSON files, and all of them in OUT."""
    def load(name):
        p = work / name
        return json.loads(p.read_text()) if p.is_file() else None

    bench, anchor, equal = load("bench.json"), load("anchor.json"), load("compare.json")
    worker_run = load("worker.json")
    timings = load("timings.json") or {}
    lines = ["", "gpu-proof summary", "-" * 78]
    lines.append(f"{'batch':>5} | {'sdbatch eager img/s':>19} | {'compiled img/s':>14} | "
                 f"{'diffusers img/s':>15} | {'peak GiB':>8}")
    anchor_by_batch = {}
    if anchor:
        for row in anchor.get("rows", []):
            if row.get("label") == "sdpa":
                anchor_by_batch[row["batch"]] = row.get("img_per_s_50")
    compiled = {r["batch_size"]: r for r in (bench or {}).get("compiled", [])}
    for row in (bench or {}).get("rows", []):
        b = row["batch_size"]
        c = compiled.get(b, {}).get("images_per_s")
        a = anchor_by_batch.get(b)
        peak = row.get("peak_memory_gib")
        lines.append(f"{b:>5} | {row['images_per_s']:>19.3f} | "
                     f"{(f'{c:.3f}' if c else 'n/a'):>14} | {(f'{a:.3f}' if a else 'n/a'):>15} | "
                     f"{(f'{peak:.2f}' if peak else 'n/a'):>8}")
    if bench:
        lines.append(f"load: {bench.get('load_s', float('nan')):.2f} s")
        # CUDA only: the worker's memory model (calibrated on the two smallest sizes) vs the peaks.
        for m in bench.get("memory_model", []):
            lines.append(f"memory model, batch {m['batch_size']}: predicted {m['predicted_gib']:.2f} GiB, "
                         f"measured {m['measured_gib']:.2f} GiB ({m['error']:+.1%})")
    if equal:
        lines.append(f"images vs diffusers: {equal['images']} image(s), worst max diff "
                     f"{equal['worst_max_diff']}, worst share within 1 level {equal['worst_within_1']:.4%}")
    if worker_run:
        lines.append(f"worker without a broker: {worker_run['completed']} of {worker_run['messages']} "
                     f"message(s) completed, {worker_run['images']} image(s) vs diffusers: worst max diff "
                     f"{worker_run['worst_max_diff']}, worst share within 1 level "
                     f"{worker_run['worst_within_1']:.4%}")
    for k, v in timings.items():
        lines.append(f"{k}: {v} s")
    notes_file = work / "notes.txt"
    notes = notes_file.read_text().splitlines() if notes_file.is_file() else []
    lines.extend(f"note: {n}" for n in notes)
    text = "\n".join(lines)
    print(text)
    out.write_text(json.dumps(dict(bench=bench, anchor=anchor, compare=equal, worker=worker_run,
                                   timings=timings, notes=notes), indent=1) + "\n")


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, rest = argv[1], argv[2:]
    flag = lambda name, default=None: rest[rest.index(name) + 1] if name in rest else default
    if cmd == "model":
        make_model(Path(rest[0]), "--tiny" in rest)
    elif cmd == "reference":
        reference(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(flag("--steps")), int(flag("--size")),
                  flag("--device", "cpu"))
    elif cmd == "compare":
        compare(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    elif cmd == "messages":
        messages(Path(rest[0]), Path(rest[1]), int(flag("--steps")), int(flag("--size")))
    elif cmd == "worker":
        worker(Path(rest[0]), Path(rest[1]), Path(rest[2]), Path(rest[3]), Path(rest[4]))
    elif cmd == "summary":
        summary(Path(rest[0]), Path(rest[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
