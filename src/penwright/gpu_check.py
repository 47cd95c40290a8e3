"""``penwright check gpu``: what penwright's real ``train`` path does on a GPU, in one command (< 8 minutes).

Every case runs ``train.train`` on a synthetic prepared corpus (random phrases repeated, so the
loss has something to learn; GPT-2's 50257-token vocabulary; random-init weights in the real
shapes: nothing comes from the hub) and records what it measured, or why it could not run:

* ``gpt2`` (124M), block 1024: bf16-mixed, bf16-mixed with ``train.compile=true``, fp16-mixed
  (``trainer=gpu_fp16``): tokens/s, MFU against the card's bf16 peak, peak GPU memory, loss finite
  and falling;
* ``gpt2-medium`` and ``gpt2-large``: peak memory at one micro-batch with and without gradient
  checkpointing, and the micro-batch ``train.auto_batch_size`` (Lightning's finder) picks;
* LoRA (``train.lora``) on ``gpt2-large`` and ``gpt2-xl`` bases (random weights in the real shapes, saved
  with ``save_pretrained``), bf16 and fp16: peak memory at one micro-batch and the finder's micro-batch;
* ``trainer=fsdp`` on one GPU (the strategy runs);
* ``transformers`` generate on the GPU at batch 1 and 16;
* penwright's engine on the exported fused graph with ``provider="cuda"`` (the padded runner, its keys and
  values on the GPU), where onnxruntime-gpu is installed: greedy tokens equal to the CPU engine's, and
  tokens/s at batch 1 and 16 (skipped, saying so, where onnxruntime has no CUDA provider);
* the device, driver, torch, CUDA, Lightning and transformers versions.

``--dry`` runs the same cases with tiny shapes on the CPU (CI runs it, so the check cannot rot);
the GPU-only cases (compile, FSDP) say so, and the fp16 case runs in bf16 there (Lightning has no
fp16 autocast on the CPU). Results: ``<out>/check.json`` and ``<out>/check.md``.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np

from penwright.core.atomic import atomic_write_text
from penwright.core.log import get_logger

VOCAB = 50257
# (n_layer, n_head, n_embd) of the GPT-2 family; the dry run's stand-ins are tiny
SHAPES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
DRY_SHAPES = {"gpt2": (2, 2, 64), "gpt2-medium": (2, 2, 96), "gpt2-large": (3, 2, 128), "gpt2-xl": (3, 2, 160)}
# dense bf16 tensor-core peak, FLOP/s (the vendors' datasheets; fp16 for cards without bf16)
PEAKS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


log = get_logger("check").info


SHAPE_124M = SHAPES["gpt2"]


def random_gpt2(shape: tuple[int, int, int] = SHAPE_124M, seed: int = 0, vocab: int = 50257, context: int = 1024):
    """GPT-2 with random weights (seeded): ``shape`` = (n_layer, n_head, n_embd), by default GPT-2's vocabulary
    (50257) and context (1024). The default shape is GPT-2 124M's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd = shape
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=context)
    ).eval()


def synthetic_prepared(root: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """A prepared corpus as ``prepare`` writes it: 256 random 32-token phrases in random order (learnable),
    a word-level tokenizer of ``vocab`` entries (t0 t1 ...; the last is <|endoftext|>), meta.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(seed)
    phrases = rng.integers(1, vocab - 1, size=(256, 32))
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", tokens), ("val", max(tokens // 20, 4096))):
        stream = phrases[rng.integers(0, len(phrases), size=n // 32 + 1)].reshape(-1)[:n].astype(np.uint16)
        stream.tofile(root / f"{split}.bin")
        counts[split] = {"documents": 1, "bytes": int(n * 4), "tokens": int(n)}
    words = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab - 1)}, "<|endoftext|>": vocab - 1}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(
        root / "tokenizer"
    )
    meta = {
        "format_version": 1,
        "dtype": "uint16",
        "vocab_size": vocab,
        "eos_token_id": vocab - 1,
        "tokenizer": {"type": "synthetic", "name_or_path": None, "md5": f"synthetic-{vocab}", "encoder": None},
        "data": {"path": "synthetic", "bytes": sum(c["bytes"] for c in counts.values())},
        **counts,
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


class Check:
    def __init__(self, out_dir: Path, dry: bool, conf: Path | None):
        import torch

        self.dry, self.conf = dry, conf
        self.out = Path(out_dir)
        self.work = self.out / "work"
        self.gpu = torch.cuda.is_available() and not dry
        self.cases: dict = {}
        self.vocab = 512 if dry else VOCAB
        self.block = 64 if dry else 1024
        self.shapes = DRY_SHAPES if dry else SHAPES
        shutil.rmtree(self.work, ignore_errors=True)
        self.prepared = synthetic_prepared(self.work / "prepared", self.vocab, 200_000 if dry else 4_000_000)

    # -- one case ----------------------------------------------------------------------------------

    def base(self, shape: str) -> Path:
        """A "pretrained" GPT-2 of the shape (random weights), saved once with save_pretrained: a LoRA run's base."""
        folder = self.work / f"base-{shape}"
        if not folder.is_dir():
            random_gpt2(self.shapes[shape], vocab=self.vocab, context=self.block).save_pretrained(folder)
        return folder

    def train(self, name: str, shape: str, *overrides: str, steps: int, batch: int = 8, lora: bool = False) -> dict:
        """One run of the real train stage; what it measured, or the error that stopped it."""
        import torch

        from penwright.core.config import compose
        from penwright.train.stage import train

        n_layer, n_head, n_embd = self.shapes[shape]
        run = self.work / name
        if lora:  # adapters on a saved base of the shape
            model = ["model=gpt2", f"model.name_or_path={self.base(shape)}", "train.lora.enabled=true"]
        else:
            model = [
                "model=scratch_small",
                f"model.n_layer={n_layer}",
                f"model.n_head={n_head}",
                f"model.n_embd={n_embd}",
                f"model.n_positions={self.block}",
            ]
        base = [
            f"data.out_dir={self.prepared}",
            f"train.ckpt_dir={run}/ckpt",
            f"train.out_dir={run}/model",
            f"paths.reports={run}/reports",
            "logger=none",
            *model,
            f"train.block_size={self.block}",
            f"train.batch_size={batch}",
            f"trainer.max_steps={steps}",
            "train.warmup_steps=2",
            "train.lr=6e-4",
            f"train.val_every_n_steps={steps}",
            "train.val_batches=1",
            f"train.ckpt_every_n_steps={steps}",
            "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false",
            "sample.every_n_steps=0",
            "sample.prompts=[]",
            "sample.random_prompts=0",
            "sample.temperatures=[1.0]",
            "sample.max_new_tokens=4",
            "train.resume=false",
        ]
        if not self.gpu:
            base.append("trainer.accelerator=cpu")
        log(f"{name}: {shape} shape, {' '.join(overrides) or 'defaults'}, {steps} steps")
        if self.gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            metrics = train(compose([*base, *overrides], config_dir=self.conf))
        except Exception as err:  # an out-of-memory or a GPU-only strategy is a finding, not the end of the check
            log(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            return {
                "ok": False,
                "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                "trace": traceback.format_exc(limit=3)[-800:],
            }
        losses = [float(r.split("\t")[1]) for r in (run / "reports/curves/train.tsv").read_text().splitlines()[1:]]
        params = n_layer * 12 * n_embd**2 + (self.vocab + self.block) * n_embd
        flops_per_token = 6 * params + 12 * n_layer * n_embd * self.block  # nanoGPT's estimate (fwd + bwd)
        result = {
            "ok": True,
            "seconds": round(time.perf_counter() - start, 1),
            "steps": metrics["steps"],
            "micro_batch": metrics["micro_batch"],
            "accumulate_grad_batches": metrics["accumulate_grad_batches"],
            "tokens_per_sec": metrics["tokens_per_sec_median_step"],  # the median step: warmup and compiling left out
            "params_m": round(params / 1e6, 1),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "loss_falling": len(losses) > 1 and losses[-1] < losses[0],
        }
        if lora:
            result["checkpoint_mb"] = round((run / "ckpt" / "last.ckpt").stat().st_size / 1e6, 2)
            result["adapter_mb"] = round(metrics["adapter_bytes"] / 1e6, 2)
        if self.gpu:
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            peak = self.peak_flops()
            if peak:
                result["mfu"] = round(flops_per_token * metrics["tokens_per_sec_median_step"] / peak, 3)
        shutil.rmtree(run, ignore_errors=True)
        return result

    def skip(self, why: str) -> dict:
        return {"ok": None, "skipped": why}

    def peak_flops(self) -> float | None:
        import torch

        name = torch.cuda.get_device_name()
        return next((p for key, p in PEAKS if key in name), None)

    # -- the cases ---------------------------------------------------------------------------------

    def run(self) -> dict:
        dry = self.dry
        steps = 6 if dry else 40
        self.cases["device"] = self.device()
        gpu_only = "GPU only (the dry run is on the CPU)"
        c = self.cases
        c["gpt2/bf16"] = self.train("gpt2-bf16", "gpt2", "trainer=gpu", steps=steps, batch=4 if dry else 16)
        c["gpt2/bf16+compile"] = (
            self.skip(gpu_only + "; inductor takes minutes on 2 cores")
            if dry
            else self.train("gpt2-bf16-compile", "gpt2", "trainer=gpu", "train.compile=true", steps=steps, batch=16)
        )
        c["gpt2/fp16"] = self.train("gpt2-fp16", "gpt2", "trainer=gpu_fp16", steps=steps, batch=4 if dry else 16)
        if dry:
            c["gpt2/fp16"]["note"] = "on the CPU Lightning runs 16-mixed as bf16-mixed: the fp16 path is GPU-only"
        for shape in ("gpt2-medium", "gpt2-large"):
            for gc in (False, True):
                c[f"{shape}/memory{'/checkpointing' if gc else ''}"] = self.train(
                    f"{shape}-gc{int(gc)}",
                    shape,
                    "trainer=gpu",
                    f"train.gradient_checkpointing={str(gc).lower()}",
                    steps=3,
                    batch=2 if dry else 8,
                )
            c[f"{shape}/auto_batch_size"] = self.train(
                f"{shape}-auto",
                shape,
                "trainer=gpu",
                "train.auto_batch_size=true",
                "trainer.accumulate_grad_batches=4" if dry else "trainer.accumulate_grad_batches=8",
                steps=2,
                batch=2 if dry else 8,
            )
        for shape in ("gpt2-large", "gpt2-xl"):  # LoRA: what fits a small card
            for preset, precision in (("gpu", "bf16"), ("gpu_fp16", "fp16")):
                c[f"{shape}/lora/{precision}/memory"] = self.train(
                    f"{shape}-lora-{precision}", shape, f"trainer={preset}", steps=2, batch=1, lora=True
                )
                c[f"{shape}/lora/{precision}/auto_batch_size"] = self.train(
                    f"{shape}-lora-{precision}-auto",
                    shape,
                    f"trainer={preset}",
                    "train.auto_batch_size=true",
                    "trainer.accumulate_grad_batches=4" if dry else "trainer.accumulate_grad_batches=32",
                    steps=2,
                    batch=2 if dry else 1,
                    lora=True,
                )
        c["gpt2/fsdp-1gpu"] = (
            self.skip(gpu_only + ": Lightning's FSDP needs a CUDA accelerator")
            if dry
            else self.train("gpt2-fsdp", "gpt2", "trainer=fsdp", steps=10, batch=8)
        )
        c["generate"] = self.generate()
        c["engine"] = self.engine()
        return self.cases

    def engine(self) -> dict:
        """penwright's engine on CUDA (the 124M shape's fused graph, the padded runner): the CPU engine's greedy
        tokens, and tokens/s at batch 1 and 16."""
        import shutil

        import onnx
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from penwright.export.fp16 import half
        from penwright.export.save import save_fused, save_graph
        from penwright.inference.engine import Engine
        from penwright.inference.sampling import GREEDY

        provider = "cpu" if self.dry else "cuda"
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return self.skip(f"onnxruntime {ort.__version__} has no CUDA provider here: install onnxruntime-gpu")
        try:
            model = random_gpt2(self.shapes["gpt2"], vocab=self.vocab, context=self.block).eval()
            folder = save_fused(model, AutoTokenizer.from_pretrained(self.prepared / "tokenizer"), self.work / "onnx")
            engine = Engine.load(folder, slots=16, provider=provider, padded=True)
            if engine.provider != provider:
                return {"ok": False, "error": "onnxruntime fell back to the CPU: CUDA or cuDNN libraries missing"}
            prompt = [[5, 6, 7, 8]]
            ours = engine.generate_ids(prompt, 16, stop_at_eos=False, sampling=GREEDY)
            cpu = Engine.load(folder, slots=1).generate_ids(prompt, 16, stop_at_eos=False, sampling=GREEDY)
            same = bool((ours == cpu).all())
            out = {"ok": same, "provider": engine.provider, "same_tokens_as_cpu": same}
            new = 16 if self.dry else 128

            def rate(e: Engine, batch: int) -> float:
                e.generate_ids(prompt * batch, 4, stop_at_eos=False, sampling=GREEDY)  # warmup
                start = time.perf_counter()
                e.generate_ids(prompt * batch, new, stop_at_eos=False, sampling=GREEDY)
                return round(batch * new / (time.perf_counter() - start), 1)

            for batch in (1, 16):
                out[f"batch{batch}_tokens_per_sec"] = rate(engine, batch)
            # export.dtype=fp16: the same graph converted, its cache in fp16 (tokens may differ: fp16 rounding)
            half_dir = self.work / "onnx-fp16"
            shutil.copytree(folder, half_dir, ignore=shutil.ignore_patterns("model.onnx*"), dirs_exist_ok=True)
            save_graph(half(onnx.load(str(folder / "model.onnx")), self.work), half_dir / "model.onnx")
            fp16 = Engine.load(half_dir, slots=16, provider=provider)
            tokens = fp16.generate_ids(prompt, 16, stop_at_eos=False, sampling=GREEDY)
            out["fp16"] = {
                "same_tokens_as_cpu_fp32": round(float((tokens == cpu).mean()), 3),
                **{f"batch{b}_tokens_per_sec": rate(fp16, b) for b in (1, 16)},
            }
            return out
        except Exception as err:  # a check reports what failed and goes on
            return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}

    def generate(self) -> dict:
        """transformers generate (greedy, its cache) on the 124M shape: tokens/s at batch 1 and 16."""
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        n_layer, n_head, n_embd = self.shapes["gpt2"]
        device = "cuda" if self.gpu else "cpu"
        model = (
            GPT2LMHeadModel(
                GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=self.vocab, n_positions=self.block)
            )
            .to(device)
            .eval()
        )
        if self.gpu:
            model = model.to(torch.bfloat16)
        new = 16 if self.dry else 128
        out: dict[str, object] = {"dtype": "bf16" if self.gpu else "fp32", "new_tokens": new}
        for batch in (1, 16):
            ids = torch.randint(0, self.vocab, (batch, 16), device=device)
            kw = dict(
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            with torch.no_grad():
                model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warmup
                if self.gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(ids, **kw)
                if self.gpu:
                    torch.cuda.synchronize()
            out[f"batch{batch}_tokens_per_sec"] = round(batch * new / (time.perf_counter() - start), 1)
        return {"ok": True, **out}

    def device(self) -> dict:
        import lightning
        import torch
        import transformers

        info = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
            "dry": self.dry,
        }
        if self.gpu:
            props = torch.cuda.get_device_properties(0)
            info |= {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
                "peak_bf16_tflops": (self.peak_flops() or 0) / 1e12 or None,
            }
            try:
                info["driver"] = (
                    subprocess.run(
                        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True,
                        text=True,
                        timeout=20,
                    ).stdout.strip()
                    or None
                )
            except (OSError, subprocess.SubprocessError):
                info["driver"] = None
        else:
            info["name"] = f"CPU ({platform.processor() or platform.machine()})"
        return info


def summary(cases: dict) -> str:
    dev = cases.get("device", {})
    lines = [
        f"# GPU check: {dev.get('name')}{' (dry run, tiny shapes on the CPU)' if dev.get('dry') else ''}",
        "",
        f"torch {dev.get('torch')}, CUDA {dev.get('cuda')}, driver {dev.get('driver', '-')}, "
        f"Lightning {dev.get('lightning')}, transformers {dev.get('transformers')}",
        "",
        "| case | result | tokens/s | MFU | peak GiB | micro-batch x accumulate | loss first → last |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in cases.items():
        if name in ("device", "generate", "engine"):
            continue
        status = "skipped: " + r["skipped"] if r.get("ok") is None else ("ok" if r["ok"] else "FAILED: " + r["error"])
        loss = f"{r['loss_first']:.3f} → {r['loss_last']:.3f}" if r.get("loss_first") is not None else ""
        batch = f"{r['micro_batch']} x {r['accumulate_grad_batches']}" if r.get("micro_batch") else ""
        lines.append(
            f"| {name} | {status} | {r.get('tokens_per_sec', '')} | {r.get('mfu', '')} | "
            f"{r.get('peak_memory_gib', '')} | {batch} | {loss} |"
        )
    g = cases.get("generate", {})
    lines += [
        "",
        f"transformers generate ({g.get('dtype')}, {g.get('new_tokens')} new tokens): "
        f"{g.get('batch1_tokens_per_sec')} tokens/s at batch 1, {g.get('batch16_tokens_per_sec')} at batch 16",
    ]
    e = cases.get("engine", {})
    if e.get("ok") is None:
        lines += ["", f"penwright's engine on CUDA: skipped: {e.get('skipped')}"]
    elif not e.get("ok"):
        lines += ["", f"penwright's engine on CUDA: FAILED: {e.get('error', 'not the CPU engine tokens')}"]
    else:
        lines += [
            "",
            f"penwright's engine ({e.get('provider')}, fp32, the CPU engine's greedy tokens): "
            f"{e.get('batch1_tokens_per_sec')} tokens/s at batch 1, {e.get('batch16_tokens_per_sec')} at batch 16",
        ]
        h = e.get("fp16", {})
        lines += [
            f"the same graph in fp16 (export.dtype=fp16; {h.get('same_tokens_as_cpu_fp32')} of its greedy tokens "
            f"equal fp32's): {h.get('batch1_tokens_per_sec')} tokens/s at batch 1, {h.get('batch16_tokens_per_sec')} "
            "at batch 16",
        ]
    return "\n".join(lines) + "\n"


def check_gpu(out_dir: str | Path = "reports/gpu", dry: bool = False, conf: str | Path | None = None) -> dict:
    import torch

    if not dry and not torch.cuda.is_available():
        from penwright.core.errors import PenwrightError

        raise PenwrightError("no CUDA GPU is visible to torch: run `penwright check gpu --dry` for the CPU dry run")
    start = time.perf_counter()
    check = Check(Path(out_dir), dry, Path(conf) if conf else None)
    try:
        cases = check.run()
    finally:
        shutil.rmtree(check.work, ignore_errors=True)
    cases["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(out_dir)
    atomic_write_text(out / "check.json", json.dumps(cases, indent=2) + "\n")
    atomic_write_text(out / "check.md", summary({k: v for k, v in cases.items() if k != "seconds"}))
    failed = [k for k, v in cases.items() if isinstance(v, dict) and v.get("ok") is False]
    log(
        f"{len(cases) - 2} cases in {cases['seconds']:.0f} s, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}"
        f" -> {out}/check.json, {out}/check.md"
    )
    return cases
