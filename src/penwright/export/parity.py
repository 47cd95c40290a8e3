"""The exported graph against PyTorch: logits on real positions of a left-padded batch (an empty past and a
non-empty one), and the engine's greedy tokens against ``transformers`` ``generate(do_sample=False)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from penwright.export.save import GRAPH
from penwright.inference.runner import position_ids_for
from penwright.prepare.tokenizer import left_padded


def parity(model: GPT2LMHeadModel, tokenizer, onnx_dir: Path, prompts: list[str], new_tokens: int) -> dict:
    """ONNX vs PyTorch: logits on real positions (past 0 and > 0), greedy tokens vs transformers generate."""
    from penwright.inference.engine import Engine
    from penwright.inference.sampling import GREEDY

    runner = graph_runner(onnx_dir, GRAPH)
    tokenizer = left_padded(tokenizer)
    enc = tokenizer(prompts, return_tensors="np", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    split = max(1, ids.shape[1] // 2)  # the first half is the prefill, the second half runs on its past

    with torch.no_grad():
        full = (
            model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(position_ids_for(mask, ids.shape[1])),
            )
            .logits.float()
            .numpy()
        )
    positions = position_ids_for(mask, ids.shape[1])
    first, present = runner.forward(ids[:, :split], mask[:, :split], positions[:, :split], None)
    second, _ = runner.forward(ids[:, split:], mask, positions[:, split:], present)
    real = mask.astype(bool)
    diff_empty = float(np.abs(first - full[:, :split])[real[:, :split]].max())
    diff_past = float(np.abs(second - full[:, split:])[real[:, split:]].max())

    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )[:, ids.shape[1] :].numpy()
    engine = Engine.load(onnx_dir, slots=len(prompts))  # the engine generate and serve run: prompts unpadded
    prompt_ids = [row[m == 1].tolist() for row, m in zip(ids, mask)]
    ours = engine.generate_ids(prompt_ids, new_tokens, stop_at_eos=False, sampling=GREEDY)
    return {
        "max_abs_diff_logits_empty_past": diff_empty,
        "max_abs_diff_logits_with_past": diff_past,
        "greedy_tokens_equal": bool(np.array_equal(ours, ref)),
        "greedy_tokens_compared": int(ref.size),
        "batch": len(prompts),
        "left_padded_rows": int((mask[:, 0] == 0).sum()),
        "provider": engine.provider,
    }


def graph_runner(onnx_dir: Path, graph: str):
    """The exported graph as it is (no rewrite), on the CPU: one forward pass at a time (``PaddedRunner.forward``)."""
    from penwright.inference.runner import PaddedRunner, open_session, read_beside_graph

    session, _ = open_session(str(onnx_dir / graph), onnx_dir / graph)
    config, tokenizer = read_beside_graph(onnx_dir, session)
    n = int(config["n_positions"])
    return PaddedRunner(session, config, slots=1, context=n, eos=int(tokenizer.eos_token_id))


def graph_logits(onnx_dir: Path, graph: str, ids: np.ndarray) -> np.ndarray:
    """The logits [windows, block, vocab] of one graph on unpadded windows (a single prefill)."""
    mask = np.ones_like(ids)
    return graph_runner(onnx_dir, graph).forward(ids, mask, position_ids_for(mask, ids.shape[1]), None)[0]
