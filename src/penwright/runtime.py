"""A KV-cached generation loop on onnxruntime, for the graph ``penwright export`` writes.

``Generator.load("artifacts/onnx")`` opens the graph (CPU by default; ``provider="cuda"`` with a
GPU) and its tokenizer. Each decoding step feeds one token per row plus the previous step's
``present.*`` tensors as ``past_key_values.*``. With CUDA they stay onnxruntime values on the GPU,
bound with IOBinding, never copied to the host. On CPU, plain ``session.run`` on numpy arrays is
faster (onnxruntime reads numpy inputs in place; measured 1.17x tokens/s over IOBinding for the
quickstart model, 1.06x for the 124M shape: IOBinding's per-step Python calls cost more than the
one memcpy of the outputs); ``io_binding=True`` forces IOBinding on CPU (tests use it to check that
path here). Prompts are left-padded into a batch; position ids are ``cumsum(mask) - 1``; each row
stops at EOS on its own.

onnxruntime-gpu lists the CUDA provider even when CUDA cannot run and silently falls back to
CPU: ``Generator.provider`` says what actually ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from penwright.errors import ConfigError, PenwrightError
from penwright.log import get_logger
from penwright.sampling import SamplingConfig, config_key, next_tokens

GRAPH = "model.onnx"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class Step:
    logits: np.ndarray  # [batch, seq, vocab] fp32
    present: list  # per layer key, value: onnxruntime OrtValues (or numpy arrays)


def position_ids_for(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """HF's rule: cumsum(mask) - 1, pads set to 1; the last ``seq`` columns."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos[attention_mask == 0] = 1
    return pos[:, -seq:].astype(np.int64)


def read_beside_graph(path: Path, session) -> tuple[dict, object]:
    """The model config and tokenizer an export wrote beside its graph, checked against the graph's vocab."""
    from penwright.files import load_tokenizer, read_json, short

    fix = "re-export with `penwright export`"
    try:
        config = read_json(path / "config.json", fix)  # a damaged file: one line naming it
        tokenizer = load_tokenizer(path, fix)
    except (OSError, ValueError) as err:
        raise PenwrightError(
            f"{path}: the tokenizer or config.json beside the graph cannot be read "
            f"({short(err, 300)}); re-export with `penwright export`"
        ) from None
    vocab = session.get_outputs()[0].shape[-1]
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise PenwrightError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the graph's vocab is {vocab}: "
            f"they come from different models; re-export with `penwright export`"
        )
    return config, tokenizer


class Generator:
    def __init__(
        self, session, tokenizer, config: dict, provider: str, device_id: int = 0, io_binding: bool | None = None
    ):
        self.session = session
        self.tokenizer = tokenizer
        self.config = config
        self.provider = provider  # what actually runs: "cpu" or "cuda"
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.device_id = device_id
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        self.n_layer, self.n_head = int(config["n_layer"]), int(config["n_head"])
        self.head_dim = int(config["n_embd"]) // self.n_head
        self.n_positions = int(config["n_positions"])
        self.eos = int(tokenizer.eos_token_id)
        names = [i.name for i in session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in session.get_outputs()][1:]
        past_type = session.get_inputs()[3].type if len(names) > 3 else "tensor(float)"
        self.past_dtype = np.float16 if "float16" in past_type else np.float32
        from penwright.tokenizer import left_padded

        self.tokenizer = tokenizer = left_padded(tokenizer)  # batches of prompts: padded on the left

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        provider: str = "cpu",
        threads: int = 0,
        graph: str = GRAPH,
        device_id: int = 0,
        io_binding: bool | None = None,
    ) -> Generator:
        import onnxruntime as ort

        path = Path(path)
        file = path / graph
        if not file.is_file():
            raise PenwrightError(f"{file}: not found. Export a model first: `penwright export`")
        if provider not in PROVIDERS:
            raise ConfigError(f"generate.provider={provider!r}: use cpu or cuda")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        wanted = ([("CUDAExecutionProvider", {"device_id": device_id})] if provider == "cuda" else []) + [
            "CPUExecutionProvider"
        ]
        try:
            session = ort.InferenceSession(str(file), sess_options=options, providers=wanted)
        except Exception as err:  # onnxruntime raises its own types for a truncated or foreign file
            raise PenwrightError(
                f"{file}: cannot be loaded by onnxruntime ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:300]}). Re-export it with `penwright export`"
            ) from None
        ran = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if provider == "cuda" and ran != "cuda":
            get_logger("runtime").info(
                "CUDA was asked for but onnxruntime fell back to CPU (no GPU, or CUDA/cuDNN "
                "libraries missing): running on CPU"
            )
        config, tokenizer = read_beside_graph(path, session)
        return cls(session, tokenizer, config, ran, device_id, io_binding)

    # -- one forward pass --------------------------------------------------------------------------

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_head, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.past_names]

    def forward(self, ids: np.ndarray, mask: np.ndarray, past: list, positions: np.ndarray | None = None) -> Step:
        """Run the graph once: ``ids`` [batch, seq], ``mask`` [batch, past+seq], ``past`` from the last step;
        ``positions`` [batch, seq] when the caller has them (else ``position_ids_for(mask)``)."""
        import onnxruntime as ort

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mask = np.ascontiguousarray(mask, dtype=np.int64)
        if positions is None:
            positions = position_ids_for(mask, ids.shape[1])
        if not self.io_binding:
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            feed.update(zip(self.past_names, past))
            outputs = self.session.run(None, feed)
            return Step(logits=outputs[0], present=outputs[1:])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        for name, value in zip(self.past_names, past):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return Step(logits=outputs[0].numpy(), present=list(outputs[1:]))

    # -- the loop ---------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask; an empty prompt starts from <|endoftext|> (an unconditional sample)."""
        if not prompts:
            raise ConfigError('no prompts: give at least one ("" for an unconditional sample)')
        texts = [p if p else self.tokenizer.eos_token for p in prompts]
        enc = self.tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=False)
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def generate_ids(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        max_new_tokens: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        use_cache: bool = True,
        stop: Callable[[int, np.ndarray], bool] | None = None,
        on_step: Callable[[np.ndarray], None] | None = None,
        keys: Mapping[str, str] | None = None,
    ) -> np.ndarray:
        """New token ids [batch, n]; a finished row is padded with EOS.

        ``stop(row, new_ids)`` may end a row early (stop strings); ``on_step(tokens)`` sees each step's
        tokens (streaming). ``use_cache=False`` re-feeds the whole sequence each step (the baseline).
        ``keys`` maps parameter names to the caller's config keys, which errors name (default ``generate.*``).
        """
        cfg = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty, keys=keys)
        length_key = config_key(keys, "max_new_tokens")
        if max_new_tokens < 1:
            raise ConfigError(f"{length_key}={max_new_tokens}: must be >= 1")
        if ids.shape[1] + max_new_tokens > self.n_positions:
            raise PenwrightError(
                f"a prompt of {ids.shape[1]} tokens plus {length_key}={max_new_tokens} exceeds the model's "
                f"context of {self.n_positions} tokens; shorten the prompt or lower {length_key}"
            )
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        vocab = None
        seen = None
        out = np.full((batch, max_new_tokens), self.eos, dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        step = self.forward(ids, mask, self.empty_past(batch))
        position = mask.sum(axis=1, keepdims=True) - 1  # of the last real token; each new token is one further
        all_ids = ids
        for t in range(max_new_tokens):
            logits = step.logits[:, -1, :]
            if vocab is None:
                vocab = logits.shape[-1]
                if repetition_penalty != 1.0:
                    seen = np.zeros((batch, vocab), dtype=bool)
                    for row in range(batch):  # the prompt's real tokens only: left padding is not text
                        seen[row, ids[row][mask[row, : ids.shape[1]] == 1]] = True
            if t < min_new_tokens:
                logits = logits.copy()
                logits[:, self.eos] = -np.inf
            token = next_tokens(logits, cfg, rng, seen)
            token = np.where(done, self.eos, token)
            out[:, t] = token
            if seen is not None:
                seen[np.arange(batch), token] = True
            if on_step is not None:
                on_step(token)
            if stop_at_eos:
                done |= token == self.eos
            if stop is not None:
                for row in np.flatnonzero(~done):
                    if stop(int(row), out[row, : t + 1]):
                        done[row] = True
            if done.all() or t == max_new_tokens - 1:
                return out[:, : t + 1]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            if use_cache:
                position = position + 1
                step = self.forward(token[:, None], mask, step.present, position)
            else:
                all_ids = np.concatenate([all_ids, token[:, None]], axis=1)
                step = self.forward(all_ids, mask, self.empty_past(batch))
        return out

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        seed: int | None = None,
        stop_strings: list[str] | None = None,
        on_step: Callable[[np.ndarray], None] | None = None,
        **sampling,
    ) -> list[str]:
        """The new text for each prompt (cut at EOS and before the first stop string)."""
        ids, mask = self.encode(prompts)
        stops = [s for s in (stop_strings or []) if s]

        def stop(row: int, new: np.ndarray) -> bool:
            return any(s in self.tokenizer.decode(new[-32:]) for s in stops)

        new = self.generate_ids(
            ids, mask, max_new_tokens, seed=seed, stop=stop if stops else None, on_step=on_step, **sampling
        )
        texts = []
        for row in new:
            row = row.tolist()
            if self.eos in row:
                row = row[: row.index(self.eos)]
            text = self.tokenizer.decode(row)
            for s in stops:
                if s in text:
                    text = text[: text.index(s)]
            texts.append(text)
        return texts
